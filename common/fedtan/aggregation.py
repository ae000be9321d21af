"""Sample-weighted averaging of whole model states (weights, BN affine parameters and buffers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor


def average_states(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Weighted mean of ``states``, entry by entry, with the keys and dtypes of the first.

    Floating-point entries are averaged in float64 and cast back. Integer entries (BatchNorm's
    ``num_batches_tracked``) are averaged and rounded, which is exact when they agree. The
    returned entries are views into one new buffer per dtype.
    """
    if not states or len(states) != len(weights):
        raise ValueError(
            f"need one weight per state, got {len(states)} states and {len(weights)} weights"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            missing, extra = set(keys) - set(state), set(state) - set(keys)
            raise ValueError(
                f"state {i} has other entries than state 0: "
                f"missing {sorted(missing)}, extra {sorted(extra)}"
            )
    # One flat vector per client and (dtype, device) group: a handful of large operations per
    # round instead of one small operation per entry and client.
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, ref in states[0].items():
        groups.setdefault((ref.dtype, ref.device), []).append(key)
    out: dict[str, Tensor] = {}
    for keys_of_group in groups.values():
        sizes = [states[0][key].numel() for key in keys_of_group]
        rows = (torch.cat([state[key].reshape(-1) for key in keys_of_group]) for state in states)
        mean = weighted_row_mean(rows, weights)
        for key, chunk in zip(keys_of_group, mean.split(sizes), strict=True):
            out[key] = chunk.view(states[0][key].shape)
    return {key: out[key] for key in keys}


def weighted_row_mean(rows: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """The weighted mean of equally shaped tensors of one dtype (one per weight), in that dtype.

    Accumulated in float64, in the order given; integer tensors are averaged and rounded. The
    one computation behind every average of client states, so that all engines agree bit for
    bit. ``rows`` may be a generator: one row at a time is enough.
    """
    total = float(sum(weights))
    acc: Tensor | None = None
    dtype = torch.float64
    for row, weight in zip(rows, weights, strict=True):
        if acc is None:
            acc = torch.zeros(row.shape, dtype=torch.float64, device=row.device)
            dtype = row.dtype
        # Added in float64 straight from the row's dtype: no float64 copy per client.
        acc.add_(row, alpha=weight / total)
    if acc is None:
        raise ValueError("nothing to average")
    if not dtype.is_floating_point:
        acc = acc.round_()
    return acc.to(dtype)


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean of per-client scalars (losses, accuracies)."""
    total = float(sum(weights))
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)


__all__ = ["average_states", "weighted_mean", "weighted_row_mean"]
