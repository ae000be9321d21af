"""The methods the app runs, as a table: who trains, which state the server averages, what stays.

Every method shares the data, model, batches, schedule, evaluation and round loop; a method only
says

* ``train``: where a round's training happens. "fedtan": the clients, whose first step is
  synchronized (``train.fedtan``); "local": the clients, E plain local steps (``train.local``);
  "server": the server itself, SGD on the union of the clients' round batches (no clients).
* ``keep``: which BatchNorm entries of the state never leave a client (never sent up, never
  overwritten by the server): "none", "bn" (affine parameters and running statistics: FedBN) or
  "bn-stats" (running statistics only: SiloBN). Everything else is averaged by the server.
* ``evaluate_on_clients``: no single global model exists (each client has its own BN), so every
  client evaluates its own model on the test data and the server reports the clients' mean.
* ``norm``: the normalization a method is defined with (None: any); ``RunConfig`` checks it.
* ``label``: its name in tables and plots.
* ``freeze_bn_stats``: FixBN: after the switch round, clients normalize with the global running
  statistics (BN in eval mode while training) and no longer update them.
* ``batchnorm``: the BN layers the model trains with: "torch" (as built), or, converted from
  them (``bn_baselines.py``), "fbn" (normalize with the global statistics) or "hybridbn" (a
  learned blend of global and batch statistics). With "fbn" and "hybridbn" the server pools the
  moments the clients recorded into the next round's global statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.experiment.bn_baselines import convert_fbn, convert_hybridbn, reset_round_moments
from common.fedtan import Batch, LossFn, train_client

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
BN_AFFINE = ("weight", "bias")


@dataclass(frozen=True)
class Method:
    """One row of the table; the module docstring says what each field means."""

    name: str
    label: str
    train: str  # "fedtan" | "local" | "server"
    norm: str | None = "batch"  # one of models.NORMS, or None: any
    keep: str = "none"  # "none" | "bn" | "bn-stats"
    evaluate_on_clients: bool = False
    freeze_bn_stats: bool = False
    batchnorm: str = "torch"  # "torch" | "fbn" | "hybridbn"
    paper: str = ""

    @property
    def pools_bn_statistics(self) -> bool:
        return self.batchnorm != "torch"


METHODS = {
    m.name: m
    for m in (
        Method(
            "centralized",
            "Centralized (pooled data)",
            train="server",
            norm=None,
            paper="SGD on the pooled data",
        ),
        Method(
            "fedtan",
            "FedTAN",
            train="fedtan",
            paper="Wang, Shi, Chang 2023 (arXiv 2301.02982)",
        ),
        Method(
            "fedavg-bn",
            "FedAvg + BN",
            train="local",
            paper="McMahan et al. 2017, with BatchNorm",
        ),
        Method(
            "fedavg-gn",
            "FedAvg + GN",
            train="local",
            norm="group",
            paper="Hsieh et al. 2020 (GroupNorm)",
        ),
        Method(
            "fedbn",
            "FedBN (clients' mean)",
            train="local",
            keep="bn",
            evaluate_on_clients=True,
            paper="Li et al. 2021",
        ),
        Method(
            "silobn",
            "SiloBN (clients' mean)",
            train="local",
            keep="bn-stats",
            evaluate_on_clients=True,
            paper="Andreux et al. 2020",
        ),
        Method(
            "fixbn",
            "FixBN",
            train="local",
            freeze_bn_stats=True,
            paper="Zhong, Chen, Chao 2024",
        ),
        Method(
            "fbn",
            "FBN",
            train="local",
            batchnorm="fbn",
            paper="Guerraoui et al. 2024 (arXiv 2405.14670)",
        ),
        Method(
            "hybridbn",
            "HybridBN",
            train="local",
            batchnorm="hybridbn",
            paper="Chen et al. 2025 (arXiv 2505.21877, ICML)",
        ),
    )
}

_CONVERTERS = {"torch": lambda model: model, "fbn": convert_fbn, "hybridbn": convert_hybridbn}


def with_method_batchnorm(model: nn.Module, method: Method) -> nn.Module:
    """``model`` with the BN layers ``method`` trains with (the same model for "torch")."""
    return _CONVERTERS[method.batchnorm](model)


def local_keys(model: nn.Module, method: Method) -> frozenset[str]:
    """The ``state_dict`` entries of ``model`` that stay on the clients under ``method``."""
    if method.keep == "none":
        return frozenset()
    kept = BN_STATS if method.keep == "bn-stats" else BN_STATS + BN_AFFINE
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys |= {prefix + k for k, _ in module.named_parameters(recurse=False) if k in kept}
            keys |= {prefix + k for k, _ in module.named_buffers(recurse=False) if k in kept}
    return frozenset(keys)


class FrozenBNStats(nn.Module):
    """Wraps a model so that training normalizes with, and never updates, the running statistics.

    ``train()`` puts the model in training mode except its BatchNorm layers, which stay in eval
    mode: they normalize with their running statistics (treated as constants by autograd) while
    their affine parameters still learn. FixBN's second phase.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> FrozenBNStats:
        super().train(mode)
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)


def train_local(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    freeze_bn_stats: bool = False,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """E plain local steps (FedAvg's client), optionally with frozen BN statistics (FixBN).

    FBN and HybridBN layers record the moments of this round's inputs only (a no-op without)."""
    reset_round_moments(model)
    net = FrozenBNStats(model) if freeze_bn_stats else model
    return train_client(
        net,
        batches,
        loss_fn,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        autocast_dtype=autocast_dtype,
    )


def union_batches(client_batches: Sequence[Sequence[Batch]]) -> list[Batch]:
    """Step s of the pooled data: the concatenation of every client's s-th batch."""
    steps = {len(batches) for batches in client_batches}
    if len(steps) != 1:
        raise ValueError(f"clients have different numbers of batches: {sorted(steps)}")
    return [
        (torch.cat([b[s][0] for b in client_batches]), torch.cat([b[s][1] for b in client_batches]))
        for s in range(steps.pop())
    ]


def centralized_round(
    model: nn.Module,
    client_batches: Sequence[Sequence[Batch]],
    loss_fn: LossFn,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> list[float]:
    """One round of the centralized reference, in place: E SGD steps on the union batches.

    A fresh optimizer per round, as every client's; with E = 1 this is FedTAN's E = 1 round.
    """
    return train_client(
        model,
        union_batches(client_batches),
        loss_fn,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def check_method_names(names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
