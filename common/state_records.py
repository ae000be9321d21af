"""Model states as Flower ``ArrayRecord``s, byte for byte as Flower writes them, faster.

``ArrayRecord(state)`` serializes every entry with ``np.save`` and reads it back with
``np.load``; for a ResNet-20 state (116 entries) that is 6-11 ms each way, paid on the server's
path between two rounds (and per client reply). Here each entry's ``.npy`` header is made once
per dtype and shape and the data are copied as they are: the same bytes, in about half the time
to write and a tenth to read (``scripts/bench_state_records.py``). Anything out of the
ordinary (a non-contiguous tensor, a dtype numpy cannot hold, bytes that are not exactly what
``np.save`` writes) goes through Flower's own code, which also raises its errors.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_NUMPY = "numpy.ndarray"  # flwr's SType.NUMPY: the only serialization ArrayRecord writes
_PLAIN_KINDS = "biufc"  # bool, integers, floats, complex: fixed-size numbers, no objects


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state)``: the same entries, dtypes, shapes and bytes."""
    record = ArrayRecord()
    for key, tensor in state.items():
        array = tensor.detach().cpu().numpy()
        head = _header(array.dtype.str, array.shape) if array.flags.c_contiguous else None
        if head is None:
            record[key] = Array.from_numpy_ndarray(array)
        else:
            data = head + array.tobytes()
            record[key] = Array(dtype=str(array.dtype), shape=array.shape, stype=_NUMPY, data=data)
    return record


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``: new, writable tensors of the entries, in order."""
    return {key: torch.from_numpy(_read(array)) for key, array in record.items()}


def _read(array: Array) -> np.ndarray:
    """The entry's values; through ``Array.numpy`` unless its bytes are exactly what
    ``np.save`` writes for its declared dtype and shape (the data then follow the header)."""
    if array.stype == _NUMPY:
        try:
            dtype = np.dtype(array.dtype)
        except TypeError:
            dtype = None
        shape = tuple(array.shape)
        if dtype is not None and dtype.kind in _PLAIN_KINDS and _is_shape(shape):
            head = _header(dtype.str, shape)
            size = math.prod(shape) * dtype.itemsize
            data = array.data
            if head is not None and len(data) == len(head) + size and data.startswith(head):
                return np.frombuffer(data, dtype=dtype, offset=len(head)).reshape(shape).copy()
    return array.numpy()


def _is_shape(shape: tuple[object, ...]) -> bool:
    return all(type(size) is int and size >= 0 for size in shape)


@functools.lru_cache(maxsize=1024)
def _header(descr: str, shape: tuple[int, ...]) -> bytes | None:
    """What ``np.save`` writes before the data of a C-ordered array; None where it would use
    another format version (a header over 64 kB, never a model's)."""
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": descr, "fortran_order": False, "shape": shape}
        )
    except ValueError:
        return None
    return buffer.getvalue()


__all__ = ["record_to_state", "state_to_record"]
