"""docs/deployment.md, run as written: the guide's commands cannot drift from the code.

The guide marks every command block a test runs with ``<!-- step: NAME -->`` on the line above
its fence. The tests take the blocks from the document and change only the guide's example
values (``EXAMPLE_VALUES``): the server's address becomes 127.0.0.1 and every port a free one.

* ``test_the_guide_deploys_over_tls_with_supernode_auth_and_grpc``: section 3 on 127.0.0.1, each
  "machine" (server, two clients, operator) with its own folder and FLWR_HOME: certificates,
  SuperNode keys, the files handed around as section 3.3's table says, the SuperLink, the
  operator's config.toml, registration, two SuperNodes, ``configs/deploy-tls.toml`` (the same
  substitutions), and the run; it must finish completed, say so in ``flwr ls --format json``,
  and leave its results on the server. Every file the guide made in a "checkout" must be one
  ``.gitignore`` covers. Bounded by ``FEDTAN_GUIDE_TEST_TIMEOUT_S`` (default 600); every process
  is stopped in ``finally``.
* ``test_the_files_the_guide_creates_are_ignored_by_git``: the certificate, key and state steps
  alone (seconds), and ``git check-ignore`` on what they made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

from common.experiment.config import RunConfig
from server.processes import (
    Deadline,
    ManagedProcess,
    PhaseTimer,
    flower_env,
    free_ports,
    logs,
    start_process,
    stop_processes,
    wait_for_log,
    wait_for_port,
)
from tests.test_configs import DEFAULTS
from tests.test_flower_runtime import read_summary, wait_for_cli

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "deployment.md"
TIMEOUT_S = float(os.environ.get("FEDTAN_GUIDE_TEST_TIMEOUT_S", 600))

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc"
)

STEP = re.compile(r"^<!-- step: (?P<name>[\w-]+) -->\n```\w+\n(?P<body>.*?)^```$", re.M | re.S)

# The guide's example values, as the test replaces them.
SERVER_ADDRESS = "203.0.113.10"  # the server's address, as clients and the CLI dial it
EVERY_INTERFACE = "0.0.0.0"  # a bind address: here loopback only, nothing reachable from outside
LINK_PORT, SYNC_PORT, NODE_PORT = "9093", "9099", "9094"
OPERATOR_CHECKOUT = "/home/operator/fedtan"
DEPLOY_CONFIG = "configs/deploy-tls.toml"
CLIENTS = 2


def guide_steps() -> dict[str, str]:
    """The guide's marked command blocks, by step name."""
    steps: dict[str, str] = {}
    for match in STEP.finditer(GUIDE.read_text()):
        name = match["name"]
        assert name not in steps, f"{GUIDE.name}: step {name!r} is marked twice"
        steps[name] = match["body"]
    return steps


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each of the guide's example values (a whole word) replaced."""
    for example, value in values.items():
        text = re.sub(rf"(?<![\w.]){re.escape(example)}(?![\w.])", value, text)
    return text


def run_step(
    body: str, *, name: str, cwd: Path, env: Mapping[str, str], deadline: Deadline, procs: list
) -> str:
    """Run a block with bash (stop at the first failing command); its output."""
    proc = start_process(
        ["bash", "-euo", "pipefail", "-c", body],
        name=name,
        log_dir=cwd.parent / "logs",
        env=env,
        cwd=cwd,
    )
    procs.append(proc)
    try:
        code = proc.popen.wait(timeout=deadline.remaining(at_most=120))
    except subprocess.TimeoutExpired:
        pytest.fail(f"step {name} still runs\n{logs([proc])}")
    output = proc.log_path.read_text(errors="replace")
    assert code == 0, f"step {name} exited with {code}:\n{output}"
    return output


def start_step(
    body: str, *, name: str, cwd: Path, env: Mapping[str, str], procs: list
) -> ManagedProcess:
    """Start a block that is one long-running command (a SuperLink, a SuperNode)."""
    proc = start_process(
        ["bash", "-c", f"exec {body}"], name=name, log_dir=cwd.parent / "logs", env=env, cwd=cwd
    )
    procs.append(proc)
    return proc


