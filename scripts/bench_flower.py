"""Benchmark (not a test): the time of a FedTAN round in-process vs. in Flower's Ray simulation.

For one small config it prints, measured in the same run on the same machine: seconds per round
of the in-process engine and of the Flower simulation for each transport (Flower messages, the
gRPC BN sync channel), their ratio, the sequential server round trips per round and the bytes
per round beyond the model itself.

    python scripts/bench_flower.py --clients 3 --rounds 5 --transports messages grpc

``--gpus-per-client X`` (X > 0) gives every simulated client a GPU share through Ray and runs the
in-process row on the GPU too, so that all rows train on the same device; without it all rows
run on the CPU (Ray hides the GPU from actors without a share). On CUDA the in-process timer
reads follow ``torch.cuda.synchronize()``.

Rounds after the first are timed (the first pays for process start-up and imports); evaluation
only runs after the last round, which is excluded too, unless ``--eval-interval K`` asks for the
global model's evaluation every K rounds, as a run does: then every row pays for it, the
in-process row after its round, the simulated rows as the ServerApp does it (in a block of
rounds, R > 1, while the clients train the next round). A round's time is its ``seconds`` in the
run's metrics: from the previous round's end to its own, so the server's bookkeeping between
rounds (recording, sampling) counts, as it does for the run. ``s/round`` is the median of those
rounds, ``mean`` their mean: with ``--rounds-per-message R`` (R rounds per Flower message, for
the grpc rows) a block's first and last rounds carry its Flower message and reply, so the mean,
which includes them, is the figure to compare.

With ``--deployment`` it also runs the same config deployed, as FedAvg + BN (the floor: a round
with no BN sync) and for each transport, and prints each FedTAN row against FedAvg + BN: one
``flower-superlink`` and one ``flower-supernode`` per client on 127.0.0.1 (plaintext, a
throw-away FLWR_HOME; every process is stopped at the end, also on failure), timed from the
run's metrics.csv like the simulation; and, if grpc is among the transports, the latency of one
exchange of the BN sync channel (scripts/bench_bn_channel.py, client threads on loopback).
Deployed, every Flower message starts a fresh ClientApp process and waits for Flower's polling:
about 6 s per exchange, so the messages transport takes minutes per round.

Beside the seconds, every row's CPU per round (the same timed rounds' mean): the run's processes
read from /proc while it runs (``CpuMeter``), as clients, the ServerApp process (with the BN sync
service) and Flower's and Ray's own, and the machine's; and the ``floor`` that CPU sets under
the row's mean ratio: all of it spread over this machine's cores, against the in-process mean.
The CPU moves with a shared host too (by half between runs here, with the hypervisor's steal),
but within a run the floor tells how much of a row's time is CPU, which only less work can cut,
and how much is waiting, which better overlap could: a floor above a target says the target
needs less CPU. Only the host's CPU is counted, not a GPU's time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.experiment import task  # noqa: E402
from common.experiment.config import RunConfig  # noqa: E402
from common.fedtan import ClientReplicas  # noqa: E402
from server.processes import (  # noqa: E402
    Deadline,
    ManagedProcess,
    adopt_process,
    flower_env,
    free_ports,
    logs,
    process_table,
    start_flwr_run,
    start_local_deployment,
    stop_processes,
    wait_for_file,
    write_run_config,
)

# Deployed, a client's ClientApp is a fresh process per message (a torch import): on a loaded
# machine it can join the round's BN sync tens of seconds after its peers (tests/test_multihost).
DEPLOYMENT_BN_SYNC_TIMEOUT = 120.0
# A run's processes by what their command line names; the rest are Flower's and Ray's own
# (SuperLink, SuperExec, SuperNodes, flwr, Ray's daemons).
CPU_GROUPS = {
    "clients": ("ray::ClientAppActor", "flwr-clientapp"),
    # The ServerApp with the BN sync service; in simulation also Flower's engine and Ray's driver.
    "ServerApp": ("flwr-simulation", "flwr-serverapp"),
}
CPU_REST = "Flower, Ray"
CPU_COLUMNS = ("all", *CPU_GROUPS, CPU_REST, "machine", "steal")
CPU_SAMPLE_S = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument(
        "--transports",
        nargs="*",
        default=["messages", "grpc"],
        help="simulated (and deployed) transports; none: the in-process row only",
    )
    parser.add_argument(
        "--rounds-per-message",
        type=int,
        default=1,
        help="run config rounds-per-message of the grpc rows (R > 1: blocks of R rounds)",
    )
    parser.add_argument(
        "--bn-sync-protocols",
        nargs="+",
        default=["grpc"],
        choices=["grpc", "socket"],
        help="run config bn-sync-protocol of the grpc rows: one row each (what carries the BN "
        "sync service's calls: gRPC, or framed messages on a socket)",
    )
    parser.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help="evaluate the global model every K rounds in every row (default: only after the "
        "last round, which is not timed)",
    )
    parser.add_argument(
        "--project",
        type=int,
        default=10_000,
        help="also print each row's wall time for this many rounds (default 10,000)",
    )
    parser.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="Ray's client-resources-num-gpus; > 0 puts the clients, and the in-process row, on "
        "the GPU (at most 1/K, so that all K clients of a round run at once)",
    )
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="also run each transport deployed: a SuperLink and K SuperNodes on 127.0.0.1",
    )
    parser.add_argument(
        "--fedavg-floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run FedAvg + BN deployed, the floor the deployed rows are compared with "
        "(--no-fedavg-floor: skip it, e.g. for many rounds in blocks, which FedAvg cannot run)",
    )
    parser.add_argument(
        "--client-threads",
        type=int,
        default=None,
        help="deployed: OMP_NUM_THREADS of the SuperLink, the SuperNodes and their apps "
        "(default: torch's own, every core each); 1 is what Ray gives each simulated client, "
        "and what K clients sharing a small machine need (their threads otherwise contend at "
        "every BN sync)",
    )
    parser.add_argument(
        "--deployment-timeout",
        type=float,
        default=1800.0,
        help="seconds each deployed run may take, start-up included (default 1800)",
    )
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (the first and last rounds are not timed)")

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config = {
        **defaults,
        "dataset": args.dataset,
        "model": args.model,
        "num-clients": args.clients,
        "batch-size": args.batch,
        "local-steps": args.local_steps,
        "num-rounds": args.rounds,
        "eval-interval": args.eval_interval or args.rounds,
    }
    # Clients get a GPU only with a GPU share; the device is named explicitly (run config
    # "device") rather than left to Ray's CUDA_VISIBLE_DEVICES.
    device = torch.device("cuda" if args.gpus_per_client > 0 else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--gpus-per-client > 0 needs a GPU, and torch sees none")
    run_config["device"] = device.type
    cfg = RunConfig.from_flower(run_config)
    seconds, mean, cpu, peak = in_process_seconds(cfg, device)
    rows = [(f"in-process engine ({device})", seconds, {"mean": mean, "cpu": {"all": cpu}})]
    variants = [
        (t, protocol)
        for t in args.transports
        for protocol in (args.bn_sync_protocols if t == "grpc" else ["grpc"])
    ]
    for transport, protocol in variants:
        seconds, costs = simulation_seconds(
            transport_config(run_config, transport, args.rounds_per_message, protocol),
            args.clients,
            args.gpus_per_client,
        )
        rows.append((f"Flower simulation, {row_name(transport, protocol, args)}", seconds, costs))
    failed = []
    if args.deployment:
        # FedAvg + BN on the same config: a deployed round with no BN sync at all, the floor a
        # FedTAN round is measured against.
        deployed = []
        if args.fedavg_floor:
            deployed.append(("Flower deployment, fedavg-bn", {**run_config, "method": "fedavg-bn"}))
        deployed += [
            (
                f"Flower deployment, {row_name(t, protocol, args)}",
                transport_config(run_config, t, args.rounds_per_message, protocol),
            )
            for t, protocol in variants
        ]
        for name, config in deployed:
            if config["method"] == "fedtan" and config["transport"] == "grpc":
                timeout = max(float(config["bn-sync-timeout"]), DEPLOYMENT_BN_SYNC_TIMEOUT)
                config["bn-sync-timeout"] = timeout
            try:
                seconds, costs = deployment_seconds(
                    config, args.clients, args.deployment_timeout, args.client_threads
                )
            except Exception as error:  # noqa: BLE001 - reported, the other rows still print
                print(f"{name} failed: {error}", file=sys.stderr)
                failed.append(name)
                seconds, costs = float("nan"), {}
            rows.append((name, seconds, costs))

    base, base_mean = rows[0][1], rows[0][2]["mean"]
    print(
        f"\n{args.clients} clients, {args.model} on {args.dataset}, batch {args.batch}, "
        f"E={args.local_steps}; median and mean of rounds 2..{args.rounds - 1}"
    )
    print(
        f"{'mode':60} {'s/round':>9} {'ratio':>7} {'mean':>7} {'ratio':>7} {'trips':>6} "
        f"{'BN up B':>9} {'BN down B':>10} {'model B':>10}"
    )
    for name, seconds, cost in rows:
        mean = cost.get("mean", float("nan"))
        print(
            f"{name:60} {seconds:9.3f} {seconds / base:7.2f} {mean:7.3f} {mean / base_mean:7.2f} "
            f"{cost.get('round_trips', 0):6.0f} {cost.get('bn_bytes_up', 0):9.0f} "
            f"{cost.get('bn_bytes_down', 0):10.0f} {cost.get('model_bytes', 0):10.0f}"
        )
    print(
        "BN bytes of the grpc transport travel over the BN sync service, not Flower: "
        "they are not in the columns above."
    )
    if args.deployment and args.fedavg_floor:
        floor = next(seconds for name, seconds, _ in rows if name.endswith("fedavg-bn"))
        for name, seconds, _ in rows:
            if name.startswith("Flower deployment, transport="):
                print(f"{name}: {seconds / floor:.2f}x a deployed FedAvg+BN round")
    print_cpu(rows, base_mean)
    if peak is not None:
        print(f"peak GPU memory of the in-process engine: {peak / 2**20:.0f} MiB")
    if args.project:
        print(f"projected wall time of {args.project} rounds (s/round x {args.project}):")
        for name, seconds, _ in rows:
            print(f"  {name:60} {seconds * args.project / 3600:8.2f} h")
    if args.deployment and "grpc" in args.transports:
        print_channel_latency(RunConfig.from_flower(run_config), args.clients)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def print_cpu(rows: list[tuple[str, float, dict]], base_mean: float) -> None:
    """Each row's mean CPU per round by group, and the floor it sets under the row's mean
    ratio: all its CPU spread over this machine's cores, against the in-process mean."""
    cores = len(os.sched_getaffinity(0))
    print(
        f"\nCPU per round, ms (mean of the timed rounds; from /proc every {CPU_SAMPLE_S:g} s; "
        f"{cores} cores). floor: the mean ratio this CPU allows at best, all of it spread over "
        "the cores"
    )
    print(f"{'mode':60}" + "".join(f"{c:>12}" for c in CPU_COLUMNS) + f"{'floor':>8}")
    for name, _, cost in rows:
        cpu = cost.get("cpu", {})
        cells = "".join(f"{1e3 * cpu[c]:12.1f}" if c in cpu else f"{'-':>12}" for c in CPU_COLUMNS)
        floor = cpu["all"] / cores / base_mean if "all" in cpu else float("nan")
        print(f"{name:60}{cells}{floor:8.2f}")


