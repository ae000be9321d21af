"""A self-describing checkpoint: the global model plus what it takes to rebuild and evaluate it.

``model.pt`` in a run folder (and every ``checkpoints/round-*.pt``) is one ``torch.save``d dict
of plain values and tensors, so ``torch.load(..., weights_only=True)`` reads it::

    from server.checkpoint import load_model
    model = load_model("outputs/digits-fedtan")   # the run folder, or the .pt file

It holds the model's architecture (name, normalization, input channels, classes), the data
normalization its inputs expect, the whole run config (Flower's key names, as in
``config.json``), the round it is the global model of, and what a resumed run continues from:
the nodes excluded so far and the metrics row of that round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.models import build_model

FORMAT = "fedtan-checkpoint/1"
MODEL_FILE = "model.pt"


def run_description(cfg: RunConfig) -> dict[str, object]:
    """The run config as a run folder keeps it (``config.json``, checkpoints): Flower's key
    names, with ``resume`` and ``overwrite`` off, since they say how a process opened the
    folder, not what the run is."""
    return {**cfg.to_flower(), "resume": False, "overwrite": False}


def make_checkpoint(
    cfg: RunConfig,
    server_round: int,
    state: Mapping[str, Tensor],
    *,
    excluded_partitions: Iterable[int] = (),
    row: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The checkpoint of ``cfg``'s global model ``state`` after ``server_round``."""
    data = task.eval_dataset(cfg)
    return {
        "format": FORMAT,
        "model": cfg.model,
        "norm": cfg.norm,
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "data_mean": list(data.mean),
        "data_std": list(data.std),
        "run_config": run_description(cfg),
        "round": server_round,
        "excluded_partitions": sorted(excluded_partitions),
        "metrics": dict(row or {}),
        "state_dict": {key: tensor.detach().cpu() for key, tensor in state.items()},
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (a run folder: its ``model.pt``), checked to be one."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a FedTAN checkpoint (format {FORMAT!r})")
    return checkpoint


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The global model's state as saved at ``path`` (run folder or .pt file)."""
    return read_checkpoint(path)["state_dict"]


def load_model(path: str | Path) -> nn.Module:
    """The saved global model, rebuilt and loaded, in eval mode (``path``: run folder or .pt)."""
    checkpoint = read_checkpoint(path)
    model = build_model(
        checkpoint["model"],
        in_channels=checkpoint["in_channels"],
        num_classes=checkpoint["num_classes"],
        norm=checkpoint["norm"],
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """Test loss and accuracy of a run's saved model on its run config's test data:
    ``{"test-loss": ..., "test-accuracy": ...}``."""
    checkpoint = read_checkpoint(run_dir)
    cfg = RunConfig.from_flower(checkpoint["run_config"])
    return task.evaluate(load_model(run_dir), cfg)
