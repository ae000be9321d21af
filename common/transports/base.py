"""What the strategy asks of a transport, and how a round fails.

A transport carries the BN statistics of a round's synchronized step between the clients. The
strategy opens one ``RoundSync`` per attempt at a round and drives it in a fixed order:

    sync = transport.open_round(grid, plan)        # may already exchange (transport "messages")
    try:
        replies = exchange(grid, sync.train_messages(), ...)
        sync.finish()                              # raises RoundFailure if the sync failed
    except RoundFailure as failure:
        raise sync.abort(failure)                  # the round's failure, with who is at fault

A transport that runs the whole round itself (transport "grpc" with ``rounds-per-message`` > 1:
the clients are in a block of rounds already) sends no train messages; its ``averaged`` gives
the round's averaged model instead of the replies, and raises ``RoundFailure`` the same way.
Its ``open_round`` sets the clients training at once (``trains_ahead``), so the strategy opens
the next round before it evaluates and records this one, and aborts it if this one fails after
all: the clients train while the server evaluates.

Everything a round needs lives on its ``RoundSync``, so nothing is carried between calls on
the strategy or the transport. ``check`` runs once before round 1; ``close`` ends the transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.protocol import QUERY_BN_SYNC_PREFLIGHT

if TYPE_CHECKING:
    from common.transports.exchange import Traffic


class FailureKind(Enum):
    """Why a round cannot complete."""

    NO_CLIENTS = "no-clients"  # too few connected, or none left to sample
    EXCHANGE = "exchange"  # a node did not reply, replied with an error or with another type
    BAD_REPLY = "bad-reply"  # a reply arrived but its content is malformed or invalid
    DISAGREEMENT = "disagreement"  # the replies do not combine, and no single node is to blame
    SYNC_ABORTED = "sync-aborted"  # the BN sync channel aborted the round


class RoundFailure(RuntimeError):
    """The round cannot complete.

    ``kind``: why; ``culprits``: the nodes at fault, whom a retry leaves out (may be empty);
    ``reasons``: per culprit, what went wrong (for the log, never for decisions).
    """

    def __init__(
        self,
        message: str,
        kind: FailureKind,
        culprits: Iterable[int] = (),
        reasons: dict[int, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.culprits = frozenset(culprits)
        self.reasons = dict(reasons or {})


@dataclass(frozen=True)
class RoundPlan:
    """One attempt at a round, as the strategy decided it."""

    server_round: int
    attempt: int  # 0 for the first try; retries count up
    nodes: Sequence[int]  # the sampled clients
    arrays: ArrayRecord  # the global model's entries that travel
    config: ConfigRecord  # the round's train config (protocol.TrainSettings and round number)
    message_type: str  # what the train messages are
    group_id: str  # Flower's group id of every message of the attempt
    timeout: float  # seconds to wait for the replies of one exchange
    traffic: Traffic | None = None  # where the round's exchanges are counted
    excluded: frozenset[int] = frozenset()  # nodes the run no longer uses (failed earlier)


class RoundSync(ABC):
    """One attempt at a round over a transport; used once, in the order of the module doc."""

    @abstractmethod
    def train_messages(self) -> list[Message]:
        """The messages that ask the plan's nodes to train, one per node."""

    def averaged(self) -> tuple[ArrayRecord, MetricRecord] | None:
        """The round's averaged model and train metrics, when the transport computes them
        (then ``train_messages`` is empty); None: the strategy averages the train replies."""
        return None

    def finish(self) -> None:
        """Every train reply is in: raise ``RoundFailure`` if the sync failed after all."""
        return None

    def abort(self, failure: RoundFailure) -> RoundFailure:
        """The round failed with ``failure``: release what the round holds and return the
        failure the strategy acts on (a transport may know better who is at fault)."""
        return failure


class Transport(ABC):
    """How the BN statistics of FedTAN's synced step travel; one per run."""

    @abstractmethod
    def open_round(self, grid: Grid, plan: RoundPlan) -> RoundSync:
        """Start the synced step of ``plan``; raise ``RoundFailure`` if it fails already."""

    def trains_ahead(self) -> bool:
        """Whether ``open_round`` sets the clients training by itself, without the strategy's
        messages: then a round opened early trains while the server finishes the last one."""
        return False

    def reachable_nodes(self) -> Sequence[int] | None:
        """The nodes the next round can draw from without asking Flower (a block's members,
        waiting for its next round), or None: Flower's connected nodes."""
        return None

    def check(self, grid: Grid, nodes: Sequence[int], timeout: float) -> None:
        """Before round 1: prove that ``nodes`` can sync, or raise ``RuntimeError`` saying why."""
        return None

    def close(self) -> None:
        """Release what the transport holds (a service, its port)."""
        return None


def preflight_plan(nodes: Sequence[int], timeout: float) -> RoundPlan:
    """The plan of a transport's ``check``: round 0, one preflight query per node, no model."""
    return RoundPlan(
        server_round=0,
        attempt=0,
        nodes=nodes,
        arrays=ArrayRecord(),
        config=ConfigRecord(),
        message_type=QUERY_BN_SYNC_PREFLIGHT,
        group_id="fedtan-bn-sync-preflight",
        timeout=timeout,
    )


class DirectRound(RoundSync):
    """A round without a synced step (the baselines): its train messages are all there is."""

    def __init__(self, messages: Iterable[Message]) -> None:
        self.messages = list(messages)

    def train_messages(self) -> list[Message]:
        return self.messages
