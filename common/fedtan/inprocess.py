"""BN synchronization between clients that run as threads of one process.

The reference transport: it combines with the same functions as every other transport, with no
serialization in between, so it is what the Flower and gRPC transports are tested against.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

from common.fedtan.bn_channel import (
    BNChannel,
    BNSyncError,
    GradSums,
    Moments,
    combine_grad_sums,
    combine_moments,
)

T = TypeVar("T")


class InProcessHub:
    """An all-reduce for K client threads: each exchange waits until all K have contributed.

    If one client fails, ``abort`` releases the others with a ``BNSyncError`` instead of leaving
    them waiting; ``timeout`` bounds the wait for a client that never arrives.
    """

    def __init__(self, num_clients: int, timeout: float | None = 300.0) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self._timeout = timeout
        self._barrier = threading.Barrier(num_clients, action=self._combine)
        self._pending: dict[int, tuple[str, str, object]] = {}
        self._combine_fn: Callable[[str, Mapping[Hashable, object]], object] | None = None
        self._result: object = None
        self._error: BaseException | None = None

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

    def all_reduce(
        self,
        rank: int,
        phase: str,
        layer: str,
        value: T,
        combine: Callable[[str, Mapping[Hashable, T]], T],
    ) -> T:
        self._pending[rank] = (phase, layer, value)
        self._combine_fn = combine
        try:
            self._barrier.wait(self._timeout)
        except threading.BrokenBarrierError:
            cause = self._error or TimeoutError(
                f"{phase} of layer {layer!r}: not all {self.num_clients} clients arrived "
                f"within {self._timeout} s"
            )
            raise BNSyncError(f"BN synchronization aborted: {cause}") from cause
        # Safe to read: the next combine needs this thread back at the barrier first.
        return self._result  # type: ignore[return-value]

    def _combine(self) -> None:
        # Runs in exactly one thread, once all clients have contributed.
        points = {(phase, layer) for phase, layer, _ in self._pending.values()}
        try:
            if len(points) != 1:
                where = {rank: f"{p[0]} {p[1]!r}" for rank, p in sorted(self._pending.items())}
                raise BNSyncError(f"clients are out of step: {where}")
            ((_, layer),) = points
            parts = {rank: v for rank, (_, _, v) in sorted(self._pending.items())}
            self._result = self._combine_fn(layer, parts)
        except BaseException as error:  # noqa: BLE001 - handed to every waiting client
            self._error = error
            raise


class _HubChannel(BNChannel):
    def __init__(self, hub: InProcessHub, rank: int) -> None:
        self._hub, self._rank = hub, rank

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        return self._hub.all_reduce(self._rank, "forward", layer, local, combine_moments)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        return self._hub.all_reduce(self._rank, "backward", layer, local, combine_grad_sums)
