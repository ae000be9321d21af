"""What federated BatchNorm layers exchange when they synchronize, and how it is combined.

A federated BN layer talks to the other clients at exactly two points per synchronized step:

* forward: it sends per-channel ``Moments`` (count, mean, sum of squared deviations) of its
  local batch and gets back the ``Moments`` of the union batch;
* backward: it sends its per-channel ``GradSums`` (sum of dL/dy and of dL/dy * xhat, already
  weighted by its share of the union batch) and gets back their sum over all clients.

``BNChannel`` is one client's end of that exchange. Transports (threads in one process, Flower
messages, a gRPC service) implement it; every one of them combines with ``combine_moments`` and
``combine_grad_sums`` below, so all transports compute the same numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor

# The two phases of a synchronized step: the exchange of moments in the forward pass, of
# gradient sums in the backward pass.
FORWARD, BACKWARD = "forward", "backward"


class BNSyncError(ValueError):
    """A client's contribution to a BN synchronization is unusable, or the exchange broke.

    ``sender``: the client whose contribution was refused, when one is to blame."""

    def __init__(self, message: str, sender: Hashable | None = None) -> None:
        super().__init__(message)
        self.sender = sender


@dataclass(frozen=True)
class Moments:
    """Per-channel first and second moments of a batch, in the form that merges exactly."""

    count: int  # values per channel: batch size times spatial size
    mean: Tensor  # shape (C,)
    m2: Tensor  # sum of squared deviations from `mean`, shape (C,)

    @property
    def var(self) -> Tensor:
        """Biased variance, the one BatchNorm normalizes with."""
        return self.m2 / self.count


@dataclass(frozen=True)
class GradSums:
    """Per-channel sums of the output gradient g and of g * xhat, shape (C,) each."""

    sum_dy: Tensor
    sum_dy_xhat: Tensor


class BNChannel(ABC):
    """One client's end of the BN synchronization of one training step.

    ``layer`` names the BN layer (its qualified module name) so that a transport can check
    that every client is at the same point of the network.
    """

    @abstractmethod
    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        """Send this client's batch moments, return the moments of the union batch."""

    @abstractmethod
    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        """Send this client's weighted gradient sums, return their sum over all clients."""


def check_moments(sender: Hashable, layer: str, moments: Moments) -> None:
    """Refuse moments that would corrupt the global statistics."""
    _check_count(sender, layer, moments)
    _check_vectors(sender, layer, mean=moments.mean, m2=moments.m2)
    if not bool(_moments_ok(moments.mean, moments.m2)):
        _refuse_values(sender, layer, mean=moments.mean, m2=moments.m2)


def check_grad_sums(sender: Hashable, layer: str, sums: GradSums) -> None:
    _check_vectors(sender, layer, sum_dy=sums.sum_dy, sum_dy_xhat=sums.sum_dy_xhat)
    if not bool(_finite(sums.sum_dy, sums.sum_dy_xhat)):
        _refuse_values(sender, layer, sum_dy=sums.sum_dy, sum_dy_xhat=sums.sum_dy_xhat)


def combine_moments(layer: str, parts: Mapping[Hashable, Moments]) -> Moments:
    """Exact moments of the union of the clients' batches (Chan et al.'s parallel formula).

    Computed in float64 whatever the clients' dtype, so that the combination adds no error of
    its own; callers cast back to their dtype. The values of all parts are checked together,
    with one read of the device (the per-part checks run only to name a refused part).
    """
    union, usable = merge_moments(layer, parts)
    if not bool(usable):
        refuse_moments(layer, parts)
    return union


def merge_moments(layer: str, parts: Mapping[Hashable, Moments]) -> tuple[Moments, Tensor]:
    """``combine_moments`` without reading the device: the union's moments, and a boolean
    tensor that is True when every part's values are usable (``refuse_moments`` names the part
    that is not). Shapes, dtypes and counts, which need no read, are checked here."""
    _check_same_shape(layer, {k: p.mean for k, p in parts.items()})
    for sender, part in parts.items():
        _check_count(sender, layer, part)
        _check_vectors(sender, layer, mean=part.mean, m2=part.m2)
    # One stack and one cast for all clients (float16/32 to float64 is exact).
    stacked = torch.stack([v for p in parts.values() for v in (p.mean, p.m2)]).double()
    means, m2s = stacked.view(len(parts), 2, -1).unbind(1)
    counts = [p.count for p in parts.values()]
    total = sum(counts)
    weights = _column(counts, like=means)
    mean = (weights * means).sum(0) / total
    m2 = (m2s + weights * (means - mean) ** 2).sum(0)
    return Moments(total, mean, m2), _moments_ok(means, m2s)


def refuse_moments(layer: str, parts: Mapping[Hashable, Moments]) -> NoReturn:
    """Raise ``BNSyncError`` naming the first part whose values ``merge_moments`` refused."""
    for sender, part in parts.items():
        check_moments(sender, layer, part)
    raise BNSyncError(f"layer {layer!r}: the clients' moments are unusable together")


