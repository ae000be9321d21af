"""Soak benchmark (not a test): a long FedTAN run in Flower's Ray simulation, checked for growth.

Runs the digits config (5 clients, small_cnn, transport "grpc", one Ray actor per client) for
``--rounds`` rounds (default 2,000) and prints, from the run's own metrics and the process
table: seconds per round over the run, the resident memory (RSS) of the server side (the
simulation process that runs the ServerApp, and the SuperLink) and of the clients (the Ray
actors) at the start and the end, and the output folder's size.

"Flat" means: the median round time of the last 100 rounds within 10 % of rounds 100-200's, and
each side's memory at the end within 10 % of its memory at round 100 (the first rounds load
data, build caches and warm up the allocator, so they are not the baseline). With fewer than
300 rounds the baselines are the rounds after the first tenth.

    python scripts/soak.py --rounds 2000
    python scripts/soak.py --rounds 300 --clients 3      # shorter, on a small machine

Every Flower and Ray process it starts is stopped at the end, also on failure and Ctrl-C. Exits
non-zero when the run does not complete; growth is reported, not an error.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.processes import (  # noqa: E402
    Deadline,
    ManagedProcess,
    adopt_local_superlinks,
    local_superlink_env,
    logs,
    process_table,
    start_flwr_run,
    stop_processes,
    write_flower_config,
    write_run_config,
)

FLAT_TOLERANCE = 0.10  # "flat": within 10 % of the baseline window
CLIENT_ACTOR = "ray::ClientAppActor"
# The SuperLink, and the processes it starts that run the ServerApp (not Ray's own daemons).
SERVER_SIDE = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp")


@dataclass
class MemorySample:
    round: int  # rounds completed when sampled
    server_rss: int  # bytes: the ServerApp's simulation process and the SuperLink
    client_rss: int  # bytes: every Ray client actor together
    clients: int  # how many actors were seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-interval", type=int, default=10, help="rounds between evaluations")
    parser.add_argument("--out", type=Path, help="keep the run's output folder here")
    parser.add_argument(
        "--timeout", type=float, default=6 * 3600.0, help="seconds the whole run may take"
    )
    parser.add_argument(
        "--sample-seconds", type=float, default=5.0, help="seconds between memory samples"
    )
    args = parser.parse_args()
    if args.rounds < 20:
        parser.error("--rounds must be >= 20")
    with tempfile.TemporaryDirectory(prefix="fedtan-soak-") as tmp:
        out = args.out.resolve() if args.out else Path(tmp) / "out"
        if out.exists():
            parser.error(f"--out {out} exists: give a new folder")
        samples = run_soak(args, Path(tmp), out)
        report(args, out, samples)


def run_soak(args: argparse.Namespace, tmp: Path, out: Path) -> list[MemorySample]:
    """Run the simulation to its end, sampling memory; the Flower processes stopped after."""
    home = tmp / "flwr-home"
    env = local_superlink_env(home)
    write_flower_config(home, {"local": {"address": ":local:"}})
    run_config = {
        "dataset": "digits",
        "partition": "sorted",
        "model": "small_cnn",
        "num-clients": args.clients,
        "batch-size": args.batch,
        "num-rounds": args.rounds,
        "eval-interval": args.eval_interval,
        "transport": "grpc",
        "output-dir": str(out),
    }
    run_toml = write_run_config(tmp / "run.toml", run_config)
    federation = (
        f"num-supernodes={args.clients} client-resources-num-cpus=1 "
        f"init-args-num-cpus={args.clients}"
    )
    deadline = Deadline(args.timeout)
    procs: list[ManagedProcess] = []
    samples: list[MemorySample] = []
    try:
        flwr = start_flwr_run(
            "local",
            run_toml,
            env=env,
            log_dir=tmp / "logs",
            app_dir=ROOT,
            federation_config=federation,
        )
        procs.append(flwr)
        link = None
        last_print = 0.0
        while flwr.running():
            if deadline.remaining() <= 0:
                raise RuntimeError(f"not done within {args.timeout:.0f} s\n" + logs(procs))
            if link is None and (found := adopt_local_superlinks(home)):
                link = found[0]
                procs.append(link)
            done = rounds_done(out)
            if link is not None and done > 0:
                samples.append(memory_sample(link, done))
                if time.monotonic() - last_print > 60:
                    last_print = time.monotonic()
                    print(_sample_line(samples[-1]), flush=True)
            time.sleep(args.sample_seconds)
        if flwr.returncode() != 0:
            raise RuntimeError(f"flwr run exited with {flwr.returncode()}\n" + logs(procs))
    except KeyboardInterrupt:
        print("interrupted: stopping the Flower processes", file=sys.stderr)
        raise
    finally:
        procs += adopt_local_superlinks(home, procs)
        for line in stop_processes(procs):
            print(line, file=sys.stderr)
    completed = rounds_done(out)
    if completed != args.rounds:
        sys.exit(f"the run completed {completed} of {args.rounds} rounds\n" + logs(procs))
    return samples


def rounds_done(out: Path) -> int:
    """Rounds completed so far (summary.json is rewritten every round; metrics.csv lags)."""
    try:
        return int(json.loads((out / "summary.json").read_text())["rounds_completed"])
    except (OSError, ValueError, KeyError):  # not written yet
        return 0


def memory_sample(link: ManagedProcess, done: int) -> MemorySample:
    """RSS of the SuperLink's family, split into client actors and the rest (server side)."""
    table = process_table()
    server = client = actors = 0
    for pid in link.refresh(table):
        rss = _rss_bytes(pid)
        if table[pid].cmdline.startswith(CLIENT_ACTOR):
            client += rss
            actors += 1
        elif any(name in table[pid].cmdline for name in SERVER_SIDE):
            server += rss
    return MemorySample(done, server, client, actors)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # it exited meanwhile
        pass
    return 0


