"""FedTAN's gRPC BN sync transport deployed: the model must be the in-process engine's.

* ``test_grpc_transport_in_deployment_...``: ``flower-superlink`` + two ``flower-supernode`` on
  127.0.0.1 (like tests/test_flower_runtime.py) with ``transport = "grpc"``: one Flower message
  per client and round; the clients' ClientApp processes sync live over the ServerApp's service.
  The run stops after round 1 and is resumed, extended to round 2, on the same federation.
* ``test_blocks_of_rounds_in_deployment_...``: the same federation with ``rounds-per-message``
  = 2: a Flower message per client and block; the rounds run over the service, and the block
  after the first is opened while its last round is still being recorded.
* ``test_multihost_netns_...``: three "machines" as network namespaces on a bridge (in a fourth
  namespace, so nothing is added to the host's own network namespace): the SuperLink with TLS
  and SuperNode authentication, and the ServerApp's BN sync service with mutual TLS, in one; a
  SuperNode in each of the others, with its own client certificate in its node config, reaching
  the server over 10.251.0.0/24 only. It also checks that the BN sync service admits only TLS
  clients with a certificate of its client CA, and that a SuperNode with an unregistered key
  is refused. It and the blocks test run over each carrier of the service's calls
  (``bn-sync-protocol``: gRPC, and framed messages on a socket).

Every wait is bounded by the test's budget (``FEDTAN_MULTIHOST_TEST_TIMEOUT_S``, default 300,
per test); every process, namespace, veth and the bridge are removed in ``finally``. Run with
``-s`` for per-phase timings. The namespace test needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.transports.grpc.wire import REDUCE_METHOD
from server.processes import (
    LOOPBACK,
    Deadline,
    ManagedProcess,
    PhaseTimer,
    flower_bin,
    flower_env,
    logs,
    start_flwr_run,
    start_local_deployment,
    start_process,
    stop_processes,
    wait_for,
    wait_for_log,
    write_flower_config,
    write_run_config,
)
from server.results import read_metrics_log
from tests.certs import make_certs, make_client_certs
from tests.test_flower_runtime import (
    APP_DIR,
    BASE,
    assert_same_model,
    read_summary,
    reference_config,
    started_run_id,
    wait_for_cli,
)

TIMEOUT_S = float(os.environ.get("FEDTAN_MULTIHOST_TEST_TIMEOUT_S", 300))

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc"
)

GRPC = {"transport": "grpc", "num-clients": 2, "num-rounds": 2, "local-steps": 2}
# The service aborts an exchange whose last client is later than this: a fresh ClientApp
# process (torch import) per message on a loaded machine can lag its peer by tens of seconds.
SYNC_TIMEOUT = {"bn-sync-timeout": 120.0}


def assert_one_exchange_per_round(out: Path, rounds: int, clients: int) -> None:
    """metrics.csv: every round took exactly one Flower exchange (the train message)."""
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["round"]) for row in rows] == list(range(1, rounds + 1)), rows
    assert [int(float(row["round_trips"])) for row in rows] == [1] * rounds, rows
    assert [int(float(row["clients"])) for row in rows] == [clients] * rounds, rows
    # The BN statistics went over the service, not in Flower messages.
    assert [float(row["bn_bytes_down"]) + float(row["bn_bytes_up"]) for row in rows] == [
        0.0
    ] * rounds, rows


def assert_grpc_run_gives_the_engine_model(out: Path, run_config: dict, phases) -> None:
    """One Flower exchange per round, and the in-process engine's global model."""
    assert_one_exchange_per_round(out, GRPC["num-rounds"], clients=2)
    assert_same_model(out / "model.pt", reference_config(run_config), 2)
    took = phases.mark("in-process reference + compare")
    print(f"in-process reference + compare {took:.1f} s; total {phases.elapsed():.1f} s")


