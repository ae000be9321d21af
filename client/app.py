"""The FedTAN ClientApp: answers the server's BN sync queries, then trains and replies its model.

Message types (``common/protocol.py``; the server's side is ``common/transports/``):

* ``query.bn_forward`` / ``query.bn_backward`` (transport "messages"): recompute the synced step
  with the union statistics the message carries and reply with this client's statistics of the
  next BN layer. The first message of a round also carries the global model, which is kept in
  ``context.state`` (it persists per node in simulation and deployment alike).
* ``query.bn_sync_preflight`` (transports "grpc", "inprocess"): join the BN sync service (or the
  in-process hub) once before round 1.
* ``query.partition``: which data partition this node trains on (the server's canonical order).
* ``train.fedtan``: take the synced step (its statistics replayed from the message, or live over
  the BN sync service) and E-1 local steps; reply with the new model and the samples trained on.
* ``train.fedtan_block`` (transport "grpc", ``rounds-per-message`` > 1): join a block of rounds
  on the BN sync service and train every round it is sampled for, each like ``train.fedtan``,
  the model coming from and going to the service (``common/transports/grpc/block.py``).
* ``train.local`` / ``evaluate.local``: the baselines' plain local training and client-side
  evaluation (``client/baselines.py``).

Nothing is kept in process memory between messages, so any Ray actor, or a fresh process per
message in deployment, gives the same answers. The round's training settings are read from the
message (``protocol.TrainSettings``), the experiment's (data, model) from the run config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from client import baselines
from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.device import PRECISIONS, contiguous_state, place_inputs, place_model
from common.fedtan import Batch, train_client
from common.fedtan.bn_channel import BNChannel, BNSyncError, Moments
from common.fedtan.bn_sync import convert_federated_batchnorm
from common.protocol import (
    BACKWARD,
    BN_SYNC_ADDRESS,
    BN_SYNC_HUB,
    CONFIG_RECORD,
    EVALUATE_LOCAL,
    FORWARD,
    METRICS_RECORD,
    MODEL_RECORD,
    NUM_EXAMPLES,
    PARTITION_ID,
    QUERY_BN_BACKWARD,
    QUERY_BN_FORWARD,
    QUERY_BN_SYNC_PREFLIGHT,
    QUERY_PARTITION,
    ROUND_MODEL_ROUND_STATE,
    ROUND_MODEL_STATE,
    SERVER_ROUND,
    SYNC_INDEX,
    SYNC_LAYER,
    TRAIN_FEDTAN,
    TRAIN_FEDTAN_BLOCK,
    TRAIN_LOCAL,
    TRAIN_LOSS,
    TrainSettings,
)
from common.state_records import record_to_state, state_to_record
from common.transports.grpc.client import (
    GrpcBlockChannel,
    GrpcBNChannel,
    RoundResult,
    run_block,
)
from common.transports.grpc.wire import Plan
from common.transports.inprocess import InProcessBNChannel
from common.transports.messages.client import ReplayChannel, capture_local_stats
from common.transports.messages.records import UnionStats, local_stats_record

app = ClientApp()


@app.query(QUERY_BN_FORWARD.action)
def bn_forward(msg: Message, context: Context) -> Message:
    return _reply_local_stats(msg, context, FORWARD)


@app.query(QUERY_BN_BACKWARD.action)
def bn_backward(msg: Message, context: Context) -> Message:
    return _reply_local_stats(msg, context, BACKWARD)


@app.query(QUERY_BN_SYNC_PREFLIGHT.action)
def bn_sync_preflight(msg: Message, context: Context) -> Message:
    """Join the BN sync service (or the in-process hub) once, as the synced step will: proves
    it can."""
    probe = Moments(1, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    with _synced_step_channel(msg, context) as channel:
        channel.reduce_moments("preflight", probe)
    return Message(RecordDict(), reply_to=msg)


@app.query(QUERY_PARTITION.action)
def partition(msg: Message, context: Context) -> Message:
    """Which partition this node trains on: the server orders and samples clients by it."""
    metrics = MetricRecord({PARTITION_ID: _partition(context)[0]})
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=msg)


@app.train(TRAIN_LOCAL.action)
def train_local(msg: Message, context: Context) -> Message:
    return baselines.train(msg, context, _partition(context))


@app.evaluate(EVALUATE_LOCAL.action)
def evaluate_local(msg: Message, context: Context) -> Message:
    return baselines.evaluate(msg, context, _partition(context))


@app.train(TRAIN_FEDTAN.action)
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records[CONFIG_RECORD]
    settings = TrainSettings.from_config(config)
    model, batches = _round_model_and_batches(msg, context, settings, settings.local_steps)
    with _synced_step_channel(msg, context) as channel:
        result = _train_synced(model, batches, settings, channel, context)
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        TRAIN_LOSS: result.train_loss,
        PARTITION_ID: result.partition_id,
    }
    content = RecordDict(
        {MODEL_RECORD: state_to_record(result.state), METRICS_RECORD: MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


@app.train(TRAIN_FEDTAN_BLOCK.action)
def train_block(msg: Message, context: Context) -> Message:
    """Every round of a block this client is sampled for, until the service ends the block."""
    config = msg.content.config_records[CONFIG_RECORD]
    settings = TrainSettings.from_config(config)
    model: nn.Module | None = None  # built for the block's first round, then reloaded

    def train_round(plan: Plan, channel: BNChannel) -> RoundResult:
        nonlocal model
        round_settings = dataclasses.replace(settings, lr=plan.lr)
        model, batches = _model_and_batches(
            context, plan.state, plan.server_round, round_settings, settings.local_steps, model
        )
        return _train_synced(model, batches, round_settings, channel, context)

    with GrpcBlockChannel.from_block_config(
        config, str(context.node_id), context.node_config
    ) as block:
        rounds = run_block(block, train_round)
    return Message(RecordDict({METRICS_RECORD: MetricRecord({"rounds": rounds})}), reply_to=msg)


def _train_synced(
    model: nn.Module,
    batches: list[Batch],
    settings: TrainSettings,
    channel: BNChannel,
    context: Context,
) -> RoundResult:
    """The synced step over ``channel`` and E-1 local steps; the model and what it trained on."""
    losses = train_client(
        model,
        batches,
        task.loss_fn,
        channel=channel,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        autocast_dtype=PRECISIONS[RunConfig.from_flower(context.run_config).precision],
    )
    return RoundResult(
        state=contiguous_state(model),
        num_examples=sum(len(targets) for _, targets in batches),
        train_loss=losses[0],  # the synced step's loss: the union loss's share of this client
        partition_id=_partition(context)[0],
    )


def _synced_step_channel(msg: Message, context: Context) -> BNChannel:
    """Where the synced step's union statistics come from: live over the BN sync service when
    the message says where it is (transport "grpc"), through the in-process hub it names
    (transport "inprocess"), else replayed from the message."""
    config = msg.content.config_records[CONFIG_RECORD]
    if BN_SYNC_ADDRESS in config:
        return GrpcBNChannel.from_train_config(config, str(context.node_id), context.node_config)
    if BN_SYNC_HUB in config:
        return InProcessBNChannel(config, context.node_id)
    return ReplayChannel.from_message(msg.content)


def _reply_local_stats(msg: Message, context: Context, phase: str) -> Message:
    config = msg.content.config_records[CONFIG_RECORD]
    index, layer = int(config[SYNC_INDEX]), str(config[SYNC_LAYER])
    settings = TrainSettings.from_config(config)
    model, batches = _round_model_and_batches(msg, context, settings, local_steps=1)
    captured = capture_local_stats(
        model,
        batches[0],
        task.loss_fn,
        UnionStats.from_records(msg.content),
        autocast_dtype=PRECISIONS[RunConfig.from_flower(context.run_config).precision],
    )
    if (captured.phase, captured.index, captured.layer) != (phase, index, layer):
        raise BNSyncError(
            f"asked for {phase} sync point {index} ({layer!r}) but the step "
            f"reached {captured.phase} {captured.index} ({captured.layer!r})"
        )
    reply = local_stats_record(phase, index, layer, captured.stats, int(config[SERVER_ROUND]))
    return Message(reply, reply_to=msg)


def _round_model_and_batches(
    msg: Message, context: Context, settings: TrainSettings, local_steps: int
) -> tuple[nn.Module, list[Batch]]:
    """This round's global model (with federated BN) and batches, rebuilt from scratch."""
    config = msg.content.config_records[CONFIG_RECORD]
    server_round = int(config[SERVER_ROUND])
    if MODEL_RECORD in msg.content.array_records:
        # First message of the round: keep the global model for the round's later messages.
        context.state[ROUND_MODEL_STATE] = msg.content.array_records[MODEL_RECORD]
        context.state[ROUND_MODEL_ROUND_STATE] = ConfigRecord({SERVER_ROUND: server_round})
    cached_round = context.state.config_records.get(ROUND_MODEL_ROUND_STATE, {}).get(SERVER_ROUND)
    if cached_round != server_round:
        raise BNSyncError(
            f"no global model for round {server_round} on this node (it holds "
            f"round {cached_round}): stale message, or the round's first message "
            "was lost"
        )
    state = record_to_state(context.state.array_records[ROUND_MODEL_STATE])
    return _model_and_batches(context, state, server_round, settings, local_steps)


