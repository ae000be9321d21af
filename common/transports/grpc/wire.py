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

import math
import struct
from collections.abc import Iterable, Mapping
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


# --- blocks of rounds (run config rounds-per-message > 1; block.py) ---------------------------
#
#     STATE    magic BNS1, n: uint32, n x (name: uint16 + UTF-8, dtype: uint8, ndim: uint8,
#              shape: ndim x int64), then each entry's bytes in order (native little-endian)
#     NEXT     magic BNB1, kind 1, seq: int64 (the last round seen; -1 before the first)
#     UPLOAD   magic BNB1, kind 2, seq, num_examples: int64, train_loss: float64,
#              partition_id: int64, STATE
#     GIVE_UP  magic BNB1, kind 3, seq, ERROR frame (why this client stops)
#     (NEXT and UPLOAD are answered with a PLAN, WAIT or END; GIVE_UP with nothing)
#     PLAN     magic BNP1, kind 1, seq, server_round: int64, lr: float64, bn_round: int64 (-1:
#              not sampled), credential: uint16 + ASCII, STATE (the round's global model)
#     WAIT     magic BNP1, kind 2 (no plan yet: ask again)
#     END      magic BNP1, kind 3, ERROR frame (why the block ended)

BLOCK_METHOD = f"/{SERVICE_NAME}/Block"
_STATE_MAGIC, _BLOCK_MAGIC, _PLAN_MAGIC = b"BNS1", b"BNB1", b"BNP1"
_STATE_HEAD = struct.Struct("<4sI")
_ENTRY_HEAD = struct.Struct("<BB")
_I64 = struct.Struct("<q")
_BLOCK_HEAD = struct.Struct("<4sBq")
_UPLOAD = struct.Struct("<qdq")
_PLAN_HEAD = struct.Struct("<4sB")
_PLAN = struct.Struct("<qqdq")
MAX_ENTRIES = 1 << 16  # entries of a model state; ResNet-20 has about 130
MAX_DIMS = 8
MAX_CREDENTIAL = 256
NEXT, UPLOAD, GIVE_UP = 1, 2, 3  # block request kinds
PLAN, WAIT, END = 1, 2, 3  # block reply kinds
# The dtypes a model state may hold, by wire code.
_DTYPES = {
    1: torch.float32,
    2: torch.float64,
    3: torch.float16,
    4: torch.bfloat16,
    5: torch.int64,
    6: torch.int32,
    7: torch.uint8,
    8: torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class EntrySpec:
    """What one entry of a model state is: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


StateSpec = tuple[EntrySpec, ...]


def state_spec(state: Mapping[str, Tensor]) -> StateSpec:
    """The entries of ``state``, in order: what every state of the same model must match."""
    return tuple(EntrySpec(name, t.dtype, tuple(t.shape)) for name, t in state.items())


def state_size(spec: StateSpec) -> int:
    """Bytes of the STATE frame of a state that matches ``spec``."""
    head = sum(
        _U16.size + len(e.name.encode()) + _ENTRY_HEAD.size + _I64.size * len(e.shape) for e in spec
    )
    return _STATE_HEAD.size + head + sum(e.nbytes for e in spec)


def encode_state(state: Mapping[str, Tensor]) -> bytes:
    """One STATE frame for ``state`` (any device; the bytes are copied to the CPU)."""
    heads, data = [_STATE_HEAD.pack(_STATE_MAGIC, len(state))], []
    for name, tensor in state.items():
        if tensor.dtype not in _CODES:
            raise BNSyncError(f"state entry {name!r}: dtype {tensor.dtype} cannot travel")
        if tensor.dim() > MAX_DIMS:
            raise BNSyncError(f"state entry {name!r}: {tensor.dim()} dims, at most {MAX_DIMS}")
        text = name.encode("utf-8")
        if len(text) > MAX_NAME:
            raise BNSyncError(f"state entry name is too long ({len(text)} bytes): {name[:40]!r}")
        heads += [_U16.pack(len(text)), text, _ENTRY_HEAD.pack(_CODES[tensor.dtype], tensor.dim())]
        heads += [_I64.pack(size) for size in tensor.shape]
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        data.append(flat.view(torch.uint8).numpy().tobytes())
    return b"".join(heads + data)


def decode_state(data: bytes | memoryview, expected: StateSpec | None = None) -> dict[str, Tensor]:
    """The state of one STATE frame; ``BNSyncError`` for anything else, and for a state whose
    entries (names in order, dtypes, shapes) are not exactly ``expected``'s, when given."""
    data = memoryview(data)
    magic, count = _unpack(_STATE_HEAD, data, 0, "state")
    if bytes(magic) != _STATE_MAGIC:
        raise BNSyncError(f"not a state frame: magic {bytes(magic)!r}")
    if count > MAX_ENTRIES:
        raise BNSyncError(f"state frame claims {count} entries, at most {MAX_ENTRIES}")
    offset, specs = _STATE_HEAD.size, []
    for _ in range(count):
        (size,) = _unpack(_U16, data, offset, "state entry name")
        offset += _U16.size
        if size > MAX_NAME or offset + size > len(data):
            raise BNSyncError("state frame truncated or with a too long entry name")
        try:
            name = bytes(data[offset : offset + size]).decode("utf-8")
        except UnicodeDecodeError:
            raise BNSyncError("state entry name is not UTF-8") from None
        offset += size
        code, ndim = _unpack(_ENTRY_HEAD, data, offset, "state entry")
        offset += _ENTRY_HEAD.size
        if code not in _DTYPES or ndim > MAX_DIMS:
            raise BNSyncError(f"state entry {name!r}: unknown dtype code {code} or {ndim} dims")
        shape = tuple(_unpack(_I64, data, offset + i * _I64.size, name)[0] for i in range(ndim))
        offset += ndim * _I64.size
        if any(s < 0 for s in shape):
            raise BNSyncError(f"state entry {name!r}: negative size in shape {shape}")
        specs.append(EntrySpec(name, _DTYPES[code], shape))
    if expected is not None:
        _match(tuple(specs), expected)
    # Sizes are checked against the frame's length before any allocation.
    total = sum(spec.nbytes for spec in specs)
    _expect_length(data, offset + total, "state")
    owned = bytearray(data[offset:])  # one copy; the entries are views into it
    state = {}
    position = 0
    for spec in specs:
        chunk = torch.frombuffer(owned, dtype=torch.uint8, count=spec.nbytes, offset=position)
        state[spec.name] = chunk.view(spec.dtype).reshape(spec.shape)
        position += spec.nbytes
    return state


def _match(actual: StateSpec, expected: StateSpec) -> None:
    """Exactly ``expected``'s entries, or ``BNSyncError`` naming the first difference."""
    names, wanted = [s.name for s in actual], [s.name for s in expected]
    if names != wanted:
        missing = sorted(set(wanted) - set(names))
        extra = sorted(set(names) - set(wanted))
        if missing or extra:
            raise BNSyncError(f"the state has other entries: missing {missing}, extra {extra}")
        raise BNSyncError("the state has the model's entries in another order")
    for got, want in zip(actual, expected, strict=True):
        if got.dtype != want.dtype or got.shape != want.shape:
            raise BNSyncError(
                f"state entry {got.name!r} is {got.dtype} {list(got.shape)}, the model's is "
                f"{want.dtype} {list(want.shape)}"
            )


@dataclass(frozen=True)
class BlockRequest:
    """A block member's call: ``kind`` NEXT (the plan after round ``seq`` of the block), UPLOAD
    (its result of round ``seq``: ``body`` = upload fields and STATE) or GIVE_UP (``body`` =
    ERROR frame)."""

    kind: int
    seq: int
    body: memoryview


def encode_next(seq: int) -> bytes:
    return _BLOCK_HEAD.pack(_BLOCK_MAGIC, NEXT, seq)


def encode_upload(
    seq: int, num_examples: int, train_loss: float, partition_id: int, state: bytes
) -> bytes:
    return b"".join(
        (
            _BLOCK_HEAD.pack(_BLOCK_MAGIC, UPLOAD, seq),
            _UPLOAD.pack(num_examples, train_loss, partition_id),
            state,
        )
    )


def encode_give_up(seq: int, reason: str) -> bytes:
    return _BLOCK_HEAD.pack(_BLOCK_MAGIC, GIVE_UP, seq) + encode(ErrorReply(reason))


def decode_block_request(data: bytes) -> BlockRequest:
    view = memoryview(data)
    magic, kind, seq = _unpack(_BLOCK_HEAD, view, 0, "block request")
    if bytes(magic) != _BLOCK_MAGIC or kind not in (NEXT, UPLOAD, GIVE_UP):
        raise BNSyncError(f"not a block request: magic {bytes(magic)!r}, kind {kind}")
    body = view[_BLOCK_HEAD.size :]
    if kind == NEXT and len(body):
        raise BNSyncError("a NEXT block request has trailing bytes")
    return BlockRequest(kind, seq, body)


def decode_upload(body: memoryview) -> tuple[int, float, int, memoryview]:
    """(num_examples, train_loss, partition_id, STATE frame) of an UPLOAD's body."""
    num_examples, train_loss, partition_id = _unpack(_UPLOAD, body, 0, "upload")
    return num_examples, train_loss, partition_id, body[_UPLOAD.size :]


@dataclass(frozen=True)
class Plan:
    """Round ``seq`` of a block, as one member sees it: the round, its learning rate, the BN
    sync round and credential if this member is sampled (else ``bn_round`` is None), and the
    global model it starts from."""

    seq: int
    server_round: int
    lr: float
    bn_round: int | None
    credential: str
    state: dict[str, Tensor]


def encode_plan(
    seq: int, server_round: int, lr: float, bn_round: int | None, credential: str, state: bytes
) -> bytes:
    text = credential.encode("ascii")
    return b"".join(
        (
            _PLAN_HEAD.pack(_PLAN_MAGIC, PLAN),
            _PLAN.pack(seq, server_round, lr, -1 if bn_round is None else bn_round),
            _U16.pack(len(text)),
            text,
            state,
        )
    )


def encode_wait() -> bytes:
    return _PLAN_HEAD.pack(_PLAN_MAGIC, WAIT)


def encode_end(reason: str) -> bytes:
    return _PLAN_HEAD.pack(_PLAN_MAGIC, END) + encode(ErrorReply(reason))


def decode_plan(data: bytes) -> Plan | ErrorReply | None:
    """A PLAN; an ``ErrorReply`` for END (why the block ended); None for WAIT."""
    view = memoryview(data)
    magic, kind = _unpack(_PLAN_HEAD, view, 0, "plan")
    if bytes(magic) != _PLAN_MAGIC or kind not in (PLAN, WAIT, END):
        raise BNSyncError(f"not a block plan: magic {bytes(magic)!r}, kind {kind}")
    offset = _PLAN_HEAD.size
    if kind == WAIT:
        _expect_length(view, offset, "wait")
        return None
    if kind == END:
        reason = decode(view[offset:])
        if not isinstance(reason, ErrorReply):
            raise BNSyncError("an END plan without a reason")
        return reason
    seq, server_round, lr, bn_round = _unpack(_PLAN, view, offset, "plan")
    offset += _PLAN.size
    (size,) = _unpack(_U16, view, offset, "plan credential")
    offset += _U16.size
    if size > MAX_CREDENTIAL or offset + size > len(view):
        raise BNSyncError("plan truncated or with a too long credential")
    credential = bytes(view[offset : offset + size]).decode("ascii", errors="replace")
    state = decode_state(view[offset + size :])
    return Plan(seq, server_round, lr, None if bn_round < 0 else bn_round, credential, state)


def block_request_size(spec: StateSpec) -> int:
    """Bytes of the largest block request for a model of ``spec`` (an UPLOAD, or a GIVE_UP)."""
    error = _HEADER.size + _U32.size + 4 * MAX_MESSAGE
    return _BLOCK_HEAD.size + max(_UPLOAD.size + state_size(spec), error)


def plan_size(spec: StateSpec) -> int:
    """Bytes of the largest plan for a model of ``spec``."""
    error = _HEADER.size + _U32.size + 4 * MAX_MESSAGE
    plan = _PLAN.size + _U16.size + MAX_CREDENTIAL + state_size(spec)
    return _PLAN_HEAD.size + max(plan, error)
