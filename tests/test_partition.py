"""Specification of common/experiment/partition.py."""

from __future__ import annotations

import numpy as np
import pytest

from common.experiment.data import load_digits
from common.experiment.partition import SCHEMES, partition


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    return load_digits(train=True).labels.numpy()


def assert_covers_exactly_once(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert np.array_equal(np.sort(joined), np.arange(n))


def test_iid_covers_all_indices_once_with_near_equal_sizes(digit_labels: np.ndarray) -> None:
    parts = partition(digit_labels, 5, "iid", seed=0)
    assert len(parts) == 5
    assert_covers_exactly_once(parts, len(digit_labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_shuffled_and_reproducible() -> None:
    labels = np.repeat(np.arange(10), 100)  # sorted input must not give sorted clients
    parts = partition(labels, 5, "iid", seed=3)
    assert all(len(np.unique(labels[p])) == 10 for p in parts)
    again = partition(labels, 5, "iid", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 5, "iid", seed=4)
    assert not np.array_equal(parts[0], other[0])


def test_sorted_gives_each_client_exactly_two_classes_on_balanced_digits(
    digit_labels: np.ndarray,
) -> None:
    # The reference setting: 10 equally large classes, 5 clients (CIFAR-10: 10,000 consecutive
    # label-sorted images each). Digits classes differ by a few samples, so balance them first.
    per_class = np.bincount(digit_labels).min()
    keep = np.concatenate([np.flatnonzero(digit_labels == c)[:per_class] for c in range(10)])
    labels = digit_labels[np.sort(keep)]
    parts = partition(labels, 5, "sorted")
    assert_covers_exactly_once(parts, len(labels))
    assert [sorted(set(labels[p].tolist())) for p in parts] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
        [8, 9],
    ]


def test_sorted_keeps_whole_classes_when_they_divide_among_the_clients(
    digit_labels: np.ndarray,
) -> None:
    # Digits classes differ by a few samples; each client still gets exactly two whole classes.
    parts = partition(digit_labels, 5, "sorted")
    assert_covers_exactly_once(parts, len(digit_labels))
    assert [sorted(set(digit_labels[p].tolist())) for p in parts] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
        [8, 9],
    ]
    order = np.concatenate(parts)
    assert np.all(np.diff(digit_labels[order]) >= 0)  # consecutive runs of the sorted labels


def test_sorted_cuts_equal_consecutive_runs_when_classes_do_not_divide(
    digit_labels: np.ndarray,
) -> None:
    parts = partition(digit_labels, 3, "sorted")
    assert_covers_exactly_once(parts, len(digit_labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert np.all(np.diff(digit_labels[np.concatenate(parts)]) >= 0)


def test_dirichlet_is_reproducible_and_covers_all_indices(digit_labels: np.ndarray) -> None:
    parts = partition(digit_labels, 5, "dirichlet", alpha=0.5, seed=7)
    assert_covers_exactly_once(parts, len(digit_labels))
    again = partition(digit_labels, 5, "dirichlet", alpha=0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(digit_labels, 5, "dirichlet", alpha=0.5, seed=8)
    assert [len(p) for p in parts] != [len(p) for p in other]


def test_dirichlet_smaller_alpha_means_more_label_skew(digit_labels: np.ndarray) -> None:
    def mean_majority_share(alpha: float) -> float:
        parts = partition(digit_labels, 5, "dirichlet", alpha=alpha, seed=0)
        return float(
            np.mean([np.bincount(digit_labels[p]).max() / len(p) for p in parts if len(p)])
        )

    assert mean_majority_share(0.1) > mean_majority_share(1.0) > mean_majority_share(100.0)
    assert mean_majority_share(100.0) < 0.2  # near the IID 1/10


@pytest.mark.parametrize(
    ("num_clients", "scheme", "alpha", "message"),
    [
        (5, "pathological", 0.5, "valid: iid, sorted, dirichlet"),
        (0, "iid", 0.5, "num_clients"),
        (21, "sorted", 0.5, "num_clients"),
        (5, "dirichlet", 0.0, "alpha"),
        (5, "dirichlet", -1.0, "alpha"),
    ],
)
def test_bad_input_is_refused(num_clients: int, scheme: str, alpha: float, message: str) -> None:
    labels = np.arange(20) % 10
    with pytest.raises(ValueError, match=message):
        partition(labels, num_clients, scheme, alpha=alpha)


def test_every_scheme_handles_one_client() -> None:
    labels = np.arange(50) % 10
    for scheme in SCHEMES:
        (only,) = partition(labels, 1, scheme)
        assert_covers_exactly_once([only], 50)