@pytest.mark.slow
def test_grpc_transport_in_deployment_matches_in_process_engine(tmp_path):
    deadline, phases = Deadline(TIMEOUT_S), PhaseTimer()
    home, out, log_dir = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "logs"
    env = flower_env(home)
    run_config = {**BASE, **GRPC, **SYNC_TIMEOUT, "output-dir": str(out)}

    procs: list[ManagedProcess] = []
    try:
        link, nodes = start_local_deployment(
            2, env=env, log_dir=log_dir, cwd=tmp_path, deadline=deadline, procs=procs
        )
        phases.mark("superlink up, 2 supernodes connected")

        # Round 1, then the same federation resumes the run in its folder, extended to round 2.
        first_toml = write_run_config(tmp_path / "first.toml", {**run_config, "num-rounds": 1})
        first = start_flwr_run("deployment", first_toml, env=env, log_dir=log_dir, app_dir=APP_DIR)
        procs.append(first)
        wait_for_cli(first, deadline, [link, *nodes])
        assert started_run_id(first), logs([first])
        summary = read_summary(out, [link, *nodes], deadline)
        assert (summary["status"], summary["rounds_completed"]) == ("completed", 1), summary
        first_rows = read_metrics_log(out / "metrics.jsonl")
        phases.mark("flwr run: round 1 over grpc")

        resumed_toml = write_run_config(tmp_path / "resumed.toml", {**run_config, "resume": True})
        again = start_flwr_run(
            "deployment", resumed_toml, env=env, log_dir=log_dir / "resumed", app_dir=APP_DIR
        )
        procs.append(again)
        wait_for_cli(again, deadline, [link, *nodes])
        summary = read_summary(out, [link, *nodes], deadline)
        phases.mark("flwr run --resume: round 2 over grpc")
        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == GRPC["num-rounds"], summary
        rows = read_metrics_log(out / "metrics.jsonl")
        assert rows[:1] == first_rows and rows[1]["round"] == 2  # round 1 was not run again
        assert all(node.running() for node in nodes), logs(nodes)
    finally:
        killed = stop_processes(procs)
        phases.mark("teardown")
        print(phases.report("grpc transport in deployment"), *killed, sep="\n")

    assert_grpc_run_gives_the_engine_model(out, run_config, phases)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_blocks_of_rounds_in_deployment_give_the_in_process_engine_model(tmp_path, protocol):
    """3 rounds in blocks of 2: a Flower message per client opens rounds 1 and 3, none the
    others; each ClientApp process trains its block's rounds over the service (its calls over
    ``protocol``)."""
    deadline, phases = Deadline(TIMEOUT_S), PhaseTimer()
    home, out, log_dir = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "logs"
    env = flower_env(home)
    run_config = {
        **BASE,
        **GRPC,
        **SYNC_TIMEOUT,
        "num-rounds": 3,
        "rounds-per-message": 2,
        "bn-sync-protocol": protocol,
        "output-dir": str(out),
    }

    procs: list[ManagedProcess] = []
    try:
        link, nodes = start_local_deployment(
            2, env=env, log_dir=log_dir, cwd=tmp_path, deadline=deadline, procs=procs
        )
        phases.mark("superlink up, 2 supernodes connected")
        run_toml = write_run_config(tmp_path / "run.toml", run_config)
        run = start_flwr_run("deployment", run_toml, env=env, log_dir=log_dir, app_dir=APP_DIR)
        procs.append(run)
        wait_for_cli(run, deadline, [link, *nodes])
        summary = read_summary(out, [link, *nodes], deadline)
        phases.mark("flwr run: 3 rounds in blocks of 2")
        assert (summary["status"], summary["rounds_completed"]) == ("completed", 3), summary
    finally:
        killed = stop_processes(procs)
        phases.mark("teardown")
        print(phases.report("blocks of rounds in deployment"), *killed, sep="\n")

    rows = read_metrics_log(out / "metrics.jsonl")
    assert [(r["round"], r["round_trips"], r["clients"]) for r in rows] == [
        (1, 1, 2),
        (2, 0, 2),
        (3, 1, 2),
    ], rows
    assert_same_model(out / "model.pt", reference_config(run_config), 2)


# --- three machines as network namespaces -----------------------------------------------------

SUBNET = "10.251.0"
SERVER_IP = f"{SUBNET}.1"
LINK_PORT, SYNC_PORT, NODE_PORT, ROGUE_PORT = 9093, 9099, 9094, 9095
CAP_NET_ADMIN = 12

