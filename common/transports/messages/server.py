"""Transport "messages", server side: the synced step as 2L Flower query exchanges.

Forward, for each BN layer in the order the step reaches them, every client replies with its
local moments and the server combines them; backward, the same with the gradient sums. Each
query carries the union statistics known so far, so the clients stay stateless. The train
messages then carry all of them (``common/transports/messages/client.py`` replays them).
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.fedtan.bn_channel import BNSyncError
from common.protocol import (
    BACKWARD,
    CONFIG_RECORD,
    FORWARD,
    MODEL_RECORD,
    PHASES,
    SYNC_INDEX,
    SYNC_LAYER,
)
from common.transports.base import (
    DirectRound,
    FailureKind,
    RoundFailure,
    RoundPlan,
    Transport,
)
from common.transports.exchange import exchange
from common.transports.messages.records import UnionStats, parse_local_stats

SyncPoints = tuple[Sequence[str], Sequence[str]]  # BN layers reached forward, then backward


class MessagesTransport(Transport):
    """The BN statistics travel in Flower messages; nothing but Flower is needed.

    ``sync_points``: the model's BN layers in the order a synced step reaches them, forward and
    backward (``common.fedtan.bn_sync.trace_sync_points``).
    """

    def __init__(self, sync_points: SyncPoints) -> None:
        self.sync_points = sync_points

    def open_round(self, grid: Grid, plan: RoundPlan) -> DirectRound:
        union = sync_over_messages(grid, plan, self.sync_points)
        content = RecordDict({CONFIG_RECORD: plan.config, **union.to_records()})
        return DirectRound(
            Message(
                content, dst_node_id=node, message_type=plan.message_type, group_id=plan.group_id
            )
            for node in plan.nodes
        )


def sync_over_messages(grid: Grid, plan: RoundPlan, sync_points: SyncPoints) -> UnionStats:
    """Run the 2L exchanges of ``plan`` and return the union statistics of the step."""
    union = UnionStats()
    model = plan.arrays  # travels once, with the first query; clients keep it for the round
    for phase, layers, known in (
        (FORWARD, sync_points[0], union.forward),
        (BACKWARD, sync_points[1], union.backward),
    ):
        for index, layer in enumerate(layers):
            query = ConfigRecord({**plan.config, SYNC_INDEX: index, SYNC_LAYER: layer})
            content = RecordDict({CONFIG_RECORD: query, **union.to_records()})
            if model is not None:
                content[MODEL_RECORD], model = model, None
            known.append((layer, _exchange_layer(grid, plan, content, phase, index, layer)))
    return union


def _exchange_layer(
    grid: Grid, plan: RoundPlan, content: RecordDict, phase: str, index: int, layer: str
) -> object:
    """One exchange: every node's statistics of sync point ``index``, combined."""
    messages = [
        Message(content, dst_node_id=node, message_type=PHASES[phase].query, group_id=plan.group_id)
        for node in plan.nodes
    ]
    replies = exchange(grid, messages, timeout=plan.timeout, traffic=plan.traffic)
    parts = {}
    for node in plan.nodes:  # the plan's order, not the replies' arrival: reproducible sums
        reply = replies[node]
        try:
            parts[node] = parse_local_stats(
                reply.content,
                sender=node,
                phase=phase,
                index=index,
                layer=layer,
                server_round=plan.server_round,
            )
            PHASES[phase].check(node, layer, parts[node])
        except BNSyncError as error:
            raise RoundFailure(str(error), FailureKind.BAD_REPLY, {node}) from error
    try:
        return PHASES[phase].combine(layer, parts)
    except BNSyncError as error:  # disagreement between clients: nobody singled out
        raise RoundFailure(str(error), FailureKind.DISAGREEMENT) from error
