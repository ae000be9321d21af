"""exchange(): the server's round trip pulls replies itself, soon after they arrive.

Flower's ``Grid.send_and_receive`` sleeps a fixed 0.1 s (simulation) or 3 s (deployment)
between pulls; ``exchange`` pushes and pulls through the public Grid API instead, so a reply is
picked up within an eighth of the time waited (at least 2 ms, at most 0.2 s), and a missing
one is waited for until the timeout, then named. Time is a fake clock here, so the schedule is
checked exactly on any machine.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.transports import exchange as exchange_module
from common.transports.base import RoundFailure
from common.transports.exchange import MAX_PULL_INTERVAL, exchange, send_and_receive
from server.local_run import flower_in_this_process

NODES = (11, 12, 13)


class Clock:
    """Time that passes only when the code under test sleeps: exact, on any machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "a pull loop must not spin"
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(exchange_module, "time", clock)
    return clock


@pytest.fixture(autouse=True)
def as_a_serverapp():
    """Messages are stamped with the ServerApp's identity, which Flower's runtime would set."""
    with flower_in_this_process():
        yield


class TimedGrid(Grid):
    """A Grid whose node n replies ``delays[n]`` seconds after the push (never if None)."""

    def __init__(self, clock: Clock, delays: dict[int, float | None]) -> None:
        self.clock = clock
        self.delays = delays
        self.pulls = 0
        self._due: dict[str, tuple[float, Message]] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for k, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{k}"
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                reply = Message(RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                self._due[f"m{k}"] = (self.clock.now + delay, reply)
            ids.append(f"m{k}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        now = self.clock.now
        ready = [i for i in message_ids if i in self._due and self._due[i][0] <= now]
        return [self._due.pop(i)[1] for i in ready]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("exchange must not use send_and_receive's fixed sleep")

    def get_node_ids(self):
        return list(self.delays)

    # Unused here; Grid declares them.
    def set_run(self, run_id):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


def messages() -> list[Message]:
    return [
        Message(RecordDict(), dst_node_id=node, message_type="train.x", group_id="g")
        for node in NODES
    ]


@pytest.mark.parametrize("last_reply", [0.001, 0.01, 0.3, 1.0, 20.0])
def test_replies_are_picked_up_soon_after_they_arrive(clock, last_reply):
    grid = TimedGrid(clock, {11: 0.0, 12: last_reply / 2, 13: last_reply})
    replies = exchange(grid, messages(), timeout=600.0)
    assert sorted(replies) == list(NODES)
    # Picked up by the first pull after it arrived: at most an eighth of the time waited (and
    # at least 2 ms, at most 0.2 s) later. Flower's loop would wait for the next 0.1 s mark.
    picked_up = clock.now
    assert picked_up <= max(last_reply + 0.002, last_reply * 8 / 7) + 1e-9
    assert picked_up <= last_reply + MAX_PULL_INTERVAL + 1e-9
    # And without many pulls: about 50 while the interval grows from 2 ms to its cap (8 at 2 ms,
    # then 12.5 % longer each time), then 5 per second.
    assert grid.pulls <= 60 + last_reply / MAX_PULL_INTERVAL


def test_a_missing_reply_is_waited_for_until_the_timeout_then_named(clock):
    grid = TimedGrid(clock, {11: 0.0, 12: None, 13: 0.0})
    with pytest.raises(RoundFailure, match="node 12: no reply within 30 s") as failure:
        exchange(grid, messages(), timeout=30.0)
    assert failure.value.culprits == {12}
    assert clock.now == pytest.approx(30.0)
    assert grid.pulls <= 60 + 30.0 / MAX_PULL_INTERVAL


def test_send_and_receive_returns_what_arrived_by_the_timeout(clock):
    grid = TimedGrid(clock, {11: 0.0, 12: 0.05, 13: 5.0})
    replies = send_and_receive(grid, messages(), timeout=0.3)
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12]
    assert clock.now == pytest.approx(0.3)
