"""The experiment as a pure function of its config: data, partitions, model, loss and batches.

Server, clients and the in-process reference all build their pieces here, so a client that is
restarted (or runs in a fresh process per message) recomputes exactly the same batch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from common.experiment import device as placement
from common.experiment.config import RunConfig
from common.experiment.data import TensorDataset, eval_batches, load_dataset, round_batches
from common.experiment.methods import METHODS, with_method_batchnorm
from common.experiment.models import build_model
from common.experiment.partition import partition
from common.fedtan import Batch, ClientReplicas, synced_round

loss_fn = nn.CrossEntropyLoss()  # mean over the batch, as FedTAN's exactness requires


def train_dataset(cfg: RunConfig) -> TensorDataset:
    return _dataset(cfg.dataset, cfg.data_dir, cfg.seed, train=True)


def eval_dataset(cfg: RunConfig) -> TensorDataset:
    return _dataset(cfg.dataset, cfg.data_dir, cfg.seed, train=False)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str, seed: int, *, train: bool) -> TensorDataset:
    """Loaded once per process: reading CIFAR-10 for every message would cost seconds."""
    return load_dataset(name, train=train, data_dir=data_dir, seed=seed)


@functools.lru_cache(maxsize=8)
def partitions(cfg: RunConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    train = train_dataset(cfg)
    return tuple(
        partition(
            train.labels.numpy(),
            num_partitions,
            cfg.partition,
            alpha=cfg.dirichlet_alpha,
            seed=cfg.seed,
        )
    )


def client_batches(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    server_round: int,
    *,
    batch_size: int,
    local_steps: int,
    device: torch.device | None = None,
) -> list[Batch]:
    """The batches client ``partition_id`` trains on in ``server_round``, one per local step.

    ``device``: drawn and augmented there, from the client's samples kept there
    (``client_dataset``); the same batches as without it (on the CPU), bit for bit on the CPU.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    draw = {
        "round_num": server_round,
        "num_steps": local_steps,
        "batch_size": batch_size,
        "seed": cfg.seed,
        "client_id": partition_id,
    }
    if device is None:
        indices = partitions(cfg, num_partitions)[partition_id]
        return round_batches(train_dataset(cfg), indices, **draw)
    own = client_dataset(cfg, partition_id, num_partitions, device)
    return round_batches(own, np.arange(len(own)), **draw)


@functools.lru_cache(maxsize=64)
def client_dataset(
    cfg: RunConfig, partition_id: int, num_partitions: int, device: torch.device
) -> TensorDataset:
    """Client ``partition_id``'s training samples on ``device``, made once per process (its
    partition's order: batches drawn from it are ``client_batches``' own)."""
    return train_dataset(cfg).subset(partitions(cfg, num_partitions)[partition_id]).to(device)


def every_client_batches(
    cfg: RunConfig, num_clients: int, server_round: int, device: torch.device | None = None
) -> list[list[Batch]]:
    """Every client's batches of ``server_round`` with the config's batch size and E, one list
    per client: what the in-process engine trains on (``device``: as ``client_batches``)."""
    return [
        client_batches(
            cfg,
            k,
            num_clients,
            server_round,
            batch_size=cfg.batch_size,
            local_steps=cfg.local_steps,
            device=device,
        )
        for k in range(num_clients)
    ]


def engine_round(
    model: nn.Module,
    cfg: RunConfig,
    batches: list[list[Batch]],
    server_round: int,
    replicas: ClientReplicas | None = None,
) -> dict[str, torch.Tensor]:
    """Round ``server_round`` of ``cfg`` by the in-process engine from ``model``'s state, on
    ``batches`` (``every_client_batches``): the new global state (``model`` keeps its own).
    What every transport must reproduce. ``replicas``: the client models to reuse across rounds."""
    return synced_round(
        model,
        batches,
        loss_fn,
        lr=cfg.lr_at(server_round),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        replicas=replicas,
    )


def build_global_model(cfg: RunConfig) -> nn.Module:
    """The initial global model, with the BN layers of ``cfg.method`` (FBN, HybridBN: converted);
    seeded, so every process builds the same one."""
    test = eval_dataset(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model, in_channels=test.in_channels, num_classes=test.num_classes, norm=cfg.norm
    )
    return with_method_batchnorm(model, METHODS[cfg.method])


def example_batch(cfg: RunConfig, size: int = 4) -> Batch:
    """A few test samples, enough to trace the model's BN sync points."""
    return next(eval_batches(eval_dataset(cfg), size))


@torch.no_grad()
def evaluate(
    model: nn.Module, cfg: RunConfig, device: torch.device | None = None, batch_size: int = 500
) -> dict[str, float]:
    """Test loss and accuracy of ``model`` in eval mode (BN uses its running statistics), on
    ``device`` (default: run config ``device``) with the config's precision and memory format."""
    device = device or pick_device(cfg.device)
    model = placement.place_model(model, device, cfg.channels_last).eval()
    inputs, targets = eval_set(cfg.dataset, cfg.data_dir, cfg.seed, device, cfg.channels_last)
    # Summed on the device and read once at the end: a read per batch would wait each time.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(targets), batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        with placement.autocast(cfg.precision, device):
            logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    seen = len(targets)
    return {"test-loss": total_loss.item() / seen, "test-accuracy": correct.item() / seen}


@functools.lru_cache(maxsize=2)
def eval_set(
    name: str, data_dir: str, seed: int, device: torch.device, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """The normalized test set on ``device``, made once per process: every evaluation reuses it."""
    test = _dataset(name, data_dir, seed, train=False)
    inputs = placement.place_inputs(test.normalize(test.images), device, channels_last)
    return inputs, test.labels.to(device)


def pick_device(spec: str = "auto") -> torch.device:
    """The device run config ``device`` names ("auto": the local GPU when there is one)."""
    return placement.resolve_device(spec)
