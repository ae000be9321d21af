"""Test-wide settings: the torch thread count comes from FEDTAN_TEST_THREADS when it is set.

The suite must hold with any thread count (reductions are split differently); run it with
``FEDTAN_TEST_THREADS=1`` and ``=2`` to check.
"""

import os

import torch

if os.environ.get("FEDTAN_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["FEDTAN_TEST_THREADS"]))
