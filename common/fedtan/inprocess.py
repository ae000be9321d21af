"""BN synchronization between clients that run as threads of one process.

The reference transport: it combines with the same functions as every other transport, with no
serialization in between, so it is what the Flower and gRPC transports are tested against.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor

from common.fedtan.bn_channel import (
    BACKWARD,
    FORWARD,
    BNChannel,
    BNSyncError,
    GradSums,
    Moments,
    merge_grad_sums,
    merge_moments,
    refuse_grad_sums,
    refuse_moments,
)

Parts = Mapping[Hashable, Any]
# Each phase's combination without a read of the device, and what names a refused part.
_MERGE = {
    FORWARD: (merge_moments, refuse_moments),
    BACKWARD: (merge_grad_sums, refuse_grad_sums),
}


class InProcessHub:
    """An all-reduce for K client threads: each exchange waits until all K have contributed.

    If one client fails, ``abort`` releases the others with a ``BNSyncError`` instead of leaving
    them waiting; ``timeout`` bounds the wait for a client that never arrives.

    The clients are threads of this process, so the hub trusts them to exchange values of the
    right kind and defers the check of the values themselves (finite, variances not negative):
    each exchange keeps its verdict as a tensor on the device, and ``verify`` reads all of them
    at once, after the step, naming the client and layer of the first unusable contribution.
    Shapes, dtypes, counts and the clients' being in step are checked at every exchange, as
    they need no read of the device.
    """

    def __init__(self, num_clients: int, timeout: float | None = 300.0) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self._timeout = timeout
        self._barrier = threading.Barrier(num_clients, action=self._combine)
        self._pending: dict[int, tuple[str, str, object]] = {}
        self._result: object = None
        self._error: BaseException | None = None
        # Every exchange since the last verify: phase, layer, the parts, their verdict.
        self._unverified: list[tuple[str, str, Parts, Tensor]] = []

    def channel(self, rank: int) -> BNChannel:
        """Client ``rank``'s end of the hub."""
        if not 0 <= rank < self.num_clients:
            raise ValueError(f"rank must be in [0, {self.num_clients}), got {rank}")
        return _HubChannel(self, rank)

    def abort(self, error: BaseException) -> None:
        """Release every waiting client: the step cannot complete."""
        if self._error is None:
            self._error = error
        self._barrier.abort()

    def verify(self) -> None:
        """Raise ``BNSyncError`` naming the client and layer of the first unusable contribution
        exchanged since the last call; one read of the device, whatever the number of
        exchanges. Call it once the clients are done (and before using what they computed)."""
        exchanges, self._unverified = self._unverified, []
        if not exchanges:
            return
        device = exchanges[0][3].device
        verdicts = torch.stack([usable.to(device) for *_, usable in exchanges])
        if bool(verdicts.all()):
            return
        for (phase, layer, parts, _), usable in zip(exchanges, verdicts.tolist(), strict=True):
            if not usable:
                _MERGE[phase][1](layer, parts)

    def all_reduce(self, rank: int, phase: str, layer: str, value: object) -> Any:
        """Client ``rank``'s ``value`` for ``layer`` in ``phase`` (``FORWARD``: ``Moments``,
        ``BACKWARD``: ``GradSums``); returns the combination of all K clients' values."""
        self._pending[rank] = (phase, layer, value)
        try:
            self._barrier.wait(self._timeout)
        except threading.BrokenBarrierError:
            cause = self._error or TimeoutError(
                f"{phase} of layer {layer!r}: not all {self.num_clients} clients arrived "
                f"within {self._timeout} s"
            )
            raise BNSyncError(f"BN synchronization aborted: {cause}") from cause
        # Safe to read: the next combine needs this thread back at the barrier first.
        return self._result

    def _combine(self) -> None:
        # Runs in exactly one thread, once all clients have contributed.
        points = {(phase, layer) for phase, layer, _ in self._pending.values()}
        try:
            if len(points) != 1:
                where = {rank: f"{p[0]} {p[1]!r}" for rank, p in sorted(self._pending.items())}
                raise BNSyncError(f"clients are out of step: {where}")
            ((phase, layer),) = points
            parts = {rank: v for rank, (_, _, v) in sorted(self._pending.items())}
            merge, _ = _MERGE[phase]
            self._result, usable = merge(layer, parts)
            self._unverified.append((phase, layer, parts, usable))
        except BaseException as error:  # noqa: BLE001 - handed to every waiting client
            self._error = error
            raise


class _HubChannel(BNChannel):
    def __init__(self, hub: InProcessHub, rank: int) -> None:
        self._hub, self._rank = hub, rank

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        return self._hub.all_reduce(self._rank, FORWARD, layer, local)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        return self._hub.all_reduce(self._rank, BACKWARD, layer, local)
