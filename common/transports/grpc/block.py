"""A block of rounds on the BN sync service: R FedTAN rounds per Flower message.

With run config ``rounds-per-message`` R > 1, one Flower train message per available client
starts a block; the client then stays in it, and each round of the block runs over the
service: the server publishes the round's plan (``wire.Plan``: round, learning rate, global
model, and to the sampled clients a BN sync round with its credential), the sampled clients take
the synced step over that BN sync round and their E-1 local steps, and upload their state; the
server averages the uploads like a round's train replies (``common/transports/averaging.py``),
and the next plan carries the average to every member. Flower only starts the block and
collects its replies when it ends (``server.py``).

``Block`` is the service's record of one block. Members are authenticated by the block's
credential (call metadata, as for the BN exchanges), and what they upload is checked where it
enters, like their statistics: the state has exactly the model's entries, dtypes and shapes
and finite values, the sample count is positive and at most the round's batch size times its
local steps, the loss finite; anything else is refused and names its sender as the culprit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from common.fedtan.bn_channel import BNSyncError
from common.transports.averaging import ClientUpdate, all_finite
from common.transports.grpc.members import Members, Refusal
from common.transports.grpc.wire import (
    GIVE_UP,
    NEXT,
    BlockRequest,
    ErrorReply,
    StateSpec,
    bounded,
    decode,
    decode_state,
    decode_upload,
    encode_end,
    encode_wait,
)

BLOCK_CALLS_PER_MEMBER = 2  # a NEXT or UPLOAD, and the GIVE_UP a client sends when it fails


@dataclass
class BlockProblem(Exception):
    """A round of a block cannot complete: who is at fault (maybe none), and why."""

    message: str
    culprits: dict[str, str] = field(default_factory=dict)  # client -> what it did
    bad_state: bool = False  # a culprit sent a state or numbers that fail the checks

    def __str__(self) -> str:
        return self.message


class Block(Members):
    """One block's members, its current round's plan and the uploads of that round.

    The server calls ``publish`` / ``collect`` / ``end`` (one round at a time); members ask for
    the next plan (NEXT) and upload their round's result (UPLOAD, answered like a NEXT).
    ``spec``: the model's state entries; ``max_examples``: the most samples a client trains on
    in a round; ``poll``: the longest a member's wait for a plan is held.
    """

    def __init__(
        self,
        block_id: int,
        credentials: Mapping[str, str],
        spec: StateSpec,
        max_examples: int,
        poll: float,
    ) -> None:
        super().__init__(credentials, BLOCK_CALLS_PER_MEMBER)
        self.id = block_id
        self._spec, self._max_examples, self._poll = spec, max_examples, poll
        self._cond = threading.Condition()
        self._seq = -1  # the round of the block being run; -1 before the first
        self._plans: dict[str, bytes] = {}
        self._sampled: frozenset[str] = frozenset()
        self._updates: dict[str, ClientUpdate] = {}
        self._problems: dict[str, str] = {}
        self._bad_state = False
        self._ended: bytes | None = None  # the END reply once the block has ended

    # --- the server's side -----------------------------------------------------------------

    def publish(self, seq: int, sampled: Sequence[str], plans: Mapping[str, bytes]) -> None:
        """Start round ``seq`` of the block: ``plans[member]`` is what ``next`` answers."""
        with self._cond:
            if self._ended is not None:
                raise RuntimeError(f"block {self.id} has ended")
            if seq != self._seq + 1 or set(plans) != set(self._credentials):
                raise ValueError(f"block {self.id}: round {seq} must follow {self._seq}, to all")
            self._seq, self._plans = seq, dict(plans)
            self._sampled = frozenset(sampled)
            self._updates, self._problems, self._bad_state = {}, {}, False
            self._cond.notify_all()

    def collect(self, timeout: float) -> list[ClientUpdate]:
        """The sampled clients' uploads of the current round, or ``BlockProblem`` as soon as one
        gives up or sends something wrong, or ``timeout`` seconds pass without all of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._problems and len(self._updates) < len(self._sampled):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for client in sorted(self._sampled - set(self._updates)):
                        self._problems[client] = f"sent no state within {timeout:g} s"
                    break
                self._cond.wait(remaining)
            if self._problems:
                detail = "; ".join(
                    f"client {c}: {why}" for c, why in sorted(self._problems.items())
                )
                raise BlockProblem(
                    bounded(f"block {self.id}, round {self._seq}: {detail}"),
                    dict(self._problems),
                    self._bad_state,
                )
            return list(self._updates.values())

    def end(self, reason: str) -> None:
        """No more rounds: members waiting for a plan, and all later calls, are told why."""
        with self._cond:
            if self._ended is None:
                self._ended = encode_end(reason)
                self._cond.notify_all()

    # --- the members' side -----------------------------------------------------------------

    def serve(self, client_id: str, request: BlockRequest) -> bytes:
        """An authenticated member's call; ``Refusal`` when it is refused.

        An UPLOAD is answered like a NEXT after it: the member's next call would ask for the
        next plan at once, and a call fewer per member and round is CPU that the round's
        training gets back where the clients and the service share a few cores.
        """
        if request.kind == NEXT:
            return self._next(client_id, request.seq)
        if request.kind == GIVE_UP:
            self._give_up(client_id, request)
            return b""
        self._upload(client_id, request)
        return self._next(client_id, request.seq)

    def _next(self, client_id: str, seq: int) -> bytes:
        """The plan of the block's current round once it is later than ``seq``; WAIT if none
        comes within ``poll``. A member that was not sampled may have missed a round while it
        was busy: it gets the current one, whose plan carries the whole global model."""
        deadline = time.monotonic() + self._poll
        with self._cond:
            while self._ended is None and self._seq <= seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return encode_wait()
                self._cond.wait(remaining)
            if self._ended is not None:
                return self._ended
            return self._plans[client_id]

    def _give_up(self, client_id: str, request: BlockRequest) -> None:
        try:
            reason = decode(request.body)
        except BNSyncError as error:
            reason = ErrorReply(f"(unreadable reason: {error})")
        if not isinstance(reason, ErrorReply):
            reason = ErrorReply("(no reason given)")
        with self._cond:
            if self._ended is None and request.seq == self._seq and client_id in self._sampled:
                self._problems.setdefault(client_id, f"gave up: {reason.message}")
                self._cond.notify_all()

    def _upload(self, client_id: str, request: BlockRequest) -> None:
        with self._cond:
            if self._ended is not None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"block {self.id} ended")
            if request.seq != self._seq or client_id not in self._sampled:
                self._refuse(
                    client_id,
                    f"uploaded for round {request.seq} of the block, which "
                    f"is at round {self._seq} (sampled: {client_id in self._sampled})",
                )
            if client_id in self._updates:
                self._refuse(client_id, f"uploaded round {request.seq} twice")
        # Decoded and checked outside the lock: the other members' calls go on meanwhile.
        try:
            update = self._check(client_id, request)
        except BNSyncError as error:
            with self._cond:
                self._refuse(client_id, str(error))
        with self._cond:
            if self._ended is not None or request.seq != self._seq:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "the round is over")
            self._updates[client_id] = update
            self._cond.notify_all()

    def _check(self, client_id: str, request: BlockRequest) -> ClientUpdate:
        num_examples, train_loss, partition_id, frame = decode_upload(request.body)
        if not 0 < num_examples <= self._max_examples:
            raise BNSyncError(f"{num_examples} samples, the round allows 1 to {self._max_examples}")
        if not math.isfinite(train_loss):
            raise BNSyncError(f"train loss {train_loss} is not finite")
        if partition_id < 0:
            raise BNSyncError(f"partition id {partition_id} is negative")
        state = decode_state(frame, self._spec)
        for name, tensor in state.items():
            if tensor.is_floating_point() and not all_finite(tensor):
                raise BNSyncError(f"state entry {name!r} has non-finite values")
        return ClientUpdate(int(client_id), partition_id, num_examples, train_loss, state)

    def _refuse(self, client_id: str, problem: str) -> None:
        """Refuse an upload and fail the round with its sender at fault (lock held)."""
        message = f"block {self.id}, round {self._seq}: client {client_id!r}: {problem}"
        self._problems.setdefault(client_id, bounded(problem))
        self._bad_state = True
        self._cond.notify_all()
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)
