"""Devices a test runs on: the CPU always, CUDA where present (only that parameter is skipped)."""

import pytest
import torch

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]
device_params = pytest.mark.parametrize("device", DEVICES)
