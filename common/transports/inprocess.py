"""Transport "inprocess": the clients are threads of the ServerApp's own process.

The BN statistics of a round's synced step go through an ``InProcessHub`` (the reference
all-reduce of ``common/fedtan/inprocess.py``) with no serialization at all. This is the
transport for ``server.local_run.run_locally`` (the in-memory grid of ``scripts/compare.py`` and
the tests), where it is the cheapest way to run the real ServerApp and ClientApp code.

A Flower message cannot carry a hub, so the server registers each attempt's hub under a fresh
key in ``OPEN_HUBS`` and the train message carries the key; a client looks its hub up there.
That registry is shared state on purpose (it is what connects the threads) and holds only the
attempts in flight. A client in another process (Ray, a SuperNode) finds no hub and says so;
the ``check`` before round 1 turns that into a clear error before any round starts.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.fedtan.bn_channel import BNChannel, BNSyncError, GradSums, Moments
from common.fedtan.inprocess import InProcessHub
from common.protocol import BN_SYNC_HUB, CONFIG_RECORD, MODEL_RECORD
from common.transports.base import (
    FailureKind,
    RoundFailure,
    RoundPlan,
    RoundSync,
    Transport,
    preflight_plan,
)
from common.transports.exchange import exchange


class OpenHub:
    """An attempt's hub, the rank of each of its nodes, and the first node that failed."""

    def __init__(self, nodes: Sequence[int], timeout: float) -> None:
        # The plan's node order is the order the hub combines in, as for every transport.
        self.hub = InProcessHub(len(nodes), timeout=timeout)
        self.ranks = {node: rank for rank, node in enumerate(nodes)}
        self.failed: dict[int, str] = {}  # nodes that failed on their own, and why
        self.echoed: set[int] = set()  # nodes whose error came out of the hub (an echo)

    def fail(self, node: int, error: BaseException) -> None:
        """``node`` cannot finish its step: release the others now, and remember who."""
        with _OPEN_HUBS_LOCK:
            self.failed[node] = f"{type(error).__name__}: {error}"
        self.hub.abort(BNSyncError(f"node {node} failed its synced step: {error}"))


# The hubs of the attempts in flight, by key (see the module doc).
OPEN_HUBS: dict[str, OpenHub] = {}
_OPEN_HUBS_LOCK = threading.Lock()
_KEYS = itertools.count()


class InProcessTransport(Transport):
    """The BN statistics travel through an in-process hub per attempt at a round."""

    def open_round(self, grid: Grid, plan: RoundPlan) -> InProcessRound:
        return InProcessRound(plan)

    def check(self, grid: Grid, nodes: Sequence[int], timeout: float) -> None:
        """Before round 1: ``nodes`` meet at a hub once, which only clients of this process can
        (and only if they all run at once)."""
        sync = InProcessRound(preflight_plan(nodes, timeout))
        try:
            exchange(grid, sync.train_messages(), timeout=timeout)
            sync.finish()
        except RoundFailure as failure:
            raise RuntimeError(
                "the BN sync check before round 1 failed: transport 'inprocess' needs every "
                "client of a round running at once as a thread of the ServerApp's process "
                f"(server.local_run.run_locally); use transport 'grpc' otherwise. "
                f"{sync.abort(failure)}"
            ) from None


class InProcessRound(RoundSync):
    """One hub, open from ``__init__`` until ``finish`` or ``abort``."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.open_hub = OpenHub(plan.nodes, plan.timeout)
        self.key = f"round-{plan.server_round}-attempt-{plan.attempt}-{next(_KEYS)}"
        with _OPEN_HUBS_LOCK:
            OPEN_HUBS[self.key] = self.open_hub

    def train_messages(self) -> list[Message]:
        config = ConfigRecord({**self.plan.config, BN_SYNC_HUB: self.key})
        content = RecordDict({MODEL_RECORD: self.plan.arrays, CONFIG_RECORD: config})
        return [
            Message(
                content,
                dst_node_id=node,
                message_type=self.plan.message_type,
                group_id=self.plan.group_id,
            )
            for node in self.plan.nodes
        ]

    def finish(self) -> None:
        """Every client is done: check what they exchanged (the hub defers that to here)."""
        self._close()
        try:
            self.open_hub.hub.verify()
        except BNSyncError as error:
            nodes = {rank: node for node, rank in self.open_hub.ranks.items()}
            culprit = nodes.get(error.sender)  # type: ignore[arg-type]
            raise RoundFailure(
                f"BN sync round refused: {error}",
                FailureKind.BAD_REPLY if culprit is not None else FailureKind.DISAGREEMENT,
                () if culprit is None else {culprit},
            ) from error

    def abort(self, failure: RoundFailure) -> RoundFailure:
        """Release clients still at the hub. At fault: the nodes that failed on their own, else
        those of ``failure`` whose error was not an echo of the hub's abort (a silent node)."""
        open_hub = self.open_hub
        open_hub.hub.abort(BNSyncError(f"round aborted: {failure}"))
        self._close()
        if open_hub.failed:
            return RoundFailure(
                f"BN sync round aborted by node(s) {sorted(open_hub.failed)}: {open_hub.failed}",
                FailureKind.SYNC_ABORTED,
                open_hub.failed,
                open_hub.failed,
            )
        culprits = failure.culprits - open_hub.echoed
        return RoundFailure(
            str(failure),
            failure.kind if culprits else FailureKind.SYNC_ABORTED,
            culprits,
            {node: why for node, why in failure.reasons.items() if node in culprits},
        )

    def _close(self) -> None:
        with _OPEN_HUBS_LOCK:
            OPEN_HUBS.pop(self.key, None)


class InProcessBNChannel(BNChannel):
    """A client's end of the hub its train message names; used as a context manager, so that
    a client that fails releases the others at once instead of after their timeout."""

    def __init__(self, config: ConfigRecord, node_id: int) -> None:
        key = str(config[BN_SYNC_HUB])
        with _OPEN_HUBS_LOCK:
            open_hub = OPEN_HUBS.get(key)
        if open_hub is None:
            raise BNSyncError(
                f"no in-process BN sync hub {key!r} here: transport 'inprocess' needs the client "
                "in the ServerApp's process (server.local_run.run_locally), or the round is over"
            )
        if node_id not in open_hub.ranks:
            raise BNSyncError(f"node {node_id} is not a client of in-process hub {key!r}")
        self.open_hub, self.node_id = open_hub, node_id
        self.channel = open_hub.hub.channel(open_hub.ranks[node_id])

    def __enter__(self) -> InProcessBNChannel:
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _traceback: object) -> None:
        if exc is not None and self.node_id not in self.open_hub.echoed:
            self.open_hub.fail(self.node_id, exc)

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        with self._hub_errors_are_echoes():
            return self.channel.reduce_moments(layer, local)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        with self._hub_errors_are_echoes():
            return self.channel.reduce_grad_sums(layer, local)

    @contextmanager
    def _hub_errors_are_echoes(self) -> Iterator[None]:
        """An error out of the hub echoes another client's failure, or a timeout: not ours."""
        try:
            yield
        except BNSyncError:
            self.open_hub.echoed.add(self.node_id)
            raise