def files_under(*folders: Path) -> list[str]:
    """Every file below ``folders``, relative to its folder (as if it were the checkout)."""
    return sorted(
        str(path.relative_to(folder))
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file()
    )


def not_ignored_by_git(paths: list[str]) -> list[str]:
    """Those of ``paths`` (relative to the checkout) that this checkout's .gitignore lets in."""
    assert paths, "no files to check"
    result = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--verbose", "--non-matching", "--stdin"],
        input="\n".join(paths) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: none ignored; 128: an error
    # --non-matching prints "::<TAB>path" for a path no pattern ignores.
    return [line.split("\t", 1)[1] for line in result.stdout.splitlines() if line.startswith("::")]


def test_the_files_the_guide_creates_are_ignored_by_git(tmp_path):
    steps, deadline, procs = guide_steps(), Deadline(120), []
    server, client = tmp_path / "server", tmp_path / "client"
    server.mkdir()
    client.mkdir()
    env = flower_env(tmp_path / "home")
    try:
        for step in ("tls-certs", "tls-state"):
            run_step(steps[step], name=step, cwd=server, env=env, deadline=deadline, procs=procs)
        run_step(
            steps["tls-keys"], name="tls-keys", cwd=client, env=env, deadline=deadline, procs=procs
        )
    finally:
        stop_processes(procs)
    assert (server / "state").is_dir()
    made = files_under(server, client)
    assert {"certs/ca.key", "certs/server.key", "keys/supernode"} <= set(made), made
    assert not_ignored_by_git([*made, "state/superlink.db"]) == []