# Run inside a client namespace: the same request to the BN sync service five ways, over the
# run's carrier (bn-sync-protocol), through the project's own client connection.
TLS_PROBE = r"""
import json, sys
from common.transports.grpc.calls import CallFailed, connect
from common.transports.grpc.wire import Caller
protocol, address, method, ca, other_ca, client, stranger = sys.argv[1:8]

def read(path):
    with open(path, "rb") as f:
        return f.read()

def call(root=None, client=None):
    chain = (read(client + ".pem"), read(client + ".key")) if client else None
    connection = connect(protocol, address, read(root) if root else None, chain)
    try:
        connection.call(method, Caller(0, "", ""), b"probe", 20)  # names no client
        return ["OK", ""]
    except CallFailed as error:
        return [error.code.name, error.details]
    finally:
        connection.close()

print(json.dumps({
    "plaintext": call(),
    "tls-no-client-certificate": call(ca),
    "tls-other-ca": call(other_ca, client),
    "mutual-tls": call(ca, client),
    "mutual-tls-other-client-ca": call(ca, stranger),
}))
"""


def _has_cap_net_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (a skip reason), or None.

    Not having iproute2 is no reason to skip: it is a missing dependency (a failure).
    """
    if not _has_cap_net_admin():
        return "network namespaces need CAP_NET_ADMIN (run as root)"
    if shutil.which("ip") is None:
        pytest.fail("iproute2's `ip` is missing: apt-get install -y iproute2")
    probe = f"fedtan-probe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        if "not permitted" in made.stderr or "Permission denied" in made.stderr:
            return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        pytest.fail(f"`ip netns add` failed: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)
    return None


class Lab:
    """Hosts as network namespaces, each with ``eth0`` on one bridge in a switch namespace.

    Nothing is created in the caller's network namespace: every veth pair is made with one end
    in the switch namespace and the other in its host's, so deleting the namespaces removes it
    all. Names carry a random tag, so that concurrent runs do not collide.
    """

    def __init__(self, hosts: dict[str, str]) -> None:
        tag = secrets.token_hex(3)
        self.switch = f"fedtan-{tag}-switch"
        self.ns = {role: f"fedtan-{tag}-{role}" for role in hosts}
        self.ips = dict(hosts)
        self.made: list[str] = []

    def up(self) -> None:
        for name in [self.switch, *self.ns.values()]:
            _ip("netns", "add", name)
            self.made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (role, ns) in enumerate(self.ns.items()):
            port = f"port{i}"
            # Made in the switch namespace, the peer straight in the host's: never in ours.
            peer = ["peer", "name", "eth0", "netns", ns]
            _ip("-n", self.switch, "link", "add", port, "type", "veth", *peer)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.ips[role]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def exec(self, role: str) -> list[str]:
        """Prefix for a command to run inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.ns[role]]

    def listening(self, role: str, port: int) -> bool:
        result = subprocess.run(
            ["ss", "-N", self.ns[role], "-Hltn", f"sport = :{port}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return bool(result.stdout.strip())

    def down(self) -> list[str]:
        """Kill what still runs inside (by pid), delete the namespaces; what had to be done."""
        notes = []
        for name in reversed(self.made):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                notes.append(f"{name}: killed leftover pid {pid}")
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deleted = _ip("netns", "del", name, check=False)
            if deleted.returncode != 0:
                notes.append(f"{name}: not deleted: {deleted.stderr.strip()}")
        self.made.clear()
        return notes


def supernode_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH-format ECDSA P-384 key pair (what ``ssh-keygen -t ecdsa -b 384`` makes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    directory.mkdir(parents=True, exist_ok=True)
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


def wait_for_exit(proc: ManagedProcess, *, timeout: float) -> int:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} still runs after {timeout:.0f} s\n" + logs([proc]))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_multihost_netns_mutual_tls_and_supernode_auth_over_grpc(tmp_path, protocol):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    deadline, phases = Deadline(TIMEOUT_S), PhaseTimer()
    log_dir, out = tmp_path / "logs", tmp_path / "out"
    certs, other_certs, keys = tmp_path / "certs", tmp_path / "other-ca", tmp_path / "keys"
    # The SuperLink's certificate: the address the SuperNodes and the BN sync clients dial, and
    # 127.0.0.1, which the SuperLink's own SuperExec uses.
    make_certs(certs, hosts=(SERVER_IP, "127.0.0.1"))
    make_certs(other_certs, hosts=(SERVER_IP, "127.0.0.1"))  # a CA the service does not use
    # Mutual TLS for the BN sync service: each SuperNode's own client certificate, and one of
    # another client CA for the probe.
    make_client_certs(certs / "clients", ["c0", "c1"])
    make_client_certs(other_certs / "clients", ["c0"])
    node_keys = [supernode_key(keys, f"client-{k}") for k in range(2)]
    rogue_private, _ = supernode_key(keys, "rogue")  # never registered
    # One FLWR_HOME per machine, and one for the operator's CLI.
    env = {role: flower_env(tmp_path / f"home-{role}") for role in ("server", "c0", "c1", "cli")}
    write_flower_config(
        tmp_path / "home-cli",
        {
            "fedtan": {
                "address": f"{SERVER_IP}:{LINK_PORT}",
                "root-certificates": str(certs / "ca.pem"),
            }
        },
    )
    run_config = {
        **BASE,
        **GRPC,
        **SYNC_TIMEOUT,
        "output-dir": str(out),
        "bn-sync-host": "0.0.0.0",  # every interface of the server's namespace
        "bn-sync-port": SYNC_PORT,
        "bn-sync-address": f"{SERVER_IP}:{SYNC_PORT}",
        "bn-sync-certfile": str(certs / "server.pem"),
        "bn-sync-keyfile": str(certs / "server.key"),
        "bn-sync-ca-certfile": str(certs / "ca.pem"),
        "bn-sync-client-ca-certfile": str(certs / "clients" / "client-ca.pem"),
        "bn-sync-protocol": protocol,
    }
    run_toml = write_run_config(tmp_path / "run-config.toml", run_config)
    lab = Lab({"server": SERVER_IP, "c0": f"{SUBNET}.11", "c1": f"{SUBNET}.12"})
    phases.mark("certificates and keys")

    def start(role: str, cmd: list[str], name: str, cwd: Path = tmp_path) -> ManagedProcess:
        """Start ``cmd`` on machine ``role``; the operator's CLI runs on the server machine."""
        where = "server" if role == "cli" else role
        proc = start_process(
            [*lab.exec(where), *cmd], name=name, log_dir=log_dir, env=env[role], cwd=cwd
        )
        procs.append(proc)
        return proc

    def supernode(
        role: str, name: str, key: Path, port: int, partition: int, *, certified: bool = True
    ) -> ManagedProcess:
        node_config = f"partition-id={partition} num-partitions=2"
        if certified:  # its client certificate for the BN sync service's mutual TLS
            client = certs / "clients" / role
            node_config += (
                f" bn-sync-client-certfile='{client}.pem' bn-sync-client-keyfile='{client}.key'"
            )
        cmd = [
            *flower_bin("flower-supernode"),
            "--superlink",
            f"{SERVER_IP}:{LINK_PORT}",
            "--root-certificates",
            str(certs / "ca.pem"),
            "--auth-supernode-private-key",
            str(key),
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--node-config",
            node_config,
        ]
        return start(role, cmd, name)

    procs: list[ManagedProcess] = []
    killed: list[str] = []
    try:
        lab.up()
        phases.mark("namespaces, veths, bridge")
        link = start(
            "server",
            [
                *flower_bin("flower-superlink"),
                "--ssl-ca-certfile",
                str(certs / "ca.pem"),
                "--ssl-certfile",
                str(certs / "server.pem"),
                "--ssl-keyfile",
                str(certs / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "0.0.0.0",
                "--port",
                str(LINK_PORT),
            ],
            "superlink",
        )
        wait_for(
            lambda: lab.listening("server", LINK_PORT),
            timeout=deadline.remaining(at_most=60),
            what=f"the SuperLink listening on {SERVER_IP}:{LINK_PORT}",
            procs=[link],
            interval=0.5,
        )
        phases.mark("superlink up (TLS, supernode auth)")

        flwr = [*flower_bin("flwr")]
        registrations = [
            start("cli", [*flwr, "supernode", "register", str(public), "fedtan"], f"register-{k}")
            for k, (_, public) in enumerate(node_keys)
        ]
        for registration in registrations:
            code = wait_for_exit(registration, timeout=deadline.remaining(at_most=60))
            assert code == 0, logs([registration])
            assert "registered" in registration.log_path.read_text(), logs([registration])
        phases.mark("2 supernode keys registered")

        # Its key is not registered: it must be refused (it runs while the rest goes on).
        rogue = supernode(
            "c1", "supernode-rogue", rogue_private, ROGUE_PORT, partition=1, certified=False
        )
        run = start(
            "cli",
            [*flwr, "run", ".", "fedtan", "--run-config", str(run_toml), "--stream"],
            "flwr-run",
            cwd=APP_DIR,
        )
        # The ServerApp starts its BN sync service, then waits for the 2 SuperNodes.
        wait_for(
            lambda: lab.listening("server", SYNC_PORT),
            timeout=deadline.remaining(at_most=120),
            what=f"the BN sync service on {SERVER_IP}:{SYNC_PORT}",
            procs=[link, run],
            interval=0.5,
        )
        phases.mark("run submitted, BN sync service up")

        probe = subprocess.run(
            [*lab.exec("c0"), sys.executable, "-c", TLS_PROBE]
            + [protocol, f"{SERVER_IP}:{SYNC_PORT}", REDUCE_METHOD]
            + [str(certs / "ca.pem"), str(other_certs / "ca.pem")]
            + [str(certs / "clients" / "c0"), str(other_certs / "clients" / "c0")],
            capture_output=True,
            text=True,
            timeout=deadline.remaining(at_most=90),
            env=env["c0"],
        )
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        print("BN sync service probed from a client namespace:", json.dumps(seen, indent=1))
        # The service answers a TLS client that trusts the CA and shows a certificate of the
        # client CA (it refuses a call that names no round, client and credential, from the
        # headers alone) ...
        assert seen["mutual-tls"][0] == "UNAUTHENTICATED", seen
        assert "credential in its metadata" in seen["mutual-tls"][1], seen
        # ... and no plaintext client, none without a client certificate or with one of another
        # client CA, nor one that does not trust the service's certificate: no handshake.
        for refused in (
            "plaintext",
            "tls-no-client-certificate",
            "mutual-tls-other-client-ca",
            "tls-other-ca",
        ):
            assert seen[refused][0] == "UNAVAILABLE", (refused, seen)
        phases.mark("BN sync mutual TLS probe (plaintext, no or other client cert, other CA)")

        nodes = [
            supernode(f"c{k}", f"supernode-{k}", private, NODE_PORT, partition=k)
            for k, (private, _) in enumerate(node_keys)
        ]
        for node in nodes:
            wait_for_log(node, "SuperNode ID", timeout=deadline.remaining(90), procs=[link])
        phases.mark("2 supernodes connected (TLS, auth)")

        # Refused: Flower logs its exit code 305 ("Failed to activate SuperNode"); the process
        # itself exits with status 1. Its SuperExec, left retrying, goes too.
        rogue_status = wait_for_exit(rogue, timeout=deadline.remaining(at_most=60))
        killed += stop_processes([rogue])
        rogue_log = rogue.log_path.read_text(errors="replace")
        assert rogue_status != 0, logs([rogue])
        assert "Exit Code: 305" in rogue_log, logs([rogue])
        assert "Failed to activate SuperNode" in rogue_log, logs([rogue])
        phases.mark("unregistered supernode refused (305)")

        wait_for_cli(run, deadline, [link, *nodes])
        assert started_run_id(run), logs([run])
        summary = read_summary(out, [link, *nodes], deadline)
        phases.mark(f"flwr run: {GRPC['num-rounds']} rounds over grpc + mutual TLS")
        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == GRPC["num-rounds"], summary
        assert all(node.running() for node in nodes), logs(nodes)
        # The SuperLink refused the rogue for its key, and let the SuperNodes in from their
        # own namespaces' addresses: across the bridge, not over a loopback.
        link_log = link.log_path.read_text(errors="replace")
        assert "No SuperNode found with the given public key" in link_log, logs([link])
        for role in ("c0", "c1"):
            activated = rf'{re.escape(lab.ips[role])}:\d+ - "POST /v1/fleet/activate-node \S+ 200'
            assert re.search(activated, link_log), logs([link])
    finally:
        killed += stop_processes(procs)
        killed += lab.down()
        phases.mark("teardown")
        print(phases.report("multihost (network namespaces)"), *killed, sep="\n")

    assert_grpc_run_gives_the_engine_model(out, run_config, phases)
