"""The strategies: one round loop for every method, and FedTAN, whose rounds start with a
synchronized step of the BN layers (the baselines are in ``server/baselines.py``).

It keeps Flower's strategy API (``configure_train`` / ``aggregate_train`` / ``start``): the
synchronized step happens inside ``configure_train``, which Flower hands the grid for exactly
this kind of extra communication; the train messages that follow carry the union statistics.
``start`` is Flower's loop plus what a long run needs (``RoundStrategy``, shared by every
method): a seeded client sampler, a round that fails (a client silent, erroring or sending bad
statistics) is retried without the clients at fault or ends the run cleanly, and the global
model only ever changes by a complete round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from common.fedtan.aggregation import average_states, weighted_mean
from common.transports.exchange import MODEL_KEY, RoundFailure, Traffic, exchange
from common.transports.grpc.server import GrpcSync
from common.transports.messages.server import sync_over_messages

RoundCallback = Callable[[int, Result, dict[str, float]], None]


class RoundStrategy(FedAvg):
    """The round loop every method shares; on its own, FedAvg of E plain local steps.

    Shared: seeded sampling, retries without the clients at fault, sample-weighted averaging,
    the per-round callback with the round's cost, client-side evaluation. A method changes how a
    round trains (``configure_train``; ``run_round`` when the server trains itself) and which
    ``local_keys`` of the state stay on the clients: never sent down, never expected back, never
    overwritten by the average. ``clients_per_round`` = 0 takes every connected node; otherwise
    a sample drawn from ``seed`` and the round number.
    """

    message_type = "train.local"

    def __init__(
        self,
        *,
        name: str = "fedavg",
        local_keys: Iterable[str] = (),
        num_clients: int,
        clients_per_round: int = 0,
        seed: int = 0,
        reply_timeout: float = 600.0,
        on_failure: str = "retry",
        max_retries: int = 2,
        lr_schedule: Callable[[int], float] | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        super().__init__(
            min_available_nodes=num_clients,
            min_train_nodes=clients_per_round,
            fraction_evaluate=0.0,
        )
        self.name = name
        self.local_keys = frozenset(local_keys)
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.reply_timeout = reply_timeout
        self.on_failure = on_failure
        self.max_retries = max_retries
        self.lr_schedule = lr_schedule
        self.on_round = on_round
        self.excluded: set[int] = set()  # nodes that failed a round; not sampled again
        self.traffic = Traffic()  # of the round in progress
        self.eval_traffic = Traffic()  # its client-side evaluation
        self.expected_keys: frozenset[str] | None = None  # what a train reply must carry

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

    def sample_nodes(self, grid: Grid, server_round: int, attempt: int = 0) -> list[int]:
        """The round's clients: seeded, so a rerun samples the same nodes."""
        available = sorted(set(self._wait_for_nodes(grid)) - self.excluded)
        if not available:
            raise RoundFailure("no clients left to sample (all failed earlier rounds)")
        wanted = min(self.clients_per_round or len(available), len(available))
        rng = random.Random(f"{self.seed}-{server_round}-{attempt}")
        return sorted(rng.sample(available, wanted))

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The train config of ``server_round``: its number and learning rate."""
        config = ConfigRecord({**config, "round": server_round})
        if self.lr_schedule is not None:
            config["lr"] = self.lr_schedule(server_round)
        return config

    def shared(self, arrays: ArrayRecord) -> ArrayRecord:
        """The entries of the global model that travel: all but the clients' own."""
        if not self.local_keys:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        attempt: int = 0,
    ) -> Iterable[Message]:
        """Sample clients and send each the shared global entries and the round's config."""
        nodes = self.sample_nodes(grid, server_round, attempt)
        log(INFO, "configure_train: round %d, clients %s", server_round, nodes)
        config = self.round_config(server_round, config)
        content = RecordDict({"config": config, MODEL_KEY: self.shared(arrays)})
        return [
            Message(
                content,
                dst_node_id=node,
                message_type=self.message_type,
                group_id=f"{self.name}-round-{server_round}",
            )
            for node in nodes
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Sample-weighted average of the clients' whole model states, dtypes preserved."""
        replies = list(replies)
        weights, states, losses = [], [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                metrics = reply.content.metric_records["metrics"]
                weights.append(float(metrics["num-examples"]))
                losses.append(float(metrics["train-loss"]))
                states.append(reply.content.array_records[MODEL_KEY].to_torch_state_dict())
            except (KeyError, TypeError, ValueError) as error:
                raise RoundFailure(
                    f"node {node}: malformed train reply ({error!r})", {node}
                ) from None
            if self.expected_keys is not None and set(states[-1]) != self.expected_keys:
                wrong = sorted(set(states[-1]) ^ self.expected_keys)
                raise RoundFailure(
                    f"node {node}: the reply's model has other entries {wrong}", {node}
                )
            if not weights[-1] > 0:
                raise RoundFailure(f"node {node}: num-examples must be > 0", {node})
        try:
            averaged = average_states(states, weights)
        except ValueError as error:  # keys or shapes that do not match the others
            raise RoundFailure(f"cannot average the clients' models: {error}") from error
        for key, tensor in averaged.items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise RoundFailure(f"the averaged model has non-finite values in {key!r}")
        metrics = MetricRecord(
            {
                "train-loss": weighted_mean(losses, weights),
                "num-examples": int(sum(weights)),
                "clients": len(replies),
            }
        )
        return ArrayRecord(averaged), metrics

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
        """Flower's round loop; a failed round leaves the global model as it was."""
        log(INFO, "Starting %s for %d rounds:", self.name, num_rounds)
        self.summary()
        result = Result(arrays=initial_arrays)
        train_config = train_config or ConfigRecord()
        if evaluate_fn is not None and (metrics := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = metrics
        for server_round in range(1, num_rounds + 1):
            started, self.traffic, self.eval_traffic = time.monotonic(), Traffic(), Traffic()
            outcome = self._train_round(grid, server_round, result.arrays, train_config)
            if outcome is None:
                log(
                    WARNING,
                    "Stopping after round %d: the global model of that round is kept",
                    server_round - 1,
                )
                break
            result.arrays, result.train_metrics_clientapp[server_round] = outcome
            if evaluate_fn is not None:
                metrics = evaluate_fn(server_round, result.arrays)
                if metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = metrics
            if self.on_round is not None:
                cost = {
                    "seconds": time.monotonic() - started,
                    **vars(self.traffic),
                    "eval_round_trips": self.eval_traffic.round_trips,
                    "eval_bytes": self.eval_traffic.model_bytes
                    + self.eval_traffic.bn_bytes_down
                    + self.eval_traffic.bn_bytes_up,
                }
                self.on_round(server_round, result, cost)
        return result

    def run_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, attempt: int
    ) -> tuple[ArrayRecord, MetricRecord]:
        """One attempt at a round: train messages out, replies averaged into the global model."""
        messages = list(self.configure_train(server_round, arrays, config, grid, attempt))
        replies = exchange(grid, messages, timeout=self.reply_timeout, traffic=self.traffic)
        self.after_exchange()
        self.expected_keys = frozenset(arrays.keys()) - self.local_keys
        averaged, metrics = self.aggregate_train(server_round, replies.values())
        merged = ArrayRecord()
        for key, array in arrays.items():  # the clients' own entries keep the server's value
            merged[key] = averaged[key] if key in averaged else array
        return merged, metrics

    def after_exchange(self) -> None:
        """Called when every train reply of the round has arrived."""

    def at_fault(self, failure: RoundFailure) -> frozenset[int]:
        """The nodes a failed round is retried without."""
        return failure.nodes

    def evaluate_on_clients(
        self, grid: Grid, server_round: int, arrays: ArrayRecord
    ) -> MetricRecord | None:
        """Every available client evaluates the shared global entries with its own ones on the
        test data (for methods without one global model); the mean and spread, or None."""
        nodes = sorted(set(grid.get_node_ids()) - self.excluded)
        content = RecordDict(
            {"config": ConfigRecord({"round": server_round}), MODEL_KEY: self.shared(arrays)}
        )
        messages = [
            Message(
                content,
                dst_node_id=node,
                message_type="evaluate.local",
                group_id=f"{self.name}-evaluate-{server_round}",
            )
            for node in nodes
        ]
        try:
            replies = exchange(
                grid, messages, timeout=self.reply_timeout, traffic=self.eval_traffic
            )
            results = [r.content.metric_records["metrics"] for r in replies.values()]
            losses = [float(m["test-loss"]) for m in results]
            accuracies = [float(m["test-accuracy"]) for m in results]
        except (RoundFailure, KeyError, TypeError, ValueError) as error:
            log(WARNING, "Round %d: client evaluation failed: %s", server_round, error)
            return None
        return MetricRecord(
            {
                "test-loss": sum(losses) / len(losses),
                "test-accuracy": sum(accuracies) / len(accuracies),
                "test-accuracy-min": min(accuracies),
                "test-accuracy-max": max(accuracies),
                "eval-clients": len(results),
            }
        )

    def _train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> tuple[ArrayRecord, MetricRecord] | None:
        for attempt in range(self.max_retries + 1):
            try:
                return self.run_round(grid, server_round, arrays, config, attempt)
            except RoundFailure as failure:
                log(ERROR, "Round %d (attempt %d) failed: %s", server_round, attempt + 1, failure)
                if self.on_failure == "stop" or attempt == self.max_retries:
                    return None
                at_fault = self.at_fault(failure)
                if at_fault:
                    log(WARNING, "Retrying without nodes %s", sorted(at_fault))
                    self.excluded |= at_fault
        return None

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.reply_timeout
        while len(nodes := list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RoundFailure(
                    f"only {len(nodes)} of {self.num_clients} clients connected "
                    f"within {self.reply_timeout:g} s"
                )
            log(INFO, "Waiting for clients: %d of %d connected", len(nodes), self.num_clients)
            time.sleep(1)
        return nodes


class FedTAN(RoundStrategy):
    """FedTAN (Wang, Shi, Chang, arXiv 2301.02982) over Flower messages.

    ``sync_points`` are the BN layers in the order a synced step reaches them, forward and
    backward (``common.bn_sync.trace_sync_points``). The rest of the loop is ``RoundStrategy``'s.
    """

    message_type = "train.fedtan"

    def __init__(
        self,
        *,
        sync_points: tuple[Sequence[str], Sequence[str]],
        grpc_sync: GrpcSync | None = None,
        **kwargs,
    ) -> None:
        super().__init__(name="fedtan", **kwargs)
        if not sync_points[0]:
            raise ValueError(
                "the model has no BatchNorm layers to synchronize: use plain FedAvg for it"
            )
        self.sync_points = sync_points
        self.grpc_sync = grpc_sync  # None: the synced step travels in Flower messages

    def describe(self) -> str:
        return (
            f"FedTAN: {len(self.sync_points[0])} BN sync points forward, "
            f"{len(self.sync_points[1])} backward"
        )

    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        attempt: int = 0,
    ) -> Iterable[Message]:
        """Sample clients, run the synced step's 2L exchanges, then ask them to train."""
        nodes = self.sample_nodes(grid, server_round, attempt)
        log(INFO, "configure_train: round %d, clients %s", server_round, nodes)
        config = self.round_config(server_round, config)
        group_id = f"fedtan-round-{server_round}"
        if self.grpc_sync is not None:  # the clients sync among themselves over the service
            round_id = server_round * (self.max_retries + 1) + attempt
            return self.grpc_sync.train_messages(round_id, nodes, arrays, config, group_id)
        union = sync_over_messages(
            grid,
            nodes,
            server_round,
            arrays,
            config,
            self.sync_points,
            self.reply_timeout,
            self.traffic,
        )
        content = RecordDict({"config": config, **union.to_records()})
        return [
            Message(
                content,
                dst_node_id=node,
                message_type="train.fedtan",
                group_id=f"fedtan-round-{server_round}",
            )
            for node in nodes
        ]

    def run_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, attempt: int
    ) -> tuple[ArrayRecord, MetricRecord]:
        try:
            return super().run_round(grid, server_round, arrays, config, attempt)
        except RoundFailure:
            if self.grpc_sync is not None:  # the service's round must not stay open
                try:
                    self.grpc_sync.finish_round()
                except RoundFailure as service_failure:  # its account names the culprit
                    log(ERROR, "Round %d: %s", server_round, service_failure)
            raise

    def after_exchange(self) -> None:
        if self.grpc_sync is not None:
            self.grpc_sync.finish_round()

    def at_fault(self, failure: RoundFailure) -> frozenset[int]:
        if self.grpc_sync is None:
            return failure.nodes
        # Over the service one client's failure aborts the round for all; the others only echo
        # it (BNSyncError) and stay in.
        return frozenset(
            n for n in failure.nodes if "BNSyncError" not in failure.reasons.get(n, "")
        )