def _model_and_batches(
    context: Context,
    state: Mapping[str, Tensor],
    server_round: int,
    settings: TrainSettings,
    local_steps: int,
    reuse: nn.Module | None = None,
) -> tuple[nn.Module, list[Batch]]:
    """The global model ``state`` (with federated BN) and this client's batches of a round.

    ``reuse``: a model this function returned before, loaded in place (its device and layout
    stay) instead of building one: a block's rounds save the build, which costs about as much
    as the model's small steps (the optimizer is fresh each round, and gradients are reset).
    """
    cfg = RunConfig.from_flower(context.run_config)
    device = task.pick_device(cfg.device)
    if reuse is not None:
        model = reuse
        model.load_state_dict(state)
    else:
        model = convert_federated_batchnorm(task.build_global_model(cfg))
        model.load_state_dict(state)
        model = place_model(model, device, cfg.channels_last)
    partition_id, num_partitions = _partition(context)
    batches = task.client_batches(
        cfg,
        partition_id,
        num_partitions,
        server_round,
        batch_size=settings.batch_size,
        local_steps=local_steps,
        device=device,  # drawn and augmented where the client trains
    )
    return model, [(place_inputs(x, device, cfg.channels_last), y) for x, y in batches]


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config lacks {missing}: start the SuperNode with "
            '--node-config "partition-id=K num-partitions=N"'
        ) from None
