"""How close a float32 result must be: as close as float32's own noise allows, measured.

A float32 run and its float64 twin part by rounding alone, and by more the longer the run (a
chained float32 run drifts by several % of the update over a few ResNet rounds). So a float32
result is checked against the float64 reference, in units of the update, and bounded by the same
distance for a float32 reference that computes it the plain way, measured in the same test.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

# A float32 computation in another order (per-client partial sums, a float64 combination,
# another process's thread count) has an error of the same order as the plain float32 run's;
# 10 is the margin.
NOISE_FACTOR = 10

State = Mapping[str, Tensor]


def relative_error(got: State, expected: State, start: State) -> float:
    """max |got - expected| over every floating-point entry, in units of the update: the largest
    change from ``start`` to ``expected`` of any entry. Integer entries must be equal, and every
    entry must keep the dtype it has in ``start``."""
    assert list(got) == list(expected) == list(start), "state_dict keys differ"
    error = update = 0.0
    for key, value in expected.items():
        assert got[key].dtype == start[key].dtype, key
        assert got[key].shape == value.shape, key
        if value.is_floating_point():
            error = max(error, (got[key].double() - value.double()).abs().max().item())
            update = max(update, (value.double() - start[key].double()).abs().max().item())
        else:
            assert bool((got[key] == value).all()), key
    assert update > 1e-3, "the model hardly moved: the comparison would be vacuous"
    return error / update


def assert_within_rounding_noise(
    got: State, plain32: State, exact64: State, start: State, factor: float = NOISE_FACTOR
) -> None:
    """``got`` (float32, or half) is no farther from ``exact64`` than ``factor`` times
    ``plain32``, the plain computation in the same dtype, is."""
    noise = relative_error(plain32, exact64, start)
    error = relative_error(got, exact64, start)
    assert error <= factor * noise, f"error {error:.3g} of the update; own noise {noise:.3g}"
