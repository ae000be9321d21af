"""Test-wide settings: the torch thread count comes from FEDTAN_TEST_THREADS when it is set.

The suite must hold with any thread count (reductions are split differently); run it with
``FEDTAN_TEST_THREADS=1`` and ``=2`` to check.
"""

import os

import torch

if os.environ.get("FEDTAN_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["FEDTAN_TEST_THREADS"]))


def pytest_collection_modifyitems(items: list) -> None:
    """Slow tests first, the order otherwise kept. ``make test`` hands its pytest-xdist workers
    a test or two at a time (``--dist load --maxschedchunk 1``), so the slow ones spread over
    the workers from the start and overlap, instead of one of them ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
