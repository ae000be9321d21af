"""Benchmark: one FedTAN round (E = 1, in-process engine) against one centralized SGD step.

Both train the same model on the same data: K clients x B CIFAR-shaped samples (3x32x32, 10
classes, float32, generated), and the centralized step takes the K*B-sample union batch with plain
torch BatchNorm. They compute the same update (tests/test_fedtan.py); this measures what the
synchronization costs. The two are interleaved, each timed ``--repeats`` times after one warm-up,
and the medians are compared (target: ratio <= 1.2).

    python scripts/bench_round.py --clients 5 --batch 128 --model resnet20 --repeats 3

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
import statistics
import threading
import time

import torch
from torch import nn

from common.experiment.models import build_model
from common.fedtan import synced_round

NUM_CLASSES = 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=5, help="K, clients per round")
    p.add_argument("--batch", type=int, default=128, help="B, samples per client")
    p.add_argument("--model", default="resnet20", help="a common.models.build_model name")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local", action="store_true", help="also time K unsynced local steps")
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


def timed(fn) -> tuple[float, float]:
    """Wall-clock seconds, and CPU seconds of this process (all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model, in_channels=3, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(args.seed)
    batches = [
        [(torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,)))]
        for _ in range(args.clients)
    ]
    x = torch.cat([b[0][0] for b in batches])
    y = torch.cat([b[0][1] for b in batches])
    loss_fn = nn.CrossEntropyLoss()
    central_model = copy.deepcopy(model)

    runs = {
        "fedtan_round": lambda: synced_round(model, batches, loss_fn, lr=args.lr),
        "centralized_step": lambda: centralized_step(central_model, x, y, args.lr),
    }
    if args.local:
        runs["local_threads"] = lambda: local_steps_in_threads(model, batches, args.lr)

    print(
        f"model={args.model} clients={args.clients} batch={args.batch} "
        f"union={args.clients * args.batch} float32 E=1 repeats={args.repeats}"
    )
    print(
        f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
        f"os.cpu_count()={os.cpu_count()}, {platform.processor() or platform.machine()}"
    )
    for fn in runs.values():  # one warm-up each
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that a load change hits both
        for name, fn in runs.items():
            times[name].append(timed(fn))

    wall = {name: statistics.median(w for w, _ in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
    for name, ts in times.items():
        runs_s = " ".join(f"{w:.3f}" for w, _ in ts)
        print(
            f"{name:>18}: median {wall[name]:.3f} s wall, {cpu[name]:.3f} s CPU   "
            f"(wall runs: {runs_s})"
        )
    ratio = wall["fedtan_round"] / wall["centralized_step"]
    verdict = "OK" if ratio <= 1.2 else "ABOVE TARGET"
    print(f"ratio fedtan_round / centralized_step = {ratio:.3f} wall  (target <= 1.2: {verdict})")
    cpu_ratio = cpu["fedtan_round"] / cpu["centralized_step"]
    print(f"{'':40}{cpu_ratio:.3f} CPU")
    if args.local:
        print(
            "ratio fedtan_round / local_threads    = "
            f"{wall['fedtan_round'] / wall['local_threads']:.3f} wall  (cost of the exchanges)"
        )


if __name__ == "__main__":
    main()
