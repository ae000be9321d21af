"""A round's average of the clients' trained states, in one order whoever computes it.

The strategy averages the train replies of a round; a block of rounds (transport "grpc",
``rounds-per-message`` > 1) averages the states the clients upload to the BN sync service. Both
must give the same bits, so both add the clients up in partition-id order: the order of the
clients' data, which a resumed run or another runtime (new node ids) does not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.fedtan.aggregation import average_states, weighted_mean
from common.protocol import NUM_EXAMPLES, TRAIN_LOSS
from common.transports.base import FailureKind, RoundFailure


@dataclass(frozen=True)
class ClientUpdate:
    """One client's result of a round: its trained state, and what it trained on."""

    node: int
    partition_id: int
    num_examples: int
    train_loss: float
    state: Mapping[str, Tensor]


def average_updates(
    updates: Iterable[ClientUpdate],
) -> tuple[dict[str, Tensor], dict[str, float | int]]:
    """The sample-weighted average of the updates' states and the round's metrics (the train
    loss weighted alike, the samples, the clients); ``RoundFailure`` if it is not finite."""
    ordered = sorted(updates, key=lambda u: (u.partition_id, u.node))
    weights = [float(u.num_examples) for u in ordered]
    try:
        averaged = average_states([u.state for u in ordered], weights)
    except ValueError as error:  # keys or shapes that do not match the others
        raise RoundFailure(
            f"cannot average the clients' models: {error}", FailureKind.DISAGREEMENT
        ) from error
    for key, tensor in averaged.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise RoundFailure(
                f"the averaged model has non-finite values in {key!r}", FailureKind.DISAGREEMENT
            )
    metrics = {
        TRAIN_LOSS: weighted_mean([u.train_loss for u in ordered], weights),
        NUM_EXAMPLES: int(sum(weights)),
        "clients": len(ordered),
    }
    return averaged, metrics


def all_finite(tensor: Tensor) -> bool:
    """Whether a floating-point tensor has no inf or NaN."""
    # numpy where it can: torch's intra-op threads make each small check cost milliseconds
    # on a loaded machine (the simulated clients are that load), numpy uses none.
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        return bool(tensor.isfinite().all())
    return bool(np.isfinite(tensor.numpy()).all())