@pytest.mark.slow
def test_the_guide_deploys_over_tls_with_supernode_auth_and_grpc(tmp_path):
    steps, deadline, phases = guide_steps(), Deadline(TIMEOUT_S), PhaseTimer()
    link_port, sync_port, *node_ports = free_ports(2 + CLIENTS)
    machines = {"server": tmp_path / "server", "operator": tmp_path / "operator"}
    machines |= {f"client-{k}": tmp_path / f"client-{k}" for k in range(CLIENTS)}
    env = {role: flower_env(tmp_path / f"home-{role}") for role in machines}
    for folder in machines.values():
        folder.mkdir()
    operator = machines["operator"]
    example_values = {
        SERVER_ADDRESS: "127.0.0.1",
        EVERY_INTERFACE: "127.0.0.1",
        LINK_PORT: str(link_port),
        SYNC_PORT: str(sync_port),
        OPERATOR_CHECKOUT: str(operator),
    }
    # configs/deploy-tls.toml as the operator edits it (section 3.9): this test's address.
    edited = substitute((ROOT / DEPLOY_CONFIG).read_text(), example_values)
    run_config = tomllib.loads(edited)
    run_toml = tmp_path / "deploy-tls.toml"  # outside the machines: not made by the guide
    run_toml.write_text(edited)
    assert run_config["bn-sync-address"] == f"127.0.0.1:{sync_port}", run_config
    values = {**example_values, DEPLOY_CONFIG: str(run_toml)}

    def step(name: str) -> str:
        return substitute(steps[name], values)

    procs: list[ManagedProcess] = []
    try:
        run_step(
            step("tls-certs"),
            name="tls-certs",
            cwd=machines["server"],
            env=env["server"],
            deadline=deadline,
            procs=procs,
        )
        for k in range(CLIENTS):
            client = machines[f"client-{k}"]
            run_step(
                step("tls-keys"),
                name=f"tls-keys-{k}",
                cwd=client,
                env=env[f"client-{k}"],
                deadline=deadline,
                procs=procs,
            )
        # Section 3.3: ca.crt to the clients and the operator, the public keys to the operator.
        for role in [*(f"client-{k}" for k in range(CLIENTS)), "operator"]:
            (machines[role] / "certs").mkdir()
            shutil.copy(machines["server"] / "certs/ca.crt", machines[role] / "certs/ca.crt")
        (operator / "keys").mkdir()
        for k in range(CLIENTS):
            public_key = machines[f"client-{k}"] / "keys/supernode.pub"
            shutil.copy(public_key, operator / f"keys/client-{k}.pub")
        phases.mark("certificates, keys, files handed around")

        run_step(
            step("tls-state"),
            name="tls-state",
            cwd=machines["server"],
            env=env["server"],
            deadline=deadline,
            procs=procs,
        )
        link = start_step(
            step("tls-superlink"),
            name="superlink",
            cwd=machines["server"],
            env=env["server"],
            procs=procs,
        )
        wait_for_port(link_port, timeout=deadline.remaining(at_most=90), procs=[link])
        phases.mark("superlink up (TLS, supernode auth)")

        # The CLI's first use writes its default config.toml; the guide's block is added to it.
        run_step(
            "flwr config ls",
            name="flwr-config-ls",
            cwd=operator,
            env=env["operator"],
            deadline=deadline,
            procs=procs,
        )
        config_toml = Path(env["operator"]["FLWR_HOME"]) / "config.toml"
        assert config_toml.is_file()
        with open(config_toml, "a") as config:
            config.write("\n" + step("tls-flwr-config") + "\n")
        registered = run_step(
            step("tls-register"),
            name="tls-register",
            cwd=operator,
            env=env["operator"],
            deadline=deadline,
            procs=procs,
        )
        assert len(re.findall(r"SuperNode \d+ registered", registered)) == CLIENTS, registered
        phases.mark(f"{CLIENTS} supernode keys registered")

        nodes = []
        for k, node_port in enumerate(node_ports):
            role = f"client-{k}"
            node = start_step(
                substitute(step("tls-supernode"), {NODE_PORT: str(node_port)}),
                name=f"supernode-{k}",
                cwd=machines[role],
                env={**env[role], "K": str(k)},
                procs=procs,
            )
            nodes.append(node)
        for node in nodes:
            wait_for_log(node, "SuperNode ID", timeout=deadline.remaining(90), procs=[link])
        phases.mark(f"{CLIENTS} supernodes connected")

        # The operator submits from the project checkout (`flwr run .`).
        run = start_process(
            ["bash", "-c", f"exec {step('tls-run')}"],
            name="flwr-run",
            log_dir=tmp_path / "logs",
            env=env["operator"],
            cwd=ROOT,
        )
        procs.append(run)
        wait_for_cli(run, deadline, [link, *nodes])
        phases.mark(f"flwr run: {run_config['num-rounds']} rounds")

        listed = run_step(
            step("tls-check"),
            name="tls-check",
            cwd=operator,
            env=env["operator"],
            deadline=deadline,
            procs=procs,
        )
        runs = json.loads(listed[listed.index("{") :])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], runs

        out = machines["server"] / run_config["output-dir"]  # relative to the SuperLink's folder
        summary = read_summary(out, [link, *nodes], deadline)
        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == run_config["num-rounds"], summary
        assert (out / "model.pt").is_file() and (out / "metrics.csv").is_file()
        assert all(node.running() for node in nodes), logs(nodes)
    finally:
        killed = stop_processes(procs)
        phases.mark("teardown")
        print(phases.report("docs/deployment.md, section 3"), *killed, sep="\n")

    # Whatever the guide made on a machine, in what stands for its checkout, git ignores.
    made = files_under(*machines.values())
    assert not_ignored_by_git(made) == [], made


@pytest.mark.parametrize("walkthrough", ["plain", "tls"])
def test_each_walkthrough_submits_to_the_superlink_its_config_names(walkthrough):
    """The run step's config file exists and its federation is the one the CLI was told of."""
    steps = {name: body for name, body in guide_steps().items() if name.startswith(walkthrough)}
    connections = tomllib.loads(steps[f"{walkthrough}-flwr-config"])["superlink"]
    run = re.search(
        r"flwr run \. (?P<name>\S+) --run-config (?P<file>\S+)", steps[f"{walkthrough}-run"]
    )
    assert run is not None, steps[f"{walkthrough}-run"]
    assert run["name"] in connections, (run["name"], connections)
    RunConfig.from_flower({**DEFAULTS, **tomllib.loads((ROOT / run["file"]).read_text())})
