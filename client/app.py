"""The FedTAN ClientApp: answers the server's BN sync queries, then trains and replies its model.

Message types (the server's side is ``server/message_sync.py``):

* ``query.bn_forward`` / ``query.bn_backward``: recompute the synced step with the union
  statistics the message carries and reply with this client's statistics of the next BN layer.
  The first message of a round also carries the global model, which is kept in
  ``context.state`` (it persists per node in simulation and deployment alike).
* ``train.fedtan``: with all union statistics, take the synced step and E-1 local steps; reply
  with the new model and the number of samples trained on.
* ``train.local`` / ``evaluate.local``: the baselines' plain local training and client-side
  evaluation (``client/baselines.py``).

Nothing is kept in process memory between messages, so any Ray actor, or a fresh process per
message in deployment, gives the same answers.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import baselines
from common.experiment import task
from common.experiment.config import RunConfig
from common.fedtan import train_client
from common.fedtan.bn_channel import BNSyncError, Moments
from common.fedtan.bn_sync import convert_federated_batchnorm
from common.transports.grpc.client import GrpcBNChannel
from common.transports.messages.client import ReplayChannel, capture_local_stats
from common.transports.messages.records import BACKWARD, FORWARD, UnionStats, local_stats_record

app = ClientApp()

MODEL_KEY, MODEL_ROUND_KEY = "fedtan-global-model", "fedtan-global-model-round"


@app.query("bn_forward")
def bn_forward(msg: Message, context: Context) -> Message:
    return _reply_local_stats(msg, context, FORWARD)


@app.query("bn_backward")
def bn_backward(msg: Message, context: Context) -> Message:
    return _reply_local_stats(msg, context, BACKWARD)


@app.query("bn_sync_preflight")
def bn_sync_preflight(msg: Message, context: Context) -> Message:
    """Join the round's BN sync service once, as the synced step will: proves it can."""
    config = msg.content.config_records["config"]
    probe = Moments(1, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    with _grpc_channel(config, context) as channel:
        channel.reduce_moments("preflight", probe)
    return Message(RecordDict(), reply_to=msg)


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    return baselines.train(msg, context, _partition(context))


@app.evaluate("local")
def evaluate_local(msg: Message, context: Context) -> Message:
    return baselines.evaluate(msg, context, _partition(context))


@app.train("fedtan")
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    model, batches = _round_model_and_batches(msg, context, int(config["local-steps"]))
    hyper = {
        "lr": float(config["lr"]),
        "momentum": float(config["momentum"]),
        "weight_decay": float(config["weight-decay"]),
    }
    if "bn-sync-address" in config:  # transport = "grpc": sync live with the other clients
        with _grpc_channel(config, context) as channel:
            losses = train_client(model, batches, task.loss_fn, channel=channel, **hyper)
    else:
        channel = ReplayChannel(UnionStats.from_records(msg.content))
        losses = train_client(model, batches, task.loss_fn, channel=channel, **hyper)
        channel.check_consumed()
    metrics = {
        "num-examples": sum(len(targets) for _, targets in batches),
        "train-loss": losses[0],  # the synced step's loss: the union loss's share of this client
        "partition-id": _partition(context)[0],
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


def _grpc_channel(config: ConfigRecord, context: Context) -> GrpcBNChannel:
    root = str(config["bn-sync-root-certificates"])
    return GrpcBNChannel(
        str(config["bn-sync-address"]),
        round_id=int(config["bn-sync-round"]),
        client_id=str(context.node_id),
        credential=str(config["bn-sync-credential"]),
        root_certificates=root.encode() if root else None,
        timeout=float(config["bn-sync-timeout"]),
    )


def _reply_local_stats(msg: Message, context: Context, phase: str) -> Message:
    config = msg.content.config_records["config"]
    index, layer = int(config["index"]), str(config["layer"])
    model, batches = _round_model_and_batches(msg, context, local_steps=1)
    captured = capture_local_stats(
        model, batches[0], task.loss_fn, UnionStats.from_records(msg.content)
    )
    if (captured.phase, captured.index, captured.layer) != (phase, index, layer):
        raise BNSyncError(
            f"asked for {phase} sync point {index} ({layer!r}) but the step "
            f"reached {captured.phase} {captured.index} ({captured.layer!r})"
        )
    reply = local_stats_record(phase, index, layer, captured.stats, int(config["round"]))
    return Message(reply, reply_to=msg)


def _round_model_and_batches(msg: Message, context: Context, local_steps: int):
    """This round's global model (with federated BN) and batches, rebuilt from scratch."""
    config = msg.content.config_records["config"]
    server_round = int(config["round"])
    if "arrays" in msg.content.array_records:
        # First message of the round: keep the global model for the round's later messages.
        context.state[MODEL_KEY] = msg.content.array_records["arrays"]
        context.state[MODEL_ROUND_KEY] = ConfigRecord({"round": server_round})
    cached_round = context.state.config_records.get(MODEL_ROUND_KEY, {}).get("round")
    if cached_round != server_round:
        raise BNSyncError(
            f"no global model for round {server_round} on this node (it holds "
            f"round {cached_round}): stale message, or the round's first message "
            "was lost"
        )

    cfg = RunConfig.from_flower(context.run_config)
    device = task.pick_device()
    model = convert_federated_batchnorm(task.build_global_model(cfg))
    model.load_state_dict(context.state.array_records[MODEL_KEY].to_torch_state_dict())
    model.to(device)
    partition_id, num_partitions = _partition(context)
    batches = task.client_batches(
        cfg,
        partition_id,
        num_partitions,
        server_round,
        batch_size=int(config["batch-size"]),
        local_steps=local_steps,
    )
    return model, [(x.to(device), y.to(device)) for x, y in batches]


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config lacks {missing}: start the SuperNode with "
            '--node-config "partition-id=K num-partitions=N"'
        ) from None
