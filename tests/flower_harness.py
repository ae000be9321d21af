"""An in-memory Flower Grid for tests: the real ServerApp strategy talks to the real ClientApp.

Each node gets its own ``Context`` (node config with its partition, persistent state); every
message is handled by ``ClientApp.__call__`` exactly as a SuperNode would, and a handler that
raises becomes an error reply (code 2), as in Flower. ``faults`` lets a test corrupt, drop or
fail one node's replies.
"""

from __future__ import annotations

import ast
import copy
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Fault = Callable[[Message], Message | None]  # returns the reply to deliver, or None (dropped)

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

# Nodes handle messages in threads here (in Flower each ClientApp has a process of its own).
# CPython < 3.11.9 can fail ast.literal_eval, which numpy uses to read the .npy headers of
# Flower's Arrays, when two threads parse at once ("AST constructor recursion depth
# mismatch", gh-106905); one parse at a time avoids it.
_literal_eval, _parse_lock = ast.literal_eval, threading.Lock()


def _serialized_literal_eval(node_or_string):
    with _parse_lock:
        return _literal_eval(node_or_string)


ast.literal_eval = _serialized_literal_eval


class LocalGrid(Grid):
    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping,
        faults: Mapping[int, Fault] | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.client_app = client_app
        self.node_ids = [1000 + k for k in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=1,
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

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        batch = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # as if it crossed the network
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"  # the SuperLink sets it
            self.sent.append(msg)
            batch.append(msg)
        # Nodes work at the same time, as SuperNodes do (the gRPC transport relies on it).
        with ThreadPoolExecutor(max_workers=self.concurrency or max(1, len(batch))) as pool:
            replies = list(pool.map(self._handle, batch))
        return [reply for reply in replies if reply is not None]

    def _handle(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        try:
            reply = self.client_app(msg, self.contexts[node])
            if node in self.faults:  # a fault may also raise, as a failing ClientApp does
                reply = self.faults[node](reply)
        except Exception as error:  # noqa: BLE001
            # Flower's ClientApp runtime (flwr/supernode/runtime/run_clientapp.py) catches every
            # Exception a ClientApp raises and sends an error reply instead; so does this grid.
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

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError
