"""The real ServerApp and ClientApp code in one process, over an in-memory Flower Grid.

``run_locally(run_config)`` is a whole run of the app without SuperLink, SuperNodes or Ray: the
strategy talks to the ClientApp through ``LocalGrid``, which gives each node its own ``Context``
(node config with its partition, persistent state) and hands every message to
``ClientApp.__call__`` exactly as a SuperNode would; a handler that raises becomes an error
reply (code 2), as in Flower. ``faults`` lets a test corrupt, drop or fail one node's replies.
Used by ``scripts/compare.py`` and the tests; far cheaper than Ray on a small machine.

Flower's runtime gives its apps two things this process must then provide, and does so only
inside ``flower_in_this_process()``: the ServerApp task identity that outgoing messages are
stamped with, and (nodes run in threads here) one ``ast.literal_eval`` at a time.
"""

from __future__ import annotations

import ast
import copy
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore.task_identity import TaskIdentity

from common.experiment.config import RunConfig
from server.app import run_fedtan

Fault = Callable[[Message], Message | None]  # returns the reply to deliver, or None (dropped)

RUN_ID, SERVERAPP_TASK_ID, SUPERLINK_NODE_ID = 1, 1, 0
FIRST_NODE_ID = 1000  # node k of a LocalGrid is FIRST_NODE_ID + k


def run_locally(
    client_app: ClientApp,
    run_config: Mapping[str, object],
    *,
    faults: Mapping[int, Fault] | None = None,
    num_nodes: int | None = None,
    concurrency: int | None = None,
    node_ids: Sequence[int] | None = None,
) -> tuple[Result, LocalGrid]:
    """One run of ``run_config`` (Flower run config keys) by ``server.app.run_fedtan`` with
    ``client_app`` on ``num_nodes`` in-memory nodes (default: its ``num-clients``).

    ``concurrency``: how many nodes handle messages at once (like Ray actors); None: all.
    ``node_ids``: the node ids, one per partition (Flower draws them at random per run).
    Returns the run's result and the grid, which holds every message it sent.
    """
    cfg = RunConfig.from_flower(run_config)
    grid = LocalGrid(
        client_app, num_nodes or cfg.num_clients, run_config, faults, concurrency, node_ids
    )
    with flower_in_this_process():
        try:
            return run_fedtan(grid, cfg), grid
        finally:
            grid.join()  # no node thread outlives the run


@contextmanager
def flower_in_this_process() -> Iterator[None]:
    """What Flower's runtime provides a ServerApp, for apps run in this process; undone on exit.

    * ``TaskIdentity``: the ids a ServerApp's new messages are stamped with (Flower's
      ``run_serverapp`` sets them from the SuperLink's task).
    * ``ast.literal_eval`` one call at a time: numpy parses the .npy header of every Flower
      ``Array`` with it, and CPython < 3.11.9 can fail two parses in parallel threads ("AST
      constructor recursion depth mismatch", gh-106905); Flower runs each ClientApp in a
      process of its own, this module runs them in threads.
    """
    saved_identity = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    literal_eval, parse_lock = ast.literal_eval, threading.Lock()

    def one_at_a_time(node_or_string: object) -> object:
        with parse_lock:
            return literal_eval(node_or_string)

    TaskIdentity.run_id, TaskIdentity.task_id = RUN_ID, SERVERAPP_TASK_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    ast.literal_eval = one_at_a_time
    try:
        yield
    finally:
        ast.literal_eval = literal_eval
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved_identity


class LocalGrid(Grid):
    """An in-memory Grid of ``num_nodes`` nodes that run ``client_app`` in threads; node k
    trains on partition k and has id ``node_ids[k]`` (default ``FIRST_NODE_ID + k``)."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping,
        faults: Mapping[int, Fault] | None = None,
        concurrency: int | None = None,
        node_ids: Sequence[int] | None = None,
    ) -> None:
        self.client_app = client_app
        self.node_ids = list(node_ids or (FIRST_NODE_ID + k for k in range(num_nodes)))
        if len(self.node_ids) != num_nodes or len(set(self.node_ids)) != num_nodes:
            raise ValueError(f"need {num_nodes} distinct node ids, got {self.node_ids}")
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                state=RecordDict(),
                run_config=dict(run_config),
                node_config={"partition-id": k, "num-partitions": num_nodes},
            )
            for k, node in enumerate(self.node_ids)
        }
        self.faults = dict(faults or {})
        self.concurrency = concurrency  # nodes working at once (Ray actors); None: all
        self.sent: list[Message] = []
        self._ids = itertools.count()
        self._replies: dict[str, Future[Message | None]] = {}  # by the id of what they answer

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver ``messages`` and return at once, as Flower's grid does (a block of rounds
        needs that: its clients run while the server goes on); replies wait for
        ``pull_messages``."""
        batch = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # as if it crossed the network
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"  # the SuperLink sets it
            self.sent.append(msg)
            batch.append(msg)
        # Nodes work at the same time, as SuperNodes do (the gRPC transport relies on it).
        pool = ThreadPoolExecutor(max_workers=self.concurrency or max(1, len(batch)))
        for msg in batch:
            self._replies[msg.metadata.message_id] = pool.submit(self._handle, msg)
        pool.shutdown(wait=False)  # its threads end with their messages
        return [msg.metadata.message_id for msg in batch]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived (a dropped one never does)."""
        done = [i for i in list(message_ids) if i in self._replies and self._replies[i].done()]
        replies = [self._replies.pop(i).result() for i in done]
        return [reply for reply in replies if reply is not None]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        wait([self._replies[i] for i in ids], timeout=timeout)
        return self.pull_messages(ids)

    def join(self) -> None:
        """Wait until every node has handled every message pushed to it."""
        wait(list(self._replies.values()))

    def _handle(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        try:
            reply = self.client_app(msg, self.contexts[node])
            if node in self.faults:  # a fault may also raise, as a failing ClientApp does
                reply = self.faults[node](reply)
        except Exception as error:  # noqa: BLE001 - Flower turns it into an error reply
            reply = Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=msg)
        return None if reply is None else copy.deepcopy(reply)

    # Unused by the strategy; present because Grid declares them.
    def set_run(self, run_id: int) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError
