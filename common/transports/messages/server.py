"""The server's side of the synced step over Flower messages: 2L exchanges, layer by layer.

Forward, for each BN layer in the order the step reaches them, every client replies with its
local moments and the server combines them; backward, the same with the gradient sums. Each
query carries the union statistics known so far, so the clients stay stateless.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.fedtan.bn_channel import (
    BNSyncError,
    check_grad_sums,
    check_moments,
    combine_grad_sums,
    combine_moments,
)
from common.transports.exchange import MODEL_KEY, RoundFailure, Traffic, exchange
from common.transports.messages.records import BACKWARD, FORWARD, UnionStats, parse_local_stats

_COMBINE = {
    FORWARD: (check_moments, combine_moments),
    BACKWARD: (check_grad_sums, combine_grad_sums),
}


def sync_over_messages(
    grid: Grid,
    nodes: Sequence[int],
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    sync_points: tuple[Sequence[str], Sequence[str]],
    timeout: float,
    traffic: Traffic | None = None,
) -> UnionStats:
    """Run the 2L exchanges of ``server_round`` and return the union statistics of the step."""
    union = UnionStats()
    first = True
    for phase, layers, known in (
        (FORWARD, sync_points[0], union.forward),
        (BACKWARD, sync_points[1], union.backward),
    ):
        check, combine = _COMBINE[phase]
        for index, layer in enumerate(layers):
            query = ConfigRecord({**config, "round": server_round, "index": index, "layer": layer})
            content = RecordDict({"config": query, **union.to_records()})
            if first:  # the round's global model travels once; clients keep it for the round
                content[MODEL_KEY] = arrays
                first = False
            messages = [
                Message(
                    content,
                    dst_node_id=node,
                    message_type=f"query.bn_{phase}",
                    group_id=f"fedtan-round-{server_round}",
                )
                for node in nodes
            ]
            replies = exchange(grid, messages, timeout=timeout, traffic=traffic)
            parts = {}
            for node, reply in replies.items():
                try:
                    parts[node] = parse_local_stats(
                        reply.content,
                        sender=node,
                        phase=phase,
                        index=index,
                        layer=layer,
                        server_round=server_round,
                    )
                    check(node, layer, parts[node])
                except BNSyncError as error:
                    raise RoundFailure(str(error), {node}) from error
            try:
                known.append((layer, combine(layer, parts)))
            except BNSyncError as error:  # disagreement between clients: nobody singled out
                raise RoundFailure(str(error)) from error
    return union
