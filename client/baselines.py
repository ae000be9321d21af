"""The client's side of the baselines: plain local training and client-side evaluation.

* ``train.local``: load the global entries the message carries over this client's own entries
  (the BN layers FedBN/SiloBN keep, from ``context.state``; the initial model's before the
  first round), take E plain local steps (FixBN's later rounds: with frozen BN statistics), keep
  the own entries again and reply with the rest. FBN and HybridBN: the same; their BN layers
  normalize with the global statistics the model carries and record the moments of this round's
  inputs, which go back with the model for the server to pool.
* ``evaluate.local``: the same model, evaluated on the test data (methods without one global
  model).

Which entries are the client's own follows from the run config's ``method``; a message that
carries any of them is refused, so the server can never overwrite them.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import nn

from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.device import PRECISIONS, contiguous_state, place_inputs, place_model
from common.experiment.methods import METHODS, local_keys, train_local
from common.protocol import (
    CONFIG_RECORD,
    METRICS_RECORD,
    MODEL_RECORD,
    NUM_EXAMPLES,
    OWN_STATE,
    PARTITION_ID,
    SERVER_ROUND,
    TRAIN_LOSS,
    TrainSettings,
)
from common.state_records import record_to_state, state_to_record


def train(msg: Message, context: Context, partition: tuple[int, int]) -> Message:
    config = msg.content.config_records[CONFIG_RECORD]
    settings = TrainSettings.from_config(config)
    cfg = RunConfig.from_flower(context.run_config)
    model, own = _own_model(msg, context, cfg)
    device = next(model.parameters()).device
    batches = task.client_batches(
        cfg,
        *partition,
        int(config[SERVER_ROUND]),
        batch_size=settings.batch_size,
        local_steps=settings.local_steps,
        device=device,  # drawn and augmented where the client trains
    )
    batches = [(place_inputs(x, device, cfg.channels_last), y) for x, y in batches]
    losses = train_local(
        model,
        batches,
        task.loss_fn,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        freeze_bn_stats=settings.freeze_bn_stats,
        autocast_dtype=PRECISIONS[cfg.precision],
    )
    state = contiguous_state(model)
    if own:
        context.state[OWN_STATE] = state_to_record({k: state[k] for k in own})
    metrics = {
        NUM_EXAMPLES: sum(len(targets) for _, targets in batches),
        TRAIN_LOSS: losses[0],  # the first step's: the round's model on this client's batch
        PARTITION_ID: partition[0],
    }
    shared = {k: v for k, v in state.items() if k not in own}
    content = RecordDict(
        {MODEL_RECORD: state_to_record(shared), METRICS_RECORD: MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, partition: tuple[int, int]) -> Message:
    cfg = RunConfig.from_flower(context.run_config)
    model, _ = _own_model(msg, context, cfg)
    metrics = task.evaluate(model, cfg)
    metrics[PARTITION_ID] = partition[0]
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=msg)


def _own_model(msg: Message, context: Context, cfg: RunConfig) -> tuple[nn.Module, frozenset]:
    """The global entries of the message over this client's own; and the own entries' keys."""
    model = task.build_global_model(cfg)
    own = local_keys(model, METHODS[cfg.method])
    received = record_to_state(msg.content.array_records[MODEL_RECORD])
    if overlap := sorted(own & set(received)):
        raise ValueError(f"the server sent entries that are this client's own: {overlap}")
    state = model.state_dict()
    if missing := sorted(set(state) - own - set(received)):
        raise ValueError(f"the server's model lacks entries: {missing}")
    if OWN_STATE in context.state.array_records:
        state.update(record_to_state(context.state.array_records[OWN_STATE]))
    state.update(received)
    model.load_state_dict(state)
    return place_model(model, task.pick_device(cfg.device), cfg.channels_last), own
