"""Where and how a model computes: run config ``device``, ``precision`` and ``channels-last``.

Clients (every method) and the server's evaluation resolve the device here, explicitly, rather
than trusting Ray to blank ``CUDA_VISIBLE_DEVICES`` for actors without a GPU share (Ray 2.55
announces it will stop doing that). ``precision`` is ``torch.autocast`` around the forward pass
and the loss only: parameters, optimizer steps and BN running statistics stay float32.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import Tensor, nn

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,  # no autocast
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(spec: str) -> None:
    """Refuse a ``device`` value that is not "auto", "cpu", "cuda" or "cuda:N"."""
    if not _DEVICE.fullmatch(spec):
        raise ValueError(
            f"run config 'device': {spec!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'"
        )


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names on this machine; "auto" is the local GPU if any.

    A CUDA device asked for but absent is an error naming the key, never a silent CPU run.
    """
    check_device_name(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RuntimeError(
                f"run config 'device' is {spec!r} but this machine has no CUDA device "
                "(use 'auto' or 'cpu'; in a Ray simulation give clients a GPU share with "
                "client-resources-num-gpus)"
            )
        if device.index is not None and device.index >= count:
            raise RuntimeError(
                f"run config 'device' is {spec!r} but this machine has {count} CUDA device(s)"
            )
    return device


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` to ``precision``'s dtype on ``device``; nothing for "fp32"."""
    dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, its 4-D weights in channels-last order if asked."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def place_inputs(inputs: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch of inputs on ``device``; images (4-D) in channels-last order if asked."""
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.dim() == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def contiguous_state(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state on the CPU in the standard layout: what travels is the same bytes
    whether or not the model computed in channels-last order."""
    return {key: value.cpu().contiguous() for key, value in model.state_dict().items()}
