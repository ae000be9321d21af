"""The protocol between the ServerApp and the ClientApp: every name both sides must agree on.

Message types, the keys of the records a message carries, the keys of its config and metrics,
and the two phases of a synchronized step with each one's payload type, check and combine
function. Server, client and tests import the names from here; a literal of the protocol
anywhere else is a bug waiting for a rename.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from common.fedtan.bn_channel import (
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
FREEZE_BN_STATS = "freeze-bn-stats"  # FixBN after its switch round
BN_SYNC_ADDRESS = "bn-sync-address"  # transport "grpc": what the client dials
BN_SYNC_ROUND = "bn-sync-round"  # the service's round id (one per attempt)
BN_SYNC_CREDENTIAL = "bn-sync-credential"  # this client's credential, for this round only
BN_SYNC_ROOT_CERTIFICATES = "bn-sync-root-certificates"  # PEM; empty: no TLS
BN_SYNC_TIMEOUT = "bn-sync-timeout"  # seconds the client waits for one exchange

# --- keys of the metrics record --------------------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TEST_LOSS = "test-loss"
TEST_ACCURACY = "test-accuracy"
PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class TrainSettings:
    """What a client trains a round with; the server decides it (lr follows its schedule) and
    the train message is the one place a client reads it from."""

    batch_size: int
    local_steps: int  # E: with FedTAN the first is synchronized
    lr: float
    momentum: float
    weight_decay: float
    freeze_bn_stats: bool = False  # FixBN: normalize with, and keep, the running statistics

    _KEYS = {
        "batch_size": "batch-size",
        "local_steps": "local-steps",
        "lr": "lr",
        "momentum": "momentum",
        "weight_decay": "weight-decay",
        "freeze_bn_stats": FREEZE_BN_STATS,
    }

    def to_config(self) -> dict[str, int | float | bool]:
        return {key: getattr(self, name) for name, key in self._KEYS.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> TrainSettings:
        """Read the settings from a train message's config; a missing key is an error."""
        try:
            return cls(
                batch_size=int(config["batch-size"]),
                local_steps=int(config["local-steps"]),
                lr=float(config["lr"]),
                momentum=float(config["momentum"]),
                weight_decay=float(config["weight-decay"]),
                freeze_bn_stats=bool(config.get(FREEZE_BN_STATS, False)),
            )
        except KeyError as missing:
            raise ValueError(f"the train message's config lacks {missing}") from None


# --- the phases of a synchronized step -------------------------------------------------------
FORWARD, BACKWARD = "forward", "backward"


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
