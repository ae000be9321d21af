"""The byte form of what federated BN layers exchange, for the gRPC transport.

No protobuf code generation: a frame is a 5-byte header (magic ``BNW1`` and a kind byte) and then
fixed little-endian fields, so it is the same on every platform and every malformed or truncated
input is detected by a length check. Per-channel vectors always travel as float64: that holds
float32/float16 values exactly and is the dtype ``combine_moments`` computes in, so a transport
adds no rounding of its own.

    MOMENTS    header, count: int64, C: uint32, mean: C x float64, m2: C x float64
    GRAD_SUMS  header, C: uint32, sum_dy: C x float64, sum_dy_xhat: C x float64
    ERROR      header, n: uint32, message: n bytes of UTF-8

``ReduceRequest`` is one client's contribution to one exchange of a round (the body of a call).
Who sends it travels apart, in the call's metadata (``Caller``): the service authenticates a call
from its headers alone, before it reads a body or lends it a worker thread, so an outsider costs
it nothing but a refusal. Every size is bounded, so the service can set gRPC's message limits
from the model's largest layer (``request_size``, ``frame_size``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.fedtan.bn_channel import BNSyncError, GradSums, Moments

_MAGIC = b"BNW1"
_KIND_MOMENTS, _KIND_GRAD_SUMS, _KIND_ERROR = 1, 2, 3
_HEADER = struct.Struct("<4sB")
_COUNT_AND_C = struct.Struct("<qI")
_U32 = struct.Struct("<I")
_F64 = np.dtype("<f8")
_MAX_CHANNELS = 1 << 24  # refuses absurd sizes before allocating anything

# The gRPC method of the BN sync service (service.py, client.py).
SERVICE_NAME = "fedtan.BNSync"
REDUCE_METHOD = f"/{SERVICE_NAME}/Reduce"

_REQUEST_MAGIC = b"BNQ2"
_REQUEST_HEAD = struct.Struct("<4sq")  # magic, sequence number
_U16 = struct.Struct("<H")
MAX_NAME = 256  # bytes of a layer or phase name; a BN layer's qualified name is far shorter
MAX_MESSAGE = 4096  # characters of an error text that travels (gRPC caps metadata at 16 KiB)

# Call metadata: who is calling (gRPC metadata keys are lower-case ASCII).
_ROUND_KEY, _CLIENT_KEY, _CREDENTIAL_KEY = "bn-sync-round", "bn-sync-client", "bn-sync-credential"


@dataclass(frozen=True)
class ErrorReply:
    """A reason in place of a value: a failed exchange, or a client that gives up."""

    message: str


Payload = Moments | GradSums | ErrorReply


def encode(value: Payload) -> bytes:
    """One frame for ``value``."""
    if isinstance(value, Moments):
        if not isinstance(value.count, int) or isinstance(value.count, bool):
            raise BNSyncError(f"Moments.count must be an int, got {value.count!r}")
        mean, m2 = _vectors("Moments", mean=value.mean, m2=value.m2)
        return b"".join(
            (
                _HEADER.pack(_MAGIC, _KIND_MOMENTS),
                _COUNT_AND_C.pack(value.count, len(mean)),
                mean.tobytes(),
                m2.tobytes(),
            )
        )
    if isinstance(value, GradSums):
        s1, s2 = _vectors("GradSums", sum_dy=value.sum_dy, sum_dy_xhat=value.sum_dy_xhat)
        return b"".join(
            (_HEADER.pack(_MAGIC, _KIND_GRAD_SUMS), _U32.pack(len(s1)), s1.tobytes(), s2.tobytes())
        )
    if isinstance(value, ErrorReply):
        text = bounded(value.message).encode("utf-8")
        return _HEADER.pack(_MAGIC, _KIND_ERROR) + _U32.pack(len(text)) + text
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(data: bytes) -> Payload:
    """The value of one frame; ``BNSyncError`` for anything that is not exactly one frame.

    Only the structure is checked here; whether the numbers are usable (finite, positive count,
    non-negative m2) is ``check_moments`` / ``check_grad_sums``'s job, which can name the sender.
    """
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise BNSyncError(f"BN frame truncated: {len(data)} bytes, header needs {_HEADER.size}")
    magic, kind = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise BNSyncError(f"not a BN frame: magic {magic!r}, expected {_MAGIC!r}")
    offset = _HEADER.size
    if kind == _KIND_MOMENTS:
        count, channels = _unpack(_COUNT_AND_C, data, offset, "Moments")
        mean, m2 = _read_vectors(data, offset + _COUNT_AND_C.size, channels, "Moments")
        return Moments(count, mean, m2)
    if kind == _KIND_GRAD_SUMS:
        (channels,) = _unpack(_U32, data, offset, "GradSums")
        s1, s2 = _read_vectors(data, offset + _U32.size, channels, "GradSums")
        return GradSums(s1, s2)
    if kind == _KIND_ERROR:
        (size,) = _unpack(_U32, data, offset, "error")
        if size > 4 * MAX_MESSAGE:  # UTF-8 takes at most 4 bytes a character
            raise BNSyncError(f"error frame claims {size} bytes of text")
        _expect_length(data, offset + _U32.size + size, "error")
        try:
            return ErrorReply(data[offset + _U32.size :].decode("utf-8"))
        except UnicodeDecodeError as error:
            raise BNSyncError(f"error frame is not UTF-8: {error}") from None
    raise BNSyncError(f"unknown BN frame kind {kind}")


@dataclass(frozen=True)
class Caller:
    """Who makes a call: a client of a service round, with its credential (call metadata)."""

    round_id: int
    client_id: str
    credential: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            (_ROUND_KEY, str(self.round_id)),
            (_CLIENT_KEY, self.client_id),
            (_CREDENTIAL_KEY, self.credential),
        )

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller | None:
        """The caller a call's metadata names; None unless it names exactly one, well formed."""
        found: dict[str, list[str | bytes]] = {}
        for key, value in metadata or ():
            found.setdefault(key, []).append(value)
        fields = [found.get(key, []) for key in (_ROUND_KEY, _CLIENT_KEY, _CREDENTIAL_KEY)]
        if any(len(values) != 1 or not isinstance(values[0], str) for values in fields):
            return None
        (round_text,), (client_id,), (credential,) = fields
        if not round_text.isascii() or not round_text.isdigit() or len(round_text) > 18:
            return None
        if not client_id or len(client_id) > MAX_NAME:
            return None
        return cls(int(round_text), client_id, credential)