def report(args: argparse.Namespace, out: Path, samples: list[MemorySample]) -> None:
    with open(out / "metrics.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    n = len(seconds)
    base_lo, base_hi = (100, 200) if n >= 300 else (n // 10, n // 10 + max(1, n // 10))
    baseline = statistics.median(seconds[base_lo:base_hi])
    last = statistics.median(seconds[-100:])
    print(f"\nsoak: {n} rounds, {args.clients} clients, small_cnn on digits, grpc, Ray simulation")
    print("seconds per round (median of each window of 100):")
    for start in range(0, n, max(100, n // 20)):
        window = seconds[start : start + 100]
        print(f"  rounds {start + 1:5d}-{start + len(window):5d}: {statistics.median(window):.4f}")
    time_ratio = last / baseline
    print(
        f"rounds {base_lo + 1}-{base_hi}: {baseline:.4f} s, last 100: {last:.4f} s "
        f"({time_ratio:.3f}x)"
    )
    # Samples taken while every client actor was up: the last ones may follow the run's end.
    live = [s for s in samples if s.clients == args.clients] or samples
    start = next((s for s in live if s.round >= base_lo + 1), live[0])
    end = live[-1]
    print("resident memory (MB):")
    print(f"  {'':20} {'server side':>12} {'clients':>10}")
    for label, s in (("first sample", live[0]), ("baseline", start), ("end", end)):
        print(
            f"  {label:12} r{s.round:<5d} {s.server_rss / 2**20:12.1f} "
            f"{s.client_rss / 2**20:10.1f}  ({s.clients} actors)"
        )
    server_ratio = end.server_rss / max(1, start.server_rss)
    client_ratio = end.client_rss / max(1, start.client_rss)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"output folder {out}: {size / 2**20:.2f} MB")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(out)}: {p.stat().st_size / 1024:.1f} kB")
    flat = all(abs(r - 1) <= FLAT_TOLERANCE for r in (time_ratio, server_ratio, client_ratio))
    print(
        f"flat: {'yes' if flat else 'NO'} (time {time_ratio:.3f}x, server memory "
        f"{server_ratio:.3f}x, client memory {client_ratio:.3f}x; tolerance "
        f"{FLAT_TOLERANCE:.0%})"
    )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


def _sample_line(s: MemorySample) -> str:
    return (
        f"round {s.round}: server side {s.server_rss / 2**20:.0f} MB, "
        f"clients {s.client_rss / 2**20:.0f} MB ({s.clients} actors)"
    )


if __name__ == "__main__":
    main()
