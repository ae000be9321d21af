"""Benchmark (not a test): the time of a FedTAN round in-process vs. in Flower's Ray simulation.

For one small config it prints, measured in the same run on the same machine: seconds per round
of the in-process engine and of the Flower simulation for each transport (Flower messages, the
gRPC BN sync channel), their ratio, the sequential server round trips per round and the bytes
per round beyond the model itself.

    python scripts/bench_flower.py --clients 3 --rounds 5 --transports messages grpc

Rounds after the first are timed (the first pays for process start-up and imports); evaluation
only runs after the last round, which is excluded too.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import task  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.fedtan import synced_round  # noqa: E402
from tests.flower_processes import free_ports  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--transports", nargs="+", default=["messages", "grpc"])
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
        "eval-interval": args.rounds,
    }
    rows = [("in-process engine", in_process_seconds(RunConfig.from_flower(run_config)), {})]
    for transport in args.transports:
        seconds, costs = simulation_seconds({**run_config, "transport": transport}, args.clients)
        rows.append((f"Flower simulation, transport={transport}", seconds, costs))

    base = rows[0][1]
    print(
        f"\n{args.clients} clients, {args.model} on {args.dataset}, batch {args.batch}, "
        f"E={args.local_steps}; median of rounds 2..{args.rounds - 1}"
    )
    print(
        f"{'mode':42} {'s/round':>9} {'ratio':>7} {'trips':>6} {'BN up B':>9} "
        f"{'BN down B':>10} {'model B':>10}"
    )
    for name, seconds, cost in rows:
        print(
            f"{name:42} {seconds:9.3f} {seconds / base:7.2f} "
            f"{cost.get('round_trips', 0):6.0f} {cost.get('bn_bytes_up', 0):9.0f} "
            f"{cost.get('bn_bytes_down', 0):10.0f} {cost.get('model_bytes', 0):10.0f}"
        )
    print(
        "BN bytes of the grpc transport travel over the BN sync service, not Flower: "
        "they are not in the columns above."
    )


def in_process_seconds(cfg: RunConfig) -> float:
    model = task.build_global_model(cfg)
    times = []
    for r in range(1, cfg.num_rounds + 1):
        batches = task.union_batches(cfg, cfg.num_clients, r)
        started = time.perf_counter()
        model.load_state_dict(
            synced_round(
                model,
                batches,
                task.loss_fn,
                lr=cfg.lr_at(r),
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
            )
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:-1])


def simulation_seconds(run_config: dict, clients: int) -> tuple[float, dict[str, float]]:
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
        subprocess.run(
            [str(ROOT / "scripts/run_simulation.sh"), str(config_file), str(clients), extra],
            env=env,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(out / "metrics.csv") as f:
            rows = list(csv.DictReader(f))[1:-1]
    keys = ("seconds", "round_trips", "bn_bytes_up", "bn_bytes_down", "model_bytes")
    cost = {k: statistics.median(float(row[k]) for row in rows) for k in keys}
    return cost.pop("seconds"), cost


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
