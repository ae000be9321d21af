"""A stateless client's side of the synced step: replay what the server knows, capture the rest.

Over Flower messages a client cannot keep activations between two messages (in deployment each
message runs in a fresh process). So for every message it recomputes its synced step from the
global model and its deterministic batch: the BN layers whose union statistics the server has
already sent get them back from a ``ReplayChannel``; the first layer that is not known yet stops
the step, and its local statistics are the client's reply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import RecordDict
from torch import nn

from common.fedtan import Batch, LossFn
from common.fedtan.bn_channel import BNChannel, BNSyncError, GradSums, Moments
from common.fedtan.bn_sync import synchronized
from common.protocol import BACKWARD, FORWARD
from common.transports.messages.records import UnionStats


@dataclass
class Captured(Exception):
    """Raised at the first sync point the server has no union statistics for yet."""

    phase: str
    index: int
    layer: str
    stats: Moments | GradSums


class ReplayChannel(BNChannel):
    """Answers each sync point with the union statistics sent by the server, in order."""

    def __init__(self, union: UnionStats) -> None:
        self.union = union
        self.calls = {FORWARD: 0, BACKWARD: 0}

    @classmethod
    def from_message(cls, content: RecordDict) -> ReplayChannel:
        """The channel of a train message of transport "messages": its union statistics."""
        return cls(UnionStats.from_records(content))

    def __enter__(self) -> ReplayChannel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.check_consumed()

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        return self._next(FORWARD, self.union.forward, layer, local)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        return self._next(BACKWARD, self.union.backward, layer, local)

    def check_consumed(self) -> None:
        """After a full step: the server's statistics must match the step exactly."""
        known = {FORWARD: len(self.union.forward), BACKWARD: len(self.union.backward)}
        if self.calls != known:
            raise BNSyncError(
                f"the server sent statistics for {known} sync points, the step used {self.calls}"
            )

    def _next(self, phase, known, layer, local):
        index = self.calls[phase]
        self.calls[phase] += 1
        if index >= len(known):
            raise Captured(phase, index, layer, local)
        expected, stats = known[index]
        if expected != layer:
            raise BNSyncError(
                f"{phase} sync point {index} is layer {layer!r} here, but "
                f"{expected!r} at the server: do all clients run the same model?"
            )
        return stats


def capture_local_stats(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    union: UnionStats,
    autocast_dtype: torch.dtype | None = None,
) -> Captured:
    """Recompute the synced step up to the first unknown sync point and return its statistics.

    ``model`` must have federated BN layers; it is used as scratch (its buffers change).
    ``autocast_dtype``: as ``train_client``'s (forward and loss only), so the replayed step
    computes what the trained one will.
    """
    inputs, targets = batch
    model.train()
    with synchronized(model, ReplayChannel(union)):
        try:
            with torch.autocast(
                inputs.device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                loss = loss_fn(model(inputs), targets)
            loss.backward()
        except Captured as captured:
            return captured
    raise BNSyncError("the server asked for statistics past the last sync point of the step")
