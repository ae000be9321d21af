"""The strategies: one round loop for every method, and FedTAN, whose rounds start with a
synchronized step of the BN layers (the baselines are in ``server/baselines.py``).

``RoundStrategy`` is a Flower ``Strategy``: ``configure_train`` / ``aggregate_train`` and
``configure_evaluate`` / ``aggregate_evaluate`` are Flower's, and ``start`` is Flower's loop
plus what a long run needs: a seeded client sampler, a round that fails (a client silent,
erroring or sending bad statistics) is retried without the clients at fault or ends the run
cleanly, and the global model only ever changes by a complete round. Each attempt at a round is
a ``RoundPlan`` driven through a ``RoundSync`` (``common/transports/base.py``); FedTAN's comes
from its transport, so the strategy never asks which transport it has. Where a transport's
rounds train by themselves (a block of rounds), the next round is opened before the last one is
evaluated and recorded, and abandoned if that one fails after all.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from common.protocol import (
    CONFIG_RECORD,
    EVALUATE_LOCAL,
    LR,
    METRICS_RECORD,
    MODEL_RECORD,
    NUM_EXAMPLES,
    PARTITION_ID,
    QUERY_PARTITION,
    SERVER_ROUND,
    TEST_ACCURACY,
    TEST_LOSS,
    TRAIN_FEDTAN,
    TRAIN_LOCAL,
    TRAIN_LOSS,
)
from common.state_records import record_to_state, state_to_record
from common.transports.averaging import ClientUpdate, average_updates
from common.transports.base import (
    DirectRound,
    FailureKind,
    RoundFailure,
    RoundPlan,
    RoundSync,
    Transport,
)
from common.transports.exchange import Traffic, exchange

RoundCallback = Callable[[int, Result, dict[str, float]], None]


@dataclasses.dataclass(frozen=True)
class OpenedRound:
    """An attempt at a round, opened: its plan, its ``RoundSync`` and where its traffic is
    counted. A round opened ahead (``Transport.trains_ahead``) trains while the round before it
    is evaluated and recorded."""

    plan: RoundPlan
    sync: RoundSync
    traffic: Traffic  # the plan's

    def abandon(self, why: str) -> None:
        """The round is not wanted after all: release it, and its clients stop."""
        self.sync.abort(RoundFailure(why, FailureKind.EXCHANGE))


# A round's evaluation: by the clients (configure_evaluate) and by the server (evaluate_fn).
Evaluation = tuple[MetricRecord | None, MetricRecord | None]


class RoundStrategy(Strategy):
    """The round loop every method shares; on its own, FedAvg of E plain local steps.

    Shared: seeded sampling, retries without the clients at fault, sample-weighted averaging,
    the per-round callback with the round's cost, client-side evaluation. A method changes how a
    round trains (``open_sync``; ``run_round`` when the server trains itself) and which
    ``local_keys`` of the state stay on the clients: never sent down, never expected back, never
    overwritten by the average.

    ``clients_per_round``: 0 takes every connected node; otherwise a sample drawn from ``seed``
    and the round number. ``on_failure``: "retry" (without the culprits, up to ``max_retries``
    times) or "stop". ``evaluate_on_clients``: every round that ``eval_interval`` divides (and
    the last), the clients evaluate the shared entries with their own (no one global model).
    ``lr_schedule``: the learning rate of a round; ``on_round``: called after every good round.
    """

    message_type = TRAIN_LOCAL

    def __init__(
        self,
        *,
        name: str = "fedavg",
        local_keys: Iterable[str] = (),
        num_clients: int,
        clients_per_round: int = 0,
        seed: int = 0,
        on_failure: str = "retry",
        max_retries: int = 2,
        lr_schedule: Callable[[int], float] | None = None,
        on_round: RoundCallback | None = None,
        evaluate_on_clients: bool = False,
        eval_interval: int = 1,
        min_nodes_timeout: float | None = None,
    ) -> None:
        self.name = name
        self.local_keys = frozenset(local_keys)
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.on_failure = on_failure
        self.max_retries = max_retries
        self.lr_schedule = lr_schedule
        self.on_round = on_round
        self.evaluate_on_clients = evaluate_on_clients
        self.eval_interval = eval_interval
        self.min_nodes_timeout = min_nodes_timeout  # None: the exchange timeout
        # Clients are known by their data partition (asked once per node, QUERY_PARTITION):
        # Flower's node ids change with every simulation and SuperLink, the partitions do not,
        # so sampling, the order in which clients are combined (float sums depend on it) and
        # the exclusion of failed clients are the same in every run and after a resume.
        self.partitions: dict[int, int] = {}  # node id -> its partition
        self.excluded: set[int] = set()  # nodes that failed a round of this run
        self.excluded_partitions: set[int] = set()  # ... their partitions: never sampled again
        self.resumed: tuple[int, frozenset[int]] = (0, frozenset())  # see resume_from
        self.stop_reason: str | None = None  # why the last start() ended before its last round

    def describe(self) -> str:
        return f"{self.name}: {len(self.local_keys)} state entries stay on the clients"

    def summary(self) -> None:
        log(INFO, "\t├──> %s", self.describe())
        log(
            INFO,
            "\t└──> Clients per round: %s of %d; on failure: %s (max %d retries)",
            self.clients_per_round or "all",
            self.num_clients,
            self.on_failure,
            self.max_retries,
        )

    # --- Flower's Strategy ---------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The train messages of a first attempt without a synced step (Flower's loop)."""
        plan = self.plan_round(grid, server_round, 0, arrays, config, timeout=3600.0)
        return [self.train_message(plan, node) for node in plan.nodes]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Sample-weighted average of the clients' whole model states, dtypes preserved, added
        in the clients' partition order (the same sums in every run, and in a block of rounds:
        ``common/transports/averaging.py``)."""
        updates = [self._client_update(reply) for reply in replies]
        averaged, metrics = average_updates(updates)
        return state_to_record(averaged), MetricRecord(metrics)

    def _client_update(self, reply: Message) -> ClientUpdate:
        node = reply.metadata.src_node_id
        try:
            metrics = reply.content.metric_records[METRICS_RECORD]
            update = ClientUpdate(
                node=node,
                partition_id=int(metrics.get(PARTITION_ID, self.partitions.get(node, -1))),
                num_examples=int(metrics[NUM_EXAMPLES]),
                train_loss=float(metrics[TRAIN_LOSS]),
                state=record_to_state(reply.content.array_records[MODEL_RECORD]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise RoundFailure(
                f"node {node}: malformed train reply ({error!r})", FailureKind.BAD_REPLY, {node}
            ) from None
        if not update.num_examples > 0:
            raise RoundFailure(
                f"node {node}: {NUM_EXAMPLES} must be > 0", FailureKind.BAD_REPLY, {node}
            )
        return update

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """With ``evaluate_on_clients``: every available client evaluates the shared global
        entries with its own ones on the test data; otherwise nothing to send."""
        if not self.evaluate_on_clients:
            return []
        nodes = [n for n in self.in_partition_order(grid.get_node_ids()) if self.may_take_part(n)]
        config = ConfigRecord({**config, SERVER_ROUND: server_round})
        content = RecordDict({CONFIG_RECORD: config, MODEL_RECORD: self.shared(arrays)})
        return [
            Message(
                content,
                dst_node_id=node,
                message_type=EVALUATE_LOCAL,
                group_id=f"{self.name}-evaluate-{server_round}",
            )
            for node in nodes
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The clients' mean test loss and accuracy, and the accuracy's spread."""
        replies = sorted(replies, key=lambda reply: self.order_key(reply.metadata.src_node_id))
        results = [r.content.metric_records[METRICS_RECORD] for r in replies]
        if not results:
            return None
        losses = [float(m[TEST_LOSS]) for m in results]
        accuracies = [float(m[TEST_ACCURACY]) for m in results]
        return MetricRecord(
            {
                TEST_LOSS: sum(losses) / len(losses),
                TEST_ACCURACY: sum(accuracies) / len(accuracies),
                f"{TEST_ACCURACY}-min": min(accuracies),
                f"{TEST_ACCURACY}-max": max(accuracies),
                "eval-clients": len(results),
            }
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop; a failed round leaves the global model as it was.

        ``timeout``: seconds to wait for the replies of one exchange (and for the clients to
        connect); ``evaluate_config`` goes to the clients with ``configure_evaluate``.
        """
        log(INFO, "Starting %s for %d rounds:", self.name, num_rounds)
        self.summary()
        # A resumed run leaves out the partitions it had left out before the restart.
        rounds_done, excluded_partitions = self.resumed
        self.excluded_partitions |= excluded_partitions
        self.stop_reason = None
        result = Result(arrays=initial_arrays)
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()

        def evaluate(server_round: int, arrays: ArrayRecord, traffic: Traffic) -> Evaluation:
            on_clients = None
            if server_round % self.eval_interval == 0 or server_round == num_rounds:
                messages = self.configure_evaluate(server_round, arrays, evaluate_config, grid)
                on_clients = self._collect_evaluation(
                    grid, server_round, list(messages), timeout=timeout, traffic=traffic
                )
            on_server = None if evaluate_fn is None else evaluate_fn(server_round, arrays)
            return on_clients, on_server

        def record(server_round: int, evaluation: Evaluation) -> None:
            for metrics, into in zip(
                evaluation,
                (result.evaluate_metrics_clientapp, result.evaluate_metrics_serverapp),
                strict=True,
            ):
                if metrics is not None:
                    into[server_round] = metrics

        if rounds_done == 0:
            record(0, evaluate(0, result.arrays, Traffic()))
        # A round's seconds run from the previous round's end to its own: the bookkeeping in
        # between (recording, sampling) is part of what a round costs.
        previous_end = time.monotonic()
        # The next round, when it was opened ahead: its clients train while this one ends.
        ahead: OpenedRound | None = None
        try:
            for server_round in range(rounds_done + 1, num_rounds + 1):
                opened, ahead = ahead, None  # the round's own from here
                traffic = opened.traffic if opened is not None else Traffic()
                eval_traffic = Traffic()
                outcome = self._train_round(
                    grid,
                    server_round,
                    result.arrays,
                    train_config,
                    timeout,
                    traffic,
                    evaluate=lambda arrays, r=server_round, t=eval_traffic: evaluate(r, arrays, t),
                    opened=opened,
                    last=server_round == num_rounds,
                )
                if outcome is None:
                    log(
                        WARNING,
                        "Stopping after round %d: the global model of that round is kept",
                        server_round - 1,
                    )
                    break
                arrays, result.train_metrics_clientapp[server_round], evaluation, ahead = outcome
                result.arrays = arrays
                record(server_round, evaluation)
                now = time.monotonic()
                seconds, previous_end = now - previous_end, now
                if self.on_round is not None:
                    cost = {
                        "seconds": seconds,
                        **vars(traffic),
                        "eval_round_trips": eval_traffic.round_trips,
                        "eval_bytes": eval_traffic.model_bytes
                        + eval_traffic.bn_bytes_down
                        + eval_traffic.bn_bytes_up,
                    }
                    self.on_round(server_round, result, cost)
        except BaseException as error:
            if ahead is not None:  # opened for a round the run will not reach
                ahead.abandon(f"the run ended: {error!r}")
            raise
        return result

    def resume_from(self, rounds_done: int, excluded_partitions: Iterable[int]) -> None:
        """Make ``start`` continue a run after its round ``rounds_done`` (``initial_arrays``:
        that round's global model), without the partitions whose clients it had excluded. The
        sampler and the learning rate depend on the round number and the partitions only, so
        the run goes on as if never stopped, whatever node ids Flower gives the clients now.
        """
        self.resumed = (rounds_done, frozenset(excluded_partitions))

    def check_evaluation(self, server_round: int, evaluation: Evaluation) -> None:
        """A round whose model evaluates to a non-finite loss failed: never keep that model."""
        for metrics in evaluation:
            if metrics is None or TEST_LOSS not in metrics:
                continue
            if not math.isfinite(float(metrics[TEST_LOSS])):
                raise RoundFailure(
                    f"round {server_round}: the averaged model's test loss is {metrics[TEST_LOSS]}",
                    FailureKind.DISAGREEMENT,
                )

    # --- one round -----------------------------------------------------------------------------

    def sample_nodes(
        self, grid: Grid, server_round: int, attempt: int = 0, *, timeout: float
    ) -> list[int]:
        """The round's clients, in partition order: seeded, so a rerun samples the same
        partitions whatever their nodes' ids."""
        connected = self.connected_nodes(grid, timeout)
        self.learn_partitions(grid, connected, timeout=timeout)
        available = [n for n in self.in_partition_order(connected) if self.may_take_part(n)]
        if not available:
            raise RoundFailure(
                "no clients left to sample (all failed earlier rounds)", FailureKind.NO_CLIENTS
            )
        wanted = min(self.clients_per_round or len(available), len(available))
        rng = random.Random(f"{self.seed}-{server_round}-{attempt}")
        return self.in_partition_order(rng.sample(available, wanted))

    def learn_partitions(self, grid: Grid, nodes: Iterable[int], *, timeout: float) -> None:
        """Ask the ``nodes`` not asked yet which partition they train on (one exchange); a
        node that cannot say is left out of the run, like a node that failed a round."""
        unknown = [n for n in nodes if n not in self.partitions and n not in self.excluded]
        while unknown:
            messages = [
                Message(
                    RecordDict(), dst_node_id=n, message_type=QUERY_PARTITION, group_id="partition"
                )
                for n in unknown
            ]
            try:
                replies = exchange(grid, messages, timeout=timeout)
                found = {node: _partition_of(node, reply) for node, reply in replies.items()}
            except RoundFailure as failure:
                if not failure.culprits:
                    raise
                log(WARNING, "%s: leaving out nodes %s", failure, sorted(failure.culprits))
                self.excluded |= failure.culprits
                unknown = [n for n in unknown if n not in failure.culprits]
                continue  # the others' replies are asked for again
            for node, partition in found.items():
                self._add_partition(node, partition)
            return

    def _add_partition(self, node: int, partition: int) -> None:
        if partition in self.partitions.values():
            log(WARNING, "Node %d trains on partition %d, as another node does", node, partition)
        self.partitions[node] = partition

    def order_key(self, node: int) -> tuple[float, int]:
        """Where ``node`` goes in the canonical order: by partition, then (unknown) node id."""
        return (self.partitions.get(node, math.inf), node)

    def in_partition_order(self, nodes: Iterable[int]) -> list[int]:
        return sorted(nodes, key=self.order_key)

    def may_take_part(self, node: int) -> bool:
        """Neither the node nor its partition failed a round of this run."""
        return (
            node not in self.excluded and self.partitions.get(node) not in self.excluded_partitions
        )

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The train config of ``server_round``: its number and learning rate."""
        config = ConfigRecord({**config, SERVER_ROUND: server_round})
        if self.lr_schedule is not None:
            config[LR] = self.lr_schedule(server_round)
        return config

    def shared(self, arrays: ArrayRecord) -> ArrayRecord:
        """The entries of the global model that travel: all but the clients' own."""
        if not self.local_keys:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    def plan_round(
        self,
        grid: Grid,
        server_round: int,
        attempt: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        timeout: float,
        traffic: Traffic | None = None,
    ) -> RoundPlan:
        """Attempt ``attempt`` at ``server_round``: its clients, model, config and ids."""
        nodes = self.round_nodes(grid, server_round, attempt, timeout=timeout)
        return RoundPlan(
            server_round=server_round,
            attempt=attempt,
            nodes=nodes,
            arrays=self.shared(arrays),
            config=self.round_config(server_round, config),
            message_type=self.message_type,
            group_id=f"{self.name}-round-{server_round}",
            timeout=timeout,
            traffic=traffic,
            excluded=frozenset(self.excluded)
            | {n for n, p in self.partitions.items() if p in self.excluded_partitions},
        )

    def round_nodes(
        self, grid: Grid, server_round: int, attempt: int, *, timeout: float
    ) -> Sequence[int]:
        """The clients of an attempt at a round: a seeded sample."""
        nodes = self.sample_nodes(grid, server_round, attempt, timeout=timeout)
        log(INFO, "configure_train: round %d, clients %s", server_round, nodes)
        return nodes

    def train_message(self, plan: RoundPlan, node: int) -> Message:
        """A plain train message: the round's config and the shared global entries."""
        content = RecordDict({CONFIG_RECORD: plan.config, MODEL_RECORD: plan.arrays})
        return Message(
            content, dst_node_id=node, message_type=plan.message_type, group_id=plan.group_id
        )

    def open_sync(self, grid: Grid, plan: RoundPlan) -> RoundSync:
        """How ``plan``'s train messages come about; plain methods just send them."""
        return DirectRound(self.train_message(plan, node) for node in plan.nodes)

    def run_round(
        self, grid: Grid, plan: RoundPlan, arrays: ArrayRecord, sync: RoundSync
    ) -> tuple[ArrayRecord, MetricRecord]:
        """One attempt at a round, opened as ``sync``: train messages out, replies averaged
        into ``arrays``."""
        try:
            outcome = sync.averaged()  # a transport that averaged the round itself
            if outcome is None:
                replies = exchange(
                    grid, sync.train_messages(), timeout=plan.timeout, traffic=plan.traffic
                )
            sync.finish()
        except RoundFailure as failure:
            if (reported := sync.abort(failure)) is failure:
                raise
            raise reported from failure
        if outcome is None:
            _check_reply_models(replies, expected=frozenset(plan.arrays.keys()))
            outcome = self.aggregate_train(plan.server_round, replies.values())
        averaged, metrics = outcome
        if list(averaged.keys()) == list(arrays.keys()):
            return averaged, metrics  # as it came: a transport may know it again (blocks do)
        merged = ArrayRecord()
        for key, array in arrays.items():  # the clients' own entries keep the server's value
            merged[key] = averaged[key] if key in averaged else array
        return merged, metrics

    def _train_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
        traffic: Traffic,
        evaluate: Callable[[ArrayRecord], Evaluation],
        opened: OpenedRound | None = None,
        last: bool = False,
    ) -> tuple[ArrayRecord, MetricRecord, Evaluation, OpenedRound | None] | None:
        """The attempts at ``server_round`` (the first one ``opened`` ahead, if given): its model,
        metrics, evaluation and, unless ``last``, the next round if it was opened ahead
        (``_plan_ahead``, ``_open_ahead``; abandoned here if this round fails after all)."""
        for attempt in range(self.max_retries + 1):
            try:
                if opened is None or attempt > 0:
                    plan = self.plan_round(
                        grid,
                        server_round,
                        attempt,
                        arrays,
                        config,
                        timeout=timeout,
                        traffic=traffic,
                    )
                    opened = self._open(grid, plan)
                upcoming = (
                    None if last else self._plan_ahead(grid, server_round + 1, config, timeout)
                )
                new_arrays, metrics = self.run_round(grid, opened.plan, arrays, opened.sync)
                following = (
                    None if upcoming is None else self._open_ahead(grid, upcoming, new_arrays)
                )
                try:
                    evaluation = evaluate(new_arrays)
                    self.check_evaluation(server_round, evaluation)
                except BaseException as error:
                    if following is not None:
                        following.abandon(f"round {server_round} failed: {error}")
                    raise
                return new_arrays, metrics, evaluation, following
            except RoundFailure as failure:
                log(ERROR, "Round %d (attempt %d) failed: %s", server_round, attempt + 1, failure)
                if self.on_failure == "stop" or attempt == self.max_retries:
                    self.stop_reason = f"round {server_round} failed: {failure}"
                    return None
                if failure.culprits:
                    log(WARNING, "Retrying without nodes %s", sorted(failure.culprits))
                    self.excluded |= failure.culprits
                    self.excluded_partitions |= {
                        self.partitions[n] for n in failure.culprits if n in self.partitions
                    }
        return None

    def _plan_ahead(
        self, grid: Grid, server_round: int, config: ConfigRecord, timeout: float
    ) -> RoundPlan | None:
        """The first attempt at ``server_round``, planned while the round before it trains,
        when its clients can train it while that round is evaluated and recorded: sampling may
        ask Flower for the connected nodes (a round trip to the SuperLink, when a new block
        starts), which would otherwise keep every client waiting between the two rounds. Its
        model comes with ``_open_ahead``. None when the clients cannot train ahead, or when it
        cannot be planned yet (it is then planned again in its own round, and fails there)."""
        if not self.trains_ahead():
            return None
        try:
            return self.plan_round(
                grid, server_round, 0, ArrayRecord(), config, timeout=timeout, traffic=Traffic()
            )
        except RoundFailure:
            return None

    def _open_ahead(self, grid: Grid, plan: RoundPlan, arrays: ArrayRecord) -> OpenedRound | None:
        """``plan`` opened on ``arrays``, the model of the round that just trained; None when it
        cannot open yet (as for ``_plan_ahead``)."""
        try:
            return self._open(grid, dataclasses.replace(plan, arrays=self.shared(arrays)))
        except RoundFailure:
            return None

    def _open(self, grid: Grid, plan: RoundPlan) -> OpenedRound:
        return OpenedRound(plan, self.open_sync(grid, plan), plan.traffic or Traffic())

    def trains_ahead(self) -> bool:
        """Whether a round opened early trains by itself (see ``Transport.trains_ahead``)."""
        return False

    def _collect_evaluation(
        self,
        grid: Grid,
        server_round: int,
        messages: Sequence[Message],
        *,
        timeout: float,
        traffic: Traffic,
    ) -> MetricRecord | None:
        """Send the evaluate messages; their replies aggregated, or None (a warning)."""
        if not messages:
            return None
        try:
            replies = exchange(grid, messages, timeout=timeout, traffic=traffic)
            return self.aggregate_evaluate(server_round, replies.values())
        except (RoundFailure, KeyError, TypeError, ValueError) as error:
            log(WARNING, "Round %d: client evaluation failed: %s", server_round, error)
            return None

    def connected_nodes(self, grid: Grid, timeout: float) -> list[int]:
        """The nodes a round draws its clients from: Flower's connected ones, once
        ``num_clients`` are; a NO_CLIENTS failure that says what to do after
        ``min_nodes_timeout`` seconds (default ``timeout``)."""
        wait = timeout if self.min_nodes_timeout is None else self.min_nodes_timeout
        deadline = time.monotonic() + wait
        reported = None
        while len(nodes := list(grid.get_node_ids())) < self.num_clients:
            missing = self.num_clients - len(nodes)
            if time.monotonic() > deadline:
                raise RoundFailure(
                    f"only {len(nodes)} of {self.num_clients} clients (SuperNodes) connected "
                    f"within {wait:g} s: start {missing} more SuperNode(s) or lower run config "
                    "'num-clients'; to wait longer, raise run config 'min-nodes-timeout' "
                    "(fedtan run --set min-nodes-timeout=SECONDS)",
                    FailureKind.NO_CLIENTS,
                )
            if len(nodes) != reported:  # a line per change, not one a second
                log(
                    INFO,
                    "Waiting for clients: %d of %d connected (at most %g s)",
                    len(nodes),
                    self.num_clients,
                    wait,
                )
                reported = len(nodes)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return nodes


class FedTAN(RoundStrategy):
    """FedTAN (Wang, Shi, Chang, arXiv 2301.02982): each round's first local step is one BN
    step over the union of the clients' batches, its statistics carried by ``transport``.

    ``sync_points``: the BN layers in the order a synced step reaches them, forward and
    backward (``common.fedtan.bn_sync.trace_sync_points``); the rest is ``RoundStrategy``'s.
    """

    message_type = TRAIN_FEDTAN

    def __init__(
        self, *, sync_points: tuple[Sequence[str], Sequence[str]], transport: Transport, **kwargs
    ) -> None:
        super().__init__(name="fedtan", **kwargs)
        if not sync_points[0]:
            raise ValueError(
                "the model has no BatchNorm layers to synchronize: use plain FedAvg for it"
            )
        self.sync_points = sync_points
        self.transport = transport

    def describe(self) -> str:
        return (
            f"FedTAN: {len(self.sync_points[0])} BN sync points forward, "
            f"{len(self.sync_points[1])} backward"
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        raise NotImplementedError(
            "a FedTAN round must be finished or aborted after its replies: use start()"
        )

    def connected_nodes(self, grid: Grid, timeout: float) -> list[int]:
        """Inside a block of rounds, its members; otherwise Flower's connected nodes."""
        reachable = self.transport.reachable_nodes()
        if reachable is None:
            return super().connected_nodes(grid, timeout)
        return list(reachable)

    def open_sync(self, grid: Grid, plan: RoundPlan) -> RoundSync:
        return self.transport.open_round(grid, plan)

    def trains_ahead(self) -> bool:
        return self.transport.trains_ahead()


def _partition_of(node: int, reply: Message) -> int:
    try:
        return int(reply.content.metric_records[METRICS_RECORD][PARTITION_ID])
    except (KeyError, TypeError, ValueError) as error:
        raise RoundFailure(
            f"node {node}: malformed partition reply ({error!r})", FailureKind.BAD_REPLY, {node}
        ) from None


def _check_reply_models(replies: Mapping[int, Message], expected: frozenset[str]) -> None:
    """Each reply's model has exactly the entries that were sent (none of a client's own)."""
    for node, reply in replies.items():
        try:
            keys = set(reply.content.array_records[MODEL_RECORD].keys())
        except KeyError:
            continue  # aggregate_train names the missing model
        if keys != expected:
            wrong = sorted(keys ^ expected)
            raise RoundFailure(
                f"node {node}: the reply's model has other entries {wrong}",
                FailureKind.BAD_REPLY,
                {node},
            )
