"""Benchmark: one FedTAN round (E = 1, in-process engine) against one centralized SGD step.

Both train the same model on the same data: K clients x B CIFAR-shaped samples (3x32x32, 10
classes, float32, generated), and the centralized step takes the K*B-sample union batch with plain
torch BatchNorm. They compute the same update (tests/test_fedtan.py); this measures what the
synchronization costs. The two are interleaved, each timed ``--repeats`` times after one warm-up,
and the medians are compared. The round reuses its client models from round to round
(``ClientReplicas``), as a run of rounds does; ``--fresh`` also times rounds that copy the model
K times, as a single call of ``synced_round`` does. Two engines are timed side by side:
``fedtan_round``, the K clients as threads (``synced_round(..., batched=False)``), and
``fedtan_batched``, the K clients as one vmapped computation (``batched=True``, what
``synced_round`` runs by default when the clients' batches are equal).

Each ``--batch`` value is one regime, measured on its own and printed with its target (issue 14):
B = 2 is the overhead regime (compute negligible, every fixed cost per round visible: what a GPU
would show), target ratio <= 1.5; B = 128 the reference's batch, target <= 1.0.

    python scripts/bench_round.py --batch 2 128 --threads 1 --repeats 5
    python scripts/bench_round.py --device cuda --batch 2 128

On CUDA every timer read follows ``torch.cuda.synchronize()``, so the times include all the work
queued. The memory printed is what a run adds at its peak to what was in use when it started:
``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's peak resident set (Linux:
VmHWM, reset before each run; elsewhere the process's whole peak).

``--local`` also times K unsynchronized local steps of B samples in K threads (FedAvg's round
with E = 1), which separates the cost of the exchanges from the cost of running K threads.

Reading the numbers on a shared machine: wall time favours the round (its K threads get a larger
share of contended cores than the centralized step's intra-op threads), and CPU seconds include
OpenMP's spin-waiting, which inflates the centralized step under load; run with
OMP_WAIT_POLICY=PASSIVE to compare CPU work without the spinning.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common.experiment.models import build_model
from common.fedtan import ClientReplicas, synced_round

NUM_CLASSES = 10
# Issue 14's targets for the ratio round / centralized step, by samples per client.
TARGETS = {2: 1.5, 128: 1.0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=5, help="K, clients per round")
    p.add_argument(
        "--batch", type=int, nargs="+", default=[2, 128], help="B, samples per client (regimes)"
    )
    p.add_argument("--model", default="resnet20", help="a common.models.build_model name")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local", action="store_true", help="also time K unsynced local steps")
    p.add_argument("--fresh", action="store_true", help="also time rounds without replicas")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where clients and the centralized step train (default: cuda if present)",
    )
    return p.parse_args()


def centralized_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    """One SGD step on the union batch, with a fresh optimizer (as FedTAN makes every round)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def local_steps_in_threads(model: nn.Module, batches, lr: float) -> None:
    """K plain local steps in K threads, no synchronization: FedAvg with E = 1."""
    clients = [copy.deepcopy(model) for _ in batches]
    threads = [
        threading.Thread(target=centralized_step, args=(c, x, y, lr))
        for c, ((x, y),) in zip(clients, batches, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Clock:
    """Wall and CPU seconds of one call, all queued device work included, and its peak memory
    above what was in use when it started (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        self._sync()
        start_mib = self._reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self._sync()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall, cpu, self._peak_mib() - start_mib

    def _reset_peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _reset_peak_rss()

    def _peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _proc_status_mib("VmHWM")


def _reset_peak_rss() -> float:
    """Reset the peak resident set to the current one (Linux), and return that."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mib("VmRSS")
    except OSError:  # no reset: the peak is the process's, measured from zero
        return 0.0


def _proc_status_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_average() -> str:
    """The machine's 1-minute load average: how shared it was while the rows were measured."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except OSError:  # not available on this platform
        return "load average unknown"


def bench_regime(args: argparse.Namespace, batch: int, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    model = build_model(args.model, in_channels=3, num_classes=NUM_CLASSES).to(device)
    g = torch.Generator().manual_seed(args.seed)
    batches = [
        [
            (
                torch.randn(batch, 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (batch,), generator=g).to(device),
            )
        ]
        for _ in range(args.clients)
    ]
    x = torch.cat([b[0][0] for b in batches])
    y = torch.cat([b[0][1] for b in batches])
    loss_fn = nn.CrossEntropyLoss()
    central_model = copy.deepcopy(model)
    replicas = ClientReplicas(model)

    def fedtan_round(batched: bool) -> None:
        synced_round(model, batches, loss_fn, lr=args.lr, replicas=replicas, batched=batched)

    runs = {
        "fedtan_round": lambda: fedtan_round(batched=False),
        "fedtan_batched": lambda: fedtan_round(batched=True),
        "centralized_step": lambda: centralized_step(central_model, x, y, args.lr),
    }
    if args.fresh:
        runs["fedtan_round_fresh"] = lambda: synced_round(model, batches, loss_fn, lr=args.lr)
    if args.local:
        runs["local_threads"] = lambda: local_steps_in_threads(model, batches, args.lr)

    print(
        f"\nmodel={args.model} clients={args.clients} batch={batch} "
        f"union={args.clients * batch} float32 E=1 repeats={args.repeats} device={device} "
        f"{_load_average()}"
    )
    clock = Clock(device)
    for fn in runs.values():  # one warm-up each (it also makes the replicas)
        clock(fn)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that a load change hits both
        for name, fn in runs.items():
            times[name].append(clock(fn))

    wall = {name: statistics.median(w for w, _, _ in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c, _ in ts) for name, ts in times.items()}
    memory = "max_memory_allocated" if device.type == "cuda" else "RSS"
    for name, ts in times.items():
        runs_s = " ".join(f"{w:.3f}" for w, _, _ in ts)
        peak = max(m for _, _, m in ts)
        print(
            f"{name:>18}: median {wall[name]:.4f} s wall, {cpu[name]:.4f} s CPU, "
            f"peak +{peak:.0f} MiB {memory}   (wall runs: {runs_s})"
        )
    print(f"{'':>18}  after the runs: {_load_average()}")
    target = TARGETS.get(batch)
    for engine in ("fedtan_round", "fedtan_batched"):
        ratio = wall[engine] / wall["centralized_step"]
        verdict = (
            "no target for this batch" if target is None
            else f"target <= {target}: {'OK' if ratio <= target else 'ABOVE TARGET'}"
        )  # fmt: skip
        print(f"ratio {engine:>14} / centralized_step = {ratio:.3f} wall  ({verdict})")
        cpu_ratio = cpu[engine] / cpu["centralized_step"]
        print(f"{'':46}{cpu_ratio:.3f} CPU")
    if args.fresh:
        print(
            "ratio fedtan_round_fresh / centralized_step = "
            f"{wall['fedtan_round_fresh'] / wall['centralized_step']:.3f} wall"
        )
    if args.local:
        print(
            "ratio fedtan_round / local_threads    = "
            f"{wall['fedtan_round'] / wall['local_threads']:.3f} wall  (cost of the exchanges)"
        )


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
        f"os.cpu_count()={os.cpu_count()}, {platform.processor() or platform.machine()}"
    )
    if device.type == "cuda":
        print(
            f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, "
            f"TF32 matmul={torch.backends.cuda.matmul.allow_tf32} "
            f"cudnn={torch.backends.cudnn.allow_tf32}"
        )
    for batch in args.batch:
        bench_regime(args, batch, device)


if __name__ == "__main__":
    main()