def transport_config(
    run_config: dict, transport: str, rounds_per_message: int, protocol: str = "grpc"
) -> dict:
    """``run_config`` with ``transport``; blocks of rounds and the BN sync protocol for grpc
    (the only transport that has them)."""
    blocks = rounds_per_message if transport == "grpc" else 1
    return {
        **run_config,
        "transport": transport,
        "rounds-per-message": blocks,
        "bn-sync-protocol": protocol,
    }


def row_name(transport: str, protocol: str, args: argparse.Namespace) -> str:
    name = f"transport={transport}"
    if transport == "grpc" and args.rounds_per_message > 1:
        name += f", rounds-per-message={args.rounds_per_message}"
    return name + (", socket" if protocol == "socket" else "")


def in_process_seconds(
    cfg: RunConfig, device: torch.device
) -> tuple[float, float, float, int | None]:
    """Seconds per round of the in-process engine (median and mean, as ``timed_rounds``), its
    clients on ``device`` like the app's, the mean CPU seconds of its rounds (this process), and
    its peak CUDA memory in bytes (None on the CPU). A round that run config ``eval-interval``
    divides includes the global model's evaluation."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = task.build_global_model(cfg).to(device)
    replicas = ClientReplicas(model)  # a run of rounds keeps its client models
    times, cpu = [], []
    for r in range(1, cfg.num_rounds + 1):
        batches = [
            [(x.to(device), y.to(device)) for x, y in client]
            for client in task.every_client_batches(cfg, cfg.num_clients, r)
        ]
        _synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        model.load_state_dict(task.engine_round(model, cfg, batches, r, replicas))
        if r % cfg.eval_interval == 0:
            task.evaluate(model, cfg, device)
            model.train()
        _synchronize(device)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    timed = slice(1, -1)
    return (
        statistics.median(times[timed]),
        statistics.mean(times[timed]),
        statistics.mean(cpu[timed]),
        peak,
    )


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``, so that a timer read includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def simulation_seconds(
    run_config: dict, clients: int, gpus_per_client: float = 0.0
) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        config_file = Path(tmp) / "run.toml"
        run_config = {**run_config, "output-dir": str(out)}
        config_file.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items()))
        http_port, control_port = free_ports(2)
        env = {
            **os.environ,
            "FLWR_HOME": str(Path(tmp) / "flwr-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }
        # Every client of a round must run at once for the gRPC channel: one Ray actor each.
        extra = f"init-args-num-cpus={clients}"
        if gpus_per_client > 0:
            extra += f" client-resources-num-gpus={gpus_per_client} init-args-num-gpus=1"
        with CpuMeter(out / "metrics.jsonl") as meter:
            subprocess.run(
                [str(ROOT / "scripts/run_simulation.sh"), str(config_file), str(clients), extra],
                env=env,
                cwd=ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        return timed_rounds(out / "metrics.csv", meter)


def deployment_seconds(
    run_config: dict, clients: int, timeout: float, client_threads: int | None = None
) -> tuple[float, dict[str, float]]:
    """Run ``run_config`` on a SuperLink and ``clients`` SuperNodes on 127.0.0.1; its costs.
    ``client_threads``: OMP_NUM_THREADS of every deployed process (the apps inherit it)."""
    deadline = Deadline(timeout)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out, log_dir = tmp / "out", tmp / "logs"
        env = flower_env(tmp / "flwr-home")
        if client_threads is not None:
            env = {**env, "OMP_NUM_THREADS": str(client_threads)}
        run_toml = write_run_config(tmp / "run.toml", {**run_config, "output-dir": str(out)})
        procs: list[ManagedProcess] = []
        try:
            with CpuMeter(out / "metrics.jsonl") as meter:
                link, nodes = start_local_deployment(
                    clients, env=env, log_dir=log_dir, cwd=tmp, deadline=deadline, procs=procs
                )
                flwr = start_flwr_run(
                    "deployment", run_toml, env=env, log_dir=log_dir, app_dir=ROOT
                )
                procs.append(flwr)
                try:
                    code = flwr.popen.wait(timeout=deadline.remaining())
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"not done within {timeout:.0f} s\n" + logs(procs)) from None
                if code != 0:
                    raise RuntimeError(f"flwr run exited with {code}\n" + logs(procs))
                summary_file = wait_for_file(
                    out / "summary.json",
                    timeout=deadline.remaining(at_most=60),
                    procs=[link, *nodes],
                )
            summary = json.loads(summary_file.read_text())
            if summary["status"] != "completed":
                raise RuntimeError(f"run not completed: {summary}\n" + logs(procs))
            return timed_rounds(out / "metrics.csv", meter)
        finally:
            for line in stop_processes(procs):
                print(line, file=sys.stderr)


class CpuMeter:
    """CPU seconds of this process's descendants by group (``CPU_GROUPS``), and of the machine,
    sampled every ``CPU_SAMPLE_S`` with the rows of a run's metrics log so far: the CPU a round
    costs is read off between two samples. All of a run's CPU over the cores is a floor under
    its rounds' wall time.

    A process that exits keeps what it had used at the last sample (at most one interval of its
    CPU is missed). The meter's own reads count only in the machine's column.
    """

    def __init__(self, metrics_log: Path) -> None:
        self._log, self._log_offset, self._rows = metrics_log, 0, 0
        self._family = adopt_process(os.getpid(), name="benchmark")  # itself excluded
        self._used: dict[int, tuple[str, float]] = {}  # pid -> (group, its CPU seconds so far)
        self.samples: list[tuple[int, dict[str, float]]] = []  # (rows logged, CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def per_round(self, first: int, last: int) -> dict[str, float]:
        """Mean CPU seconds per round of rounds ``first``..``last`` (from the first sample once
        round ``first - 1`` was logged to the last before round ``last + 1`` was), by
        ``CPU_COLUMNS``; empty when fewer than two samples fall there."""
        inside = [(rows, cpu) for rows, cpu in self.samples if first - 1 <= rows <= last]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return {}
        (rows0, cpu0), (rows1, cpu1) = inside[0], inside[-1]
        return {k: (cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / (rows1 - rows0) for k in CPU_COLUMNS}

    def _run(self) -> None:
        while not self._stop.wait(CPU_SAMPLE_S):
            self.samples.append(self._sample())

    def _sample(self) -> tuple[int, dict[str, float]]:
        table = process_table()
        for pid in self._family.refresh(table):  # one that exited keeps its last sample's
            self._used[pid] = (_cpu_group(table[pid].cmdline), table[pid].cpu_seconds)
        cpu: dict[str, float] = defaultdict(float)
        for group, used in self._used.values():
            cpu[group] += used
        cpu["all"] = sum(cpu.values())
        cpu["machine"], cpu["steal"] = _machine_cpu_seconds()
        return self._rows_logged(), cpu

    def _rows_logged(self) -> int:
        try:
            with open(self._log, "rb") as f:
                f.seek(self._log_offset)
                new = f.read()
        except FileNotFoundError:
            return 0
        # Complete lines only: a row being appended counts once its newline is there.
        end = new.rfind(b"\n") + 1
        self._rows += new.count(b"\n", 0, end)
        self._log_offset += end
        return self._rows


def _cpu_group(cmdline: str) -> str:
    groups = (group for group, names in CPU_GROUPS.items() if any(n in cmdline for n in names))
    return next(groups, CPU_REST)


def _machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the machine has spent busy (every process, the kernel's interrupts) and
    stolen by its hypervisor, since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def timed_rounds(metrics_csv: Path, meter: CpuMeter) -> tuple[float, dict]:
    """Median seconds and costs per round, of the rounds after the first, without the last;
    (``mean``) the mean seconds of those rounds, and (``cpu``) their mean CPU by group."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    timed = rows[1:-1]
    keys = ("seconds", "round_trips", "bn_bytes_up", "bn_bytes_down", "model_bytes")
    cost = {k: statistics.median(float(row[k]) for row in timed) for k in keys}
    cost["mean"] = statistics.mean(float(row["seconds"]) for row in timed)
    cost["cpu"] = meter.per_round(2, len(rows) - 1)
    return cost.pop("seconds"), cost


def print_channel_latency(cfg: RunConfig, clients: int) -> None:
    """One exchange of the BN sync channel on loopback over each carrier (gRPC, socket), from
    scripts/bench_bn_channel.py."""
    bn = [m for m in task.build_global_model(cfg).modules() if isinstance(m, _BatchNorm)]
    if not bn:
        return
    channels = max(m.num_features for m in bn)
    cmd = [sys.executable, str(ROOT / "scripts/bench_bn_channel.py"), "--clients", str(clients)]
    cmd += ["--channels", str(channels), "--exchanges", "300", "--warmup", "30", "--skip-step"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if result.returncode != 0:
        print(f"scripts/bench_bn_channel.py failed:\n{result.stderr}", file=sys.stderr)
        return
    print(
        f"\ngrpc transport: a round makes 2L = {2 * len(bn)} exchanges over the BN sync "
        f"service; one exchange (scripts/bench_bn_channel.py, {' '.join(cmd[2:])}):"
    )
    print(result.stdout.rstrip())


def _toml(value: object) -> str:
    return (
        f'"{value}"'
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else repr(value)
    )


if __name__ == "__main__":
    main()
