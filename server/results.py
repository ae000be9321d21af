"""A run's output folder: per-round metrics (CSV and JSON), the global model, a summary.

The model file is replaced atomically after every complete round, so whatever stops the run,
the folder holds the global model of the last good round (FedBN, SiloBN: its shared entries;
the BN entries the clients keep are the initial ones there).

Every method writes the same per-round ``COLUMNS`` (then any extra ones, e.g. the spread of the
clients' accuracies when they evaluate): train loss (of each client's first step, weighted by
samples; the union batch's for FedTAN and centralized), test loss and accuracy (of the global
model; the clients' mean for FedBN and SiloBN; blank between ``eval-interval`` rounds), wall
seconds (training and evaluation), sequential round trips, bytes of the model (down and up
together) and of the extra BN statistics (down, up) of training, and round trips and bytes of
client-side evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.common import log
from flwr.serverapp.strategy import Result

from common.experiment.config import RunConfig

COLUMNS = (
    "round",
    "train-loss",
    "num-examples",
    "clients",
    "test-loss",
    "test-accuracy",
    "seconds",
    "round_trips",
    "model_bytes",
    "bn_bytes_down",
    "bn_bytes_up",
    "eval_round_trips",
    "eval_bytes",
)


class RunRecorder:
    """Writes what a run produced into ``cfg.output_dir``, round by round."""

    def __init__(self, cfg: RunConfig) -> None:
        self.dir = cfg.output_path
        self.dir.mkdir(parents=True, exist_ok=True)
        self.num_rounds = cfg.num_rounds
        self.method = cfg.method
        self.rows: list[dict[str, float]] = []
        self.started = time.monotonic()
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "milestones"}
        (self.dir / "config.json").write_text(json.dumps(config, indent=2))

    def __call__(self, server_round: int, result: Result, cost: dict[str, float]) -> None:
        row: dict[str, float] = {"round": server_round}
        row.update(result.train_metrics_clientapp.get(server_round, {}))
        row.update(result.evaluate_metrics_serverapp.get(server_round, {}))
        row.update(result.evaluate_metrics_clientapp.get(server_round, {}))
        row.update(cost)
        self.rows.append(row)
        self._write_metrics()
        _atomic_save(result.arrays.to_torch_state_dict(), self.dir / "model.pt")
        elapsed = time.monotonic() - self.started
        eta = elapsed / server_round * (self.num_rounds - server_round)
        accuracy = row.get("test-accuracy")
        log(
            INFO,
            "[%s round %d/%d] train-loss %.4f | test-accuracy %s | %.1f s | eta %.0f s",
            self.method,
            server_round,
            self.num_rounds,
            row.get("train-loss", float("nan")),
            "-" if accuracy is None else f"{accuracy:.4f}",
            row["seconds"],
            eta,
        )

    def finish(self, status: str, rounds_completed: int) -> None:
        summary = {
            "method": self.method,
            "status": status,
            "rounds_completed": rounds_completed,
            "final": self.rows[-1] if self.rows else None,
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def _write_metrics(self) -> None:
        (self.dir / "metrics.json").write_text(json.dumps(self.rows, indent=2))
        fields = list(dict.fromkeys([*COLUMNS, *(key for row in self.rows for key in row)]))
        with open(self.dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


def _atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
