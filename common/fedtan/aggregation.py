"""Sample-weighted averaging of whole model states (weights, BN affine parameters and buffers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor


def average_states(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Weighted mean of ``states``, entry by entry, with the keys and dtypes of the first.

    Floating-point entries are averaged in float64 and cast back. Integer entries (BatchNorm's
    ``num_batches_tracked``) are averaged and rounded, which is exact when they agree.
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
    out = {}
    for key in keys:
        ref = states[0][key]
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[key] = (acc if ref.is_floating_point() else acc.round()).to(ref.dtype)
    return out


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean of per-client scalars (losses, accuracies)."""
    total = float(sum(weights))
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)


__all__ = ["average_states", "weighted_mean"]