def combine_grad_sums(layer: str, parts: Mapping[Hashable, GradSums]) -> GradSums:
    """Sum of the clients' (already weighted) gradient sums, in float64, checked together."""
    union, usable = merge_grad_sums(layer, parts)
    if not bool(usable):
        refuse_grad_sums(layer, parts)
    return union


def merge_grad_sums(layer: str, parts: Mapping[Hashable, GradSums]) -> tuple[GradSums, Tensor]:
    """``combine_grad_sums`` without reading the device (as ``merge_moments``)."""
    _check_same_shape(layer, {k: p.sum_dy for k, p in parts.items()})
    for sender, part in parts.items():
        _check_vectors(sender, layer, sum_dy=part.sum_dy, sum_dy_xhat=part.sum_dy_xhat)
    stacked = torch.stack([v for p in parts.values() for v in (p.sum_dy, p.sum_dy_xhat)]).double()
    sum_dy, sum_dy_xhat = stacked.view(len(parts), 2, -1).sum(0)
    return GradSums(sum_dy, sum_dy_xhat), _finite(stacked)


def refuse_grad_sums(layer: str, parts: Mapping[Hashable, GradSums]) -> NoReturn:
    """Raise ``BNSyncError`` naming the first part whose values ``merge_grad_sums`` refused."""
    for sender, part in parts.items():
        check_grad_sums(sender, layer, part)
    raise BNSyncError(f"layer {layer!r}: the clients' gradient sums are unusable together")


def _column(values: list[int], like: Tensor) -> Tensor:
    """``values`` as a float64 column on ``like``'s device, copied without waiting for it."""
    column = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    if like.device.type == "cuda":
        # From pinned memory the copy is queued; from pageable memory it would wait.
        return column.pin_memory().to(like.device, non_blocking=True)
    return column.to(like.device)


def _check_count(sender: Hashable, layer: str, moments: Moments) -> None:
    if not isinstance(moments.count, int) or moments.count <= 0:
        raise BNSyncError(
            f"client {sender}, layer {layer!r}: count must be a positive integer, "
            f"got {moments.count!r} (empty batch?)",
            sender,
        )


def _check_vectors(sender: Hashable, layer: str, **vectors: Tensor) -> None:
    """Shapes and dtypes, which need no read of the values (nor of the device)."""
    shapes = {name: tuple(v.shape) for name, v in vectors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise BNSyncError(
            f"client {sender}, layer {layer!r}: expected per-channel vectors of "
            f"one shape, got {shapes}",
            sender,
        )
    for name, v in vectors.items():
        if not v.is_floating_point():
            raise BNSyncError(
                f"client {sender}, layer {layer!r}: {name} has dtype {v.dtype}, "
                "expected a floating-point tensor",
                sender,
            )


def _finite(*vectors: Tensor) -> Tensor:
    """One boolean tensor (no read of the device): every value of every vector is finite."""
    flags = [torch.isfinite(v).all() for v in vectors]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _moments_ok(mean: Tensor, m2: Tensor) -> Tensor:
    # m2 >= 0 is False for NaN and m2 < inf is False for +inf.
    return torch.isfinite(mean).all() & ((m2 >= 0) & (m2 < torch.inf)).all()


def _refuse_values(sender: Hashable, layer: str, **vectors: Tensor) -> None:
    """Name what is wrong with vectors that failed a fused check."""
    for name, v in vectors.items():
        if not bool(torch.isfinite(v).all()):
            raise BNSyncError(
                f"client {sender}, layer {layer!r}: {name} has non-finite values", sender
            )
    raise BNSyncError(
        f"client {sender}, layer {layer!r}: negative sum of squared deviations", sender
    )


def _check_same_shape(layer: str, vectors: Mapping[Hashable, Tensor]) -> None:
    if not vectors:
        raise BNSyncError(f"layer {layer!r}: nothing to combine")
    shapes = {k: tuple(v.shape) for k, v in vectors.items()}
    if len(set(shapes.values())) != 1:
        raise BNSyncError(f"layer {layer!r}: clients disagree on the number of channels: {shapes}")


def share_of_union(local_count: int, total_count: int) -> float:
    """A client's weight in the union batch's mean loss, from the BN counts it already has."""
    if total_count <= 0 or not 0 < local_count <= total_count:
        raise BNSyncError(f"inconsistent counts: local {local_count}, union {total_count}")
    return local_count / total_count


__all__ = [
    "BACKWARD",
    "FORWARD",
    "BNChannel",
    "BNSyncError",
    "GradSums",
    "Moments",
    "check_grad_sums",
    "check_moments",
    "combine_grad_sums",
    "combine_moments",
    "merge_grad_sums",
    "merge_moments",
    "refuse_grad_sums",
    "refuse_moments",
    "share_of_union",
]
