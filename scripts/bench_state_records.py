"""Benchmark of a model state's conversion to and from a Flower ArrayRecord (not a test).

Flower's own conversions (``ArrayRecord(state)``, ``record.to_torch_state_dict()``) against
``common/state_records.py`` (the same bytes, the same tensors), side by side in one run, for
each ``--models``: milliseconds per conversion (median of ``--repeats``) and the ratio. The
server makes one of each per round between a block's rounds (and decodes every reply with
R = 1), so on a fast device this is time every client waits.

    python scripts/bench_state_records.py [--models small_cnn resnet20] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from common.experiment import task  # noqa: E402
from common.experiment.config import RunConfig  # noqa: E402
from common.state_records import record_to_state, state_to_record  # noqa: E402


def median_ms(job: Callable[[], object], repeats: int) -> float:
    job()  # warm-up: caches, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet20"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("model       entries  conversion      Flower ms  ours ms  ratio")
    for model in args.models:
        dataset = "digits" if model == "small_cnn" else "synthetic"
        cfg = RunConfig.from_flower({"dataset": dataset, "model": model, "num-clients": 2})
        state = task.build_global_model(cfg).state_dict()
        record = ArrayRecord(state)
        rows = [
            ("to record", partial(ArrayRecord, state), partial(state_to_record, state)),
            ("from record", record.to_torch_state_dict, partial(record_to_state, record)),
        ]
        for name, flowers, ours in rows:
            theirs_ms, ours_ms = median_ms(flowers, args.repeats), median_ms(ours, args.repeats)
            print(
                f"{model:<11} {len(state):>7}  {name:<14} {theirs_ms:>9.2f}  {ours_ms:>7.2f}  "
                f"{ours_ms / theirs_ms:>5.2f}x"
            )


if __name__ == "__main__":
    main()
