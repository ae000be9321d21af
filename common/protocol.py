"""The protocol between the ServerApp and the ClientApp: every name both sides must agree on.

Message types, the keys of the records a message carries, the keys of its config and metrics,
and the two phases of a synchronized step with each one's payload type, check and combine
function. Server, client and tests import the names from here; a literal of the protocol
anywhere else is a bug waiting for a rename.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from common.fedtan.bn_channel import (
    BACKWARD,
    FORWARD,
    GradSums,
    Moments,
    check_grad_sums,
    check_moments,
    combine_grad_sums,
    combine_moments,
)


class MessageType(str):
    """A Flower message type, ``"<category>.<action>"``; ClientApp handlers register the action."""

    @property
    def category(self) -> str:
        return self.split(".", 1)[0]

    @property
    def action(self) -> str:
        return self.split(".", 1)[1]


# --- message types ---------------------------------------------------------------------------
TRAIN_FEDTAN = MessageType("train.fedtan")  # the synced step and E-1 local steps
TRAIN_LOCAL = MessageType("train.local")  # the baselines' E plain local steps
EVALUATE_LOCAL = MessageType("evaluate.local")  # a client evaluates its own model (FedBN, SiloBN)
QUERY_BN_FORWARD = MessageType("query.bn_forward")  # transport "messages": a layer's moments
QUERY_BN_BACKWARD = MessageType("query.bn_backward")  # ... and its gradient sums
QUERY_BN_SYNC_PREFLIGHT = MessageType("query.bn_sync_preflight")  # transport "grpc", round 0
QUERY_PARTITION = MessageType("query.partition")  # which data partition a node trains on
TRAIN_FEDTAN_BLOCK = MessageType("train.fedtan_block")  # transport "grpc": rounds-per-message > 1

# --- record keys of a message's RecordDict ---------------------------------------------------
CONFIG_RECORD = "config"  # ConfigRecord: the round's settings (keys below)
MODEL_RECORD = "arrays"  # ArrayRecord: the global model down, a client's model up
METRICS_RECORD = "metrics"  # MetricRecord: a client's reply metrics (keys below)
UNION_STATS_RECORD = "bn-union"  # ArrayRecord: the union statistics known so far
UNION_STATS_META_RECORD = "bn-union-meta"  # ConfigRecord: their layers and counts
LOCAL_STATS_RECORD = "bn-local"  # ArrayRecord: a client's statistics of one sync point
LOCAL_STATS_META_RECORD = "bn-local-meta"  # ConfigRecord: which sync point they answer

# --- keys of a client's Context.state (never on the wire) ------------------------------------
ROUND_MODEL_STATE = "fedtan-global-model"  # the round's global model, from its first query
ROUND_MODEL_ROUND_STATE = "fedtan-global-model-round"  # ... and the round it belongs to
OWN_STATE = "own-state"  # the entries FedBN/SiloBN keep on the client

# --- keys of the config record ---------------------------------------------------------------
SERVER_ROUND = "server-round"  # Flower's own name for the round number
SYNC_INDEX, SYNC_LAYER = "index", "layer"  # transport "messages": which sync point is asked
BATCH_SIZE, LOCAL_STEPS = "batch-size", "local-steps"  # protocol.TrainSettings
LR, MOMENTUM, WEIGHT_DECAY = "lr", "momentum", "weight-decay"
FREEZE_BN_STATS = "freeze-bn-stats"
BN_SYNC_ADDRESS = "bn-sync-address"  # transport "grpc": what the client dials
BN_SYNC_PROTOCOL = "bn-sync-protocol"  # what carries the calls: one of BN_SYNC_PROTOCOLS
BN_SYNC_PROTOCOLS = ("grpc", "socket")  # gRPC calls, or framed messages on a TCP socket
BN_SYNC_ROUND = "bn-sync-round"  # the service's round id (one per attempt)
BN_SYNC_CREDENTIAL = "bn-sync-credential"  # this client's credential, for this round only
BN_SYNC_ROOT_CERTIFICATES = "bn-sync-root-certificates"  # PEM; empty: no TLS
BN_SYNC_TIMEOUT = "bn-sync-timeout"  # seconds the client waits for one exchange
BN_SYNC_HUB = "bn-sync-hub"  # transport "inprocess": the key of the attempt's hub
BN_SYNC_BLOCK = "bn-sync-block"  # a block of rounds: its id on the service (train.fedtan_block)
BN_SYNC_BLOCK_WAIT = "bn-sync-block-wait"  # seconds a block member waits for the next round

# --- keys of the metrics record --------------------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TEST_LOSS = "test-loss"
TEST_ACCURACY = "test-accuracy"
PARTITION_ID = "partition-id"


def _key(name: str) -> dataclasses.Field:
    return dataclasses.field(metadata={"key": name})


@dataclass(frozen=True)
class TrainSettings:
    """What a client trains a round with; the server decides it (lr follows its schedule) and
    the train message's config is the one place a client reads it from."""

    batch_size: int = _key(BATCH_SIZE)
    local_steps: int = _key(LOCAL_STEPS)  # E: with FedTAN the first is synchronized
    lr: float = _key(LR)
    momentum: float = _key(MOMENTUM)
    weight_decay: float = _key(WEIGHT_DECAY)
    # FixBN after its switch round: normalize with, and keep, the running statistics
    freeze_bn_stats: bool = dataclasses.field(default=False, metadata={"key": FREEZE_BN_STATS})

    def to_config(self) -> dict[str, int | float | bool]:
        return {f.metadata["key"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> TrainSettings:
        """Read the settings from a train message's config; a missing key is an error."""
        values = {}
        for f in dataclasses.fields(cls):
            if (key := f.metadata["key"]) in config:
                values[f.name] = _TYPES[f.type](config[key])
            elif f.default is dataclasses.MISSING:
                raise ValueError(f"the train message's config lacks {key!r}")
        return cls(**values)


_TYPES = {"int": int, "float": float, "bool": bool}  # TrainSettings' field types, by name


# --- the phases of a synchronized step (FORWARD and BACKWARD: named in bn_channel) ------------


@dataclass(frozen=True)
class Phase:
    """One direction of the synced step: what each BN layer exchanges in it."""

    name: str
    payload: type  # Moments forward, GradSums backward
    fields: tuple[str, ...]  # the payload's per-channel vectors, in wire order
    check: Callable[[Hashable, str, object], None]  # one client's part, before combining
    combine: Callable[[str, Mapping[Hashable, object]], object]  # the union's value
    query: MessageType  # transport "messages": the query that asks for it


PHASES = {
    FORWARD: Phase(
        FORWARD, Moments, ("mean", "m2"), check_moments, combine_moments, QUERY_BN_FORWARD
    ),
    BACKWARD: Phase(
        BACKWARD,
        GradSums,
        ("sum_dy", "sum_dy_xhat"),
        check_grad_sums,
        combine_grad_sums,
        QUERY_BN_BACKWARD,
    ),
}
