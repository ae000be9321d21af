"""One server round trip: a message to each node, exactly one good reply from each, or a failure.

Every FedTAN exchange needs all the round's clients, so a missing, failed or foreign reply stops
the round; the ``RoundFailure`` names the nodes at fault so the strategy can retry without them.

Replies are pulled with a short interval of our own (``push_messages`` +
``pull_messages``, both public Grid API) rather than through ``Grid.send_and_receive``, which
sleeps 0.1 s (simulation) or 3 s (deployment) between pulls: that sleep was most of a round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.protocol import MODEL_RECORD
from common.transports.base import FailureKind, RoundFailure


@dataclass
class Traffic:
    """What a round cost on the wire: sequential round trips, and bytes of model vs. BN data."""

    round_trips: int = 0
    model_bytes: int = 0
    bn_bytes_down: int = 0
    bn_bytes_up: int = 0

    def add(self, sent: Sequence[Message], replies: Sequence[Message]) -> None:
        self.round_trips += 1
        for msg in sent:
            model, other = _split_bytes(msg.content)
            self.model_bytes += model
            self.bn_bytes_down += other
        for msg in replies:
            model, other = _split_bytes(msg.content)
            self.model_bytes += model
            self.bn_bytes_up += other


def exchange(
    grid: Grid, messages: Sequence[Message], *, timeout: float, traffic: Traffic | None = None
) -> dict[int, Message]:
    """Send ``messages`` (one per node); return each node's reply, or raise ``RoundFailure``."""
    expected = {msg.metadata.dst_node_id: msg.metadata for msg in messages}
    replies: dict[int, Message] = {}
    problems: dict[int, str] = {}
    for reply in send_and_receive(grid, messages, timeout=timeout):
        node, sent = reply.metadata.src_node_id, expected.get(reply.metadata.src_node_id)
        if sent is None or reply.metadata.group_id != sent.group_id:
            continue  # not a reply to this exchange (late or foreign): never used
        if reply.has_error():
            problems[node] = f"error {reply.error.code}: {reply.error.reason}"
        elif reply.metadata.message_type != sent.message_type:
            problems[node] = f"replied with {reply.metadata.message_type!r}"
        elif node in replies:
            problems[node] = "replied twice"
        else:
            replies[node] = reply
    for node in expected:
        if node not in replies and node not in problems:
            problems[node] = f"no reply within {timeout:g} s"
    if problems:
        kind = messages[0].metadata.message_type
        detail = "; ".join(f"node {node}: {why}" for node, why in sorted(problems.items()))
        raise RoundFailure(f"{kind} failed: {detail}", FailureKind.EXCHANGE, problems, problems)
    replies = {node: replies[node] for node in expected}  # in the order sent, not of arrival
    if traffic is not None:
        traffic.add(messages, list(replies.values()))
    return replies


# The pull interval is an eighth of the time waited so far, between 2 ms and 0.2 s: a reply is
# picked up at most 12.5 % (or 0.2 s) after it arrived, and a long wait (a deployed round of
# tens of seconds, where each pull is a request to the SuperLink) costs 5 pulls a second.
FIRST_PULL_INTERVAL = 0.002
MAX_PULL_INTERVAL = 0.2
PULL_INTERVAL_FRACTION = 1 / 8


def send_and_receive(grid: Grid, messages: Sequence[Message], *, timeout: float) -> list[Message]:
    """Push ``messages``, then pull replies until every message has one or ``timeout`` passes.

    What ``Grid.send_and_receive`` does, with a pull interval of ``PULL_INTERVAL_FRACTION`` of
    the time waited so far, between ``FIRST_PULL_INTERVAL`` and ``MAX_PULL_INTERVAL`` seconds,
    instead of Flower's fixed sleep.
    """
    pending = {msg_id for msg_id in grid.push_messages(messages) if msg_id}
    return receive(grid, pending, timeout=timeout)


def receive(grid: Grid, message_ids: Iterable[str], *, timeout: float) -> list[Message]:
    """Pull the replies to the pushed ``message_ids`` until each has one or ``timeout`` passes
    (the second half of ``send_and_receive``)."""
    pending = set(message_ids)
    started = time.monotonic()
    deadline = started + timeout
    received: list[Message] = []
    while pending:
        replies = list(grid.pull_messages(pending))
        received.extend(replies)
        pending -= {reply.metadata.reply_to_message_id for reply in replies}
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        waited = (now - started) * PULL_INTERVAL_FRACTION
        interval = min(max(FIRST_PULL_INTERVAL, waited), MAX_PULL_INTERVAL)
        time.sleep(min(interval, deadline - now))
    return received


def _split_bytes(content: RecordDict) -> tuple[int, int]:
    model = other = 0
    for key, record in content.array_records.items():
        # From shape and dtype: deserializing every array only to count its bytes cost more
        # than the accounting is worth.
        size = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())
        if key == MODEL_RECORD:
            model += size
        else:
            other += size
    return model, other
