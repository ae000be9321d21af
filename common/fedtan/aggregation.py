"""Sample-weighted averaging of whole model states (weights, BN affine parameters and buffers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    total = float(sum(weights))
    # One flat vector per client and (dtype, device) group: a handful of large operations per
    # round instead of one small operation per entry and client.
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, ref in states[0].items():
        groups.setdefault((ref.dtype, ref.device), []).append(key)
    out: dict[str, Tensor] = {}
    for (dtype, _), keys_of_group in groups.items():
        sizes = [states[0][key].numel() for key in keys_of_group]
        device = states[0][keys_of_group[0]].device
        acc = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        for state, weight in zip(states, weights, strict=True):
            # Added in float64 straight from the entries' dtype: no float64 copy per client.
            flat = torch.cat([state[key].reshape(-1) for key in keys_of_group])
            acc.add_(flat, alpha=weight / total)
        if not dtype.is_floating_point:
            acc = acc.round_()
        for key, chunk in zip(keys_of_group, acc.to(dtype).split(sizes), strict=True):
            out[key] = chunk.view(states[0][key].shape)
    return {key: out[key] for key in keys}


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean of per-client scalars (losses, accuracies)."""
    total = float(sum(weights))
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)


__all__ = ["average_states", "weighted_mean"]