@dataclass(frozen=True)
class ReduceRequest:
    """One client's contribution to exchange ``seq`` of its round (the caller is in metadata).

    ``phase`` is "forward" (payload: Moments), "backward" (GradSums) or "abort" (ErrorReply: the
    client gives up and the round must stop). ``payload`` is an encoded frame.
    """

    phase: str
    layer: str
    seq: int
    payload: bytes


def encode_request(request: ReduceRequest) -> bytes:
    parts = [_REQUEST_HEAD.pack(_REQUEST_MAGIC, request.seq)]
    for name in ("phase", "layer"):
        text = getattr(request, name).encode("utf-8")
        if len(text) > MAX_NAME:
            raise BNSyncError(f"request {name} is too long ({len(text)} bytes, at most {MAX_NAME})")
        parts += [_U16.pack(len(text)), text]
    parts.append(request.payload)
    return b"".join(parts)


def decode_request(data: bytes) -> ReduceRequest:
    """The request's header fields; its payload is returned undecoded."""
    data = bytes(data)
    magic, seq = _unpack(_REQUEST_HEAD, data, 0, "request")
    if magic != _REQUEST_MAGIC:
        raise BNSyncError(f"not a BN reduce request: magic {magic!r}")
    offset, texts = _REQUEST_HEAD.size, []
    for name in ("phase", "layer"):
        (size,) = _unpack(_U16, data, offset, f"request {name}")
        offset += _U16.size
        if size > MAX_NAME:
            raise BNSyncError(f"request {name} is too long ({size} bytes, at most {MAX_NAME})")
        if offset + size > len(data):
            raise BNSyncError(f"request truncated in {name}")
        try:
            texts.append(data[offset : offset + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise BNSyncError(f"request {name} is not UTF-8") from None
        offset += size
    return ReduceRequest(texts[0], texts[1], seq, data[offset:])


def frame_size(channels: int) -> int:
    """Bytes of the largest frame of a layer with ``channels`` channels (MOMENTS)."""
    return _HEADER.size + _COUNT_AND_C.size + 2 * channels * _F64.itemsize


def request_size(channels: int) -> int:
    """Bytes of the largest request for such a layer (an abort's error frame included)."""
    names = 2 * (_U16.size + MAX_NAME)
    error = _HEADER.size + _U32.size + 4 * MAX_MESSAGE
    return _REQUEST_HEAD.size + names + max(frame_size(channels), error)


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying so: error texts travel in gRPC metadata."""
    if len(text) <= limit:
        return text
    return text[: limit - 40] + f"... ({len(text) - limit + 40} characters cut)"


# --- helpers ------------------------------------------------------------------------------


def _vectors(what: str, **tensors: Tensor) -> list[np.ndarray]:
    """Per-channel tensors as little-endian float64 numpy vectors of one length."""
    out = []
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise BNSyncError(f"{what}.{name} must be a 1-D floating-point tensor, got {t!r:.80}")
        # A copy: the arrays must not change when the caller later updates its tensors in place.
        out.append(t.detach().to("cpu", torch.float64).numpy().astype(_F64, copy=True))
    if len({len(v) for v in out}) != 1:
        raise BNSyncError(f"{what}: vectors of different lengths {[len(v) for v in out]}")
    return out


def _unpack(layout: struct.Struct, data: bytes, offset: int, what: str) -> tuple:
    if len(data) < offset + layout.size:
        raise BNSyncError(f"{what} frame truncated: {len(data)} bytes")
    return layout.unpack_from(data, offset)


def _read_vectors(data: bytes, offset: int, channels: int, what: str) -> tuple[Tensor, Tensor]:
    if channels > _MAX_CHANNELS:
        raise BNSyncError(f"{what} frame claims {channels} channels")
    _expect_length(data, offset + 2 * channels * _F64.itemsize, what)
    both = np.frombuffer(data, dtype=_F64, count=2 * channels, offset=offset).astype(np.float64)
    vectors = torch.from_numpy(both)  # one owned copy, split into two views
    return vectors[:channels], vectors[channels:]


def _expect_length(data: bytes, expected: int, what: str) -> None:
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise BNSyncError(f"{what} frame {problem}: {len(data)} bytes, expected {expected}")
