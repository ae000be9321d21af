"""BN synchronization data as Flower records, for the transport over Flower messages.

The server sends the union statistics known so far (``UnionStats``); a client replies with its
local statistics of one BN layer. Arrays travel as float64 so nothing is rounded on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.fedtan.bn_channel import BNSyncError, GradSums, Moments
from common.protocol import (
    BACKWARD,
    FORWARD,
    LOCAL_STATS_META_RECORD,
    LOCAL_STATS_RECORD,
    PHASES,
    SERVER_ROUND,
    SYNC_INDEX,
    SYNC_LAYER,
    UNION_STATS_META_RECORD,
    UNION_STATS_RECORD,
)

_PHASE = "phase"  # in a reply's meta: which phase it answers
_COUNT = "count"  # ... and, forward, the client's sample count


@dataclass
class UnionStats:
    """The union batch's BN statistics of one synced step, in the order the layers need them."""

    forward: list[tuple[str, Moments]] = field(default_factory=list)
    backward: list[tuple[str, GradSums]] = field(default_factory=list)

    def to_records(self) -> dict[str, ArrayRecord | ConfigRecord]:
        arrays = {}
        for phase, entries in ((FORWARD, self.forward), (BACKWARD, self.backward)):
            for i, (_, stats) in enumerate(entries):
                for name in PHASES[phase].fields:
                    arrays[f"{phase}.{i}.{name}"] = _array(getattr(stats, name))
        meta = ConfigRecord(
            {
                "forward-layers": [layer for layer, _ in self.forward],
                "forward-counts": [m.count for _, m in self.forward],
                "backward-layers": [layer for layer, _ in self.backward],
            }
        )
        return {UNION_STATS_RECORD: ArrayRecord(arrays), UNION_STATS_META_RECORD: meta}

    @classmethod
    def from_records(cls, content: RecordDict) -> UnionStats:
        meta = content.config_records[UNION_STATS_META_RECORD]
        arrays = content.array_records[UNION_STATS_RECORD]
        union = cls()
        for i, (layer, count) in enumerate(
            zip(meta["forward-layers"], meta["forward-counts"], strict=True)
        ):
            mean, m2 = (_tensor(arrays[f"{FORWARD}.{i}.{n}"]) for n in PHASES[FORWARD].fields)
            union.forward.append((layer, Moments(int(count), mean, m2)))
        for i, layer in enumerate(meta["backward-layers"]):
            sums = (_tensor(arrays[f"{BACKWARD}.{i}.{n}"]) for n in PHASES[BACKWARD].fields)
            union.backward.append((layer, GradSums(*sums)))
        return union


def local_stats_record(
    phase: str, index: int, layer: str, stats: Moments | GradSums, server_round: int
) -> RecordDict:
    """A client's reply: its statistics of the ``index``-th sync point of ``phase``."""
    meta = {_PHASE: phase, SYNC_INDEX: index, SYNC_LAYER: layer, SERVER_ROUND: server_round}
    if phase == FORWARD:
        meta[_COUNT] = stats.count
    arrays = {name: _array(getattr(stats, name)) for name in PHASES[phase].fields}
    return RecordDict(
        {LOCAL_STATS_RECORD: ArrayRecord(arrays), LOCAL_STATS_META_RECORD: ConfigRecord(meta)}
    )


def parse_local_stats(
    content: RecordDict, *, sender: object, phase: str, index: int, layer: str, server_round: int
) -> Moments | GradSums:
    """Read a client's reply, refusing one that answers another question than was asked."""
    expected = {_PHASE: phase, SYNC_INDEX: index, SYNC_LAYER: layer, SERVER_ROUND: server_round}
    try:
        meta = content.config_records[LOCAL_STATS_META_RECORD]
        arrays = content.array_records[LOCAL_STATS_RECORD]
        tags = {key: meta[key] for key in expected}
        values = [_tensor(arrays[name]) for name in PHASES[phase].fields]
        count = meta[_COUNT] if phase == FORWARD else None
    except (KeyError, TypeError, ValueError) as error:
        raise BNSyncError(f"client {sender}: malformed {phase} reply ({error!r})") from None
    if tags != expected:
        raise BNSyncError(
            f"client {sender}: reply is for {tags}, expected {expected} "
            "(stale or out-of-step message)"
        )
    if phase == FORWARD:
        return Moments(count, *values)
    return GradSums(*values)


def _array(tensor: torch.Tensor) -> Array:
    return Array(tensor.detach().to("cpu", torch.float64).numpy())


def _tensor(array: Array) -> torch.Tensor:
    values = array.numpy()
    if not np.issubdtype(values.dtype, np.floating):
        # Kept as is: check_moments refuses non-float dtypes with the client's name.
        return torch.from_numpy(np.array(values))
    return torch.from_numpy(np.array(values, dtype=np.float64))
