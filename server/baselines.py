"""The baselines FedTAN is compared with, each a few lines on top of ``RoundStrategy``.

``RoundStrategy`` alone is FedAvg (E plain local steps, everything averaged): "fedavg-bn" and,
on the GroupNorm network, "fedavg-gn". FedBN and SiloBN are the same loop with ``local_keys``
(what never leaves a client); FixBN adds a flag to the train config after its switch round; FBN
and HybridBN pool the BN moments the clients recorded into the next round's global statistics;
the centralized reference trains on the server, without clients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from common.experiment import task
from common.experiment.bn_baselines import global_stats_layers, pooled_statistics, recorded_moments
from common.experiment.config import RunConfig
from common.experiment.methods import METHODS, centralized_round, local_keys
from common.fedtan import Batch
from common.fedtan.bn_channel import BNSyncError, check_moments
from common.protocol import FREEZE_BN_STATS, MODEL_RECORD, NUM_EXAMPLES, TRAIN_LOSS, TrainSettings
from common.state_records import record_to_state, state_to_record
from common.transports.base import FailureKind, RoundFailure, RoundPlan, RoundSync
from server.strategy import RoundStrategy

BatchesFn = Callable[[int, int, int], Sequence[Sequence[Batch]]]


class FixBN(RoundStrategy):
    """FixBN (Zhong, Chen, Chao 2024): FedAvg with BN up to ``switch_round``; afterwards the
    clients normalize with the global running statistics and no longer update them."""

    def __init__(self, *, switch_round: int, **kwargs) -> None:
        super().__init__(name="fixbn", **kwargs)
        self.switch_round = switch_round

    def describe(self) -> str:
        return f"FixBN: BN statistics frozen after round {self.switch_round}"

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        config = super().round_config(server_round, config)
        config[FREEZE_BN_STATS] = server_round > self.switch_round
        return config


class GlobalBNStatistics(RoundStrategy):
    """FBN and HybridBN: FedAvg whose BN ``layers`` normalize with global statistics. The
    clients' models carry the moments each layer recorded in the round (model traffic, like the
    rest of the state); the server pools them into the next round's global statistics, the
    union's mean and variance, and averages everything else. A client whose moments are unusable
    fails the round and is named, like any bad reply."""

    def __init__(self, *, layers: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not layers:
            raise ValueError(f"{self.name}: the model has no BatchNorm layers to pool")
        self.layers = tuple(layers)

    def describe(self) -> str:
        return f"{self.name}: global statistics of {len(self.layers)} BN layers pooled per round"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        replies = list(replies)
        # Checked first: a bad client's moments would otherwise fail the average unnamed.
        states = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if MODEL_RECORD not in reply.content.array_records:
                continue  # RoundStrategy.aggregate_train names the malformed reply
            state = record_to_state(reply.content.array_records[MODEL_RECORD])
            try:
                for layer in self.layers:
                    check_moments(node, layer, recorded_moments(state, layer))
            except (BNSyncError, KeyError) as error:
                raise RoundFailure(
                    f"node {node}: unusable BN moments ({error})", FailureKind.BAD_REPLY, {node}
                ) from None
            states.append(state)
        averaged, metrics = super().aggregate_train(server_round, replies)
        # The pooled entries replace their averages in place: the rest stays as averaged.
        for key, array in state_to_record(pooled_statistics(states, self.layers)).items():
            averaged[key] = array
        return averaged, metrics


class Centralized(RoundStrategy):
    """The upper reference: the server itself takes E SGD steps on the union of the clients'
    round batches (``batches(round, batch_size, local_steps)``, one list per client); no client
    is contacted, so a round costs no traffic. With E = 1 a round equals FedTAN's."""

    def __init__(
        self, *, model: nn.Module, batches: BatchesFn, device: torch.device, **kwargs
    ) -> None:
        super().__init__(name="centralized", **kwargs)
        self.model = model
        self.batches = batches  # drawn on ``device``, where the server trains
        self.device = device

    def describe(self) -> str:
        return "Centralized: SGD on the union of all partitions' round batches, on the server"

    def round_nodes(
        self, grid: Grid, server_round: int, attempt: int, *, timeout: float
    ) -> Sequence[int]:
        """None: the server trains on every partition's batches itself."""
        return ()

    def run_round(
        self, grid: Grid, plan: RoundPlan, arrays: ArrayRecord, sync: RoundSync
    ) -> tuple[ArrayRecord, MetricRecord]:
        settings = TrainSettings.from_config(plan.config)
        self.model.load_state_dict(record_to_state(arrays))
        self.model.to(self.device)
        client_batches = self.batches(plan.server_round, settings.batch_size, settings.local_steps)
        losses = centralized_round(
            self.model,
            client_batches,
            task.loss_fn,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
        metrics = {
            TRAIN_LOSS: losses[0],
            NUM_EXAMPLES: sum(len(y) for batches in client_batches for _, y in batches),
            "clients": len(client_batches),
        }
        state = {k: v.cpu() for k, v in self.model.state_dict().items()}
        return state_to_record(state), MetricRecord(metrics)


def baseline_strategy(cfg: RunConfig, model: nn.Module, **kwargs) -> RoundStrategy:
    """The strategy of ``cfg.method`` (any but "fedtan") for the global ``model``."""
    method = METHODS[cfg.method]
    if method.train == "server":
        device = task.pick_device(cfg.device)

        def batches(server_round: int, batch_size: int, local_steps: int) -> list[list[Batch]]:
            return [
                task.client_batches(
                    cfg,
                    k,
                    cfg.num_clients,
                    server_round,
                    batch_size=batch_size,
                    local_steps=local_steps,
                    device=device,
                )
                for k in range(cfg.num_clients)
            ]

        return Centralized(model=copy.deepcopy(model), batches=batches, device=device, **kwargs)
    if method.pools_bn_statistics:
        return GlobalBNStatistics(name=cfg.method, layers=global_stats_layers(model), **kwargs)
    if method.freeze_bn_stats:
        return FixBN(switch_round=cfg.fixbn_switch, **kwargs)
    return RoundStrategy(name=cfg.method, local_keys=local_keys(model, method), **kwargs)
