"""The server's end of the low-latency BN synchronization channel: a small gRPC service (or the
same service over framed sockets, run config ``bn-sync-protocol = "socket"``: sockets.py).

Why a service of its own: a FedTAN round needs 2L sequential all-reduces (38 for ResNet-20), and
one Flower message exchange costs about 0.1 s in simulation and 6 s in deployment (shared doc,
section 4). The ServerApp starts a ``BNSyncService``, opens a round for the clients it is about to
train, sends each client the address and its credential in the train message, and closes the
round when the replies are in. Each client's ``GrpcBNChannel`` meets the others' here.

One method, ``/fedtan.BNSync/Reduce``; bytes in and out (``wire.py``), no codegen. A call names
its caller in its metadata (over sockets: its frame's head); the service checks the credential
from that alone (``admit``), before it reads a body or lends the call a worker thread, so an
outsider's calls (header-only streams included) are refused at once and cost nothing.
Connections, streams per connection, concurrent calls, idle time, handshakes and message sizes
are all capped (``Limits``).
A call blocks until every client of the round has contributed to the same exchange (sequence
number, phase, layer), then all get the same combined value, computed by ``combine_moments`` /
``combine_grad_sums`` over the clients in the order given to ``open_round``, so the numbers are
bit for bit those of the in-process engine.

Members are authenticated, not trusted: every number is checked where it enters (finite, within
what the layer's dtype can hold, a count that the round's batch size allows for that layer and
the same batch at every layer, the layer the round's schedule expects) and where it leaves (the
combination, before any client sees it). A contribution that does not match the others is judged
against the round's schedule, or without one against the majority of the exchange, never against
whoever came first. Failures abort the whole round and name the culprit as data (``RoundAbort``):
nothing of an aborted round is returned as a result, waiting clients are released at once with
the reason, and later calls get it too. Refusals that do not
abort are those that cannot be blamed on a member of the round: a malformed request header, an
unknown or closed round, and an unknown client or wrong credential (so that an outsider can
neither stop a round nor learn its aggregates).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn, TypeVar

import grpc
import numpy as np
from torch import Tensor

from common.fedtan.bn_channel import BNSyncError, GradSums, Moments
from common.protocol import BACKWARD, FORWARD, PHASES
from common.transports.grpc.block import BLOCK_CALLS_PER_MEMBER, Block
from common.transports.grpc.calls import PROTOCOLS
from common.transports.grpc.members import Members, Refusal
from common.transports.grpc.sockets import SocketServer
from common.transports.grpc.wire import (
    BLOCK_METHOD,
    REDUCE_METHOD,
    SERVICE_NAME,
    Caller,
    ErrorReply,
    ReduceRequest,
    StateSpec,
    bounded,
    decode,
    decode_block_request,
    decode_request,
    encode,
    frame_size,
    request_size,
)

_SPARE_WORKERS = 4  # answer refusals while every member's request is parked waiting
_CALLS_PER_MEMBER = 2  # an exchange, and the abort a client sends right after it failed
_LONGEST_BLOCK_POLL = 10.0  # s a member's wait for its block's next plan holds a worker
_CLOSED_ROUNDS_KEPT = 1024
_INT64_MAX = (1 << 63) - 1

log = logging.getLogger(__name__)

# What carries a call (gRPC, or the socket protocol) hands the service two functions: one reads
# the call's request (None: it carried none), one registers what to do if the caller goes away
# while its call waits (False: it is gone already). ``admit`` returns the call's ``Answer``.
Read = Callable[[], bytes | None]
Watch = Callable[[Callable[[], None]], bool]
Answer = Callable[[Read, Watch], bytes]
M = TypeVar("M", bound=Members)


class AbortKind(Enum):
    """Why a round was aborted."""

    SILENT = "silent"  # a member sent nothing for an exchange within the timeout
    DISCONNECTED = "disconnected"  # a member left while waiting for an exchange's result
    GAVE_UP = "gave-up"  # a member aborted the round itself (its step failed)
    BAD_CONTRIBUTION = "bad-contribution"  # undecodable, invalid or out-of-step data
    CLOSED = "closed"  # the server closed the round while members were still waiting
    DISAGREEMENT = "disagreement"  # members disagree and no majority says who is right
    INTERNAL = "internal"  # the combination failed although every part passed its checks


@dataclass(frozen=True)
class LayerShape:
    """What one BN layer exchanges: its channels, and values per channel per sample (the
    spatial size: a client's count is its batch size times this)."""

    channels: int
    values_per_sample: int


@dataclass(frozen=True)
class SyncShape:
    """The exchanges of a synced step, traced once from the model by the server.

    ``forward`` / ``backward``: the layers in the order a step reaches them; ``layers``: their
    shapes; ``value_limit``: the largest magnitude the clients' statistics dtype holds (a mean,
    variance or gradient sum beyond it is infinite for them).
    """

    forward: tuple[str, ...]
    backward: tuple[str, ...]
    layers: Mapping[str, LayerShape]
    value_limit: float = float(np.finfo(np.float64).max)

    def __post_init__(self) -> None:
        if not self.forward or set(self.forward) != set(self.layers):
            raise ValueError("SyncShape: the forward layers must be exactly the shaped layers")
        if not set(self.backward) <= set(self.forward):
            raise ValueError("SyncShape: a backward layer without a forward one")
        if any(s.channels < 1 or s.values_per_sample < 1 for s in self.layers.values()):
            raise ValueError(f"SyncShape: empty layer shapes {dict(self.layers)}")

    @property
    def max_channels(self) -> int:
        return max(s.channels for s in self.layers.values())

    def point(self, seq: int) -> tuple[str, str] | None:
        """The (phase, layer) of exchange ``seq`` of a step; None past the last one."""
        if seq < len(self.forward):
            return FORWARD, self.forward[seq]
        if seq < len(self.forward) + len(self.backward):
            return BACKWARD, self.backward[seq - len(self.forward)]
        return None


@dataclass(frozen=True)
class RoundSchedule:
    """What a round allows: the step's exchanges, and each client's batch size at most."""

    shape: SyncShape
    max_batch: int

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"RoundSchedule: max_batch must be >= 1, got {self.max_batch}")


@dataclass(frozen=True)
class Limits:
    """What the service lets a peer hold (gRPC channel arguments, or the socket server's own
    bounds; see ``BNSyncService``). Over sockets a connection carries one call at a time, and
    the handshake timeout bounds a connection until a call of it is admitted."""

    idle_timeout: float = 30.0  # s a connection without a call stays open
    handshake_timeout: float = 10.0  # s to finish the TCP/TLS/HTTP2 handshake
    max_channels: int = 4096  # the largest layer: sets the message size limits
    streams_per_connection: int = 4  # an honest client has one call at a time (and an abort)
    # Bounds memory; an outsider can fill it (it cannot block a round otherwise), so it is
    # generous, and idle or half-open connections are closed by the timeouts above.
    max_connections: int = 1024
    # Blocks of rounds (block.py): the largest request (a state upload) and reply (a plan), from
    # the model's state (wire.block_request_size / plan_size); 0: no blocks.
    max_block_request: int = 0
    max_block_reply: int = 0

    @property
    def largest_request(self) -> int:
        """The most bytes a call may send: an exchange of the largest layer, or an upload."""
        return max(request_size(self.max_channels), self.max_block_request)


@dataclass(frozen=True)
class RoundAbort:
    """A round's failure: its kind, the members at fault (maybe none) and the account."""

    kind: AbortKind
    culprits: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return self.message


class _Round(Members):
    """The exchanges of one round: a reusable all-reduce among a fixed set of clients.

    Exchange ``seq`` collects one contribution per client; the last one combines, stores the
    encoded result and advances ``seq``. The result of exchange s stays readable until s + 1
    completes, which needs every waiter of s to have come back, so one slot is enough.
    """

    def __init__(
        self,
        round_id: int,
        credentials: dict[str, str],
        timeout: float,
        schedule: RoundSchedule | None = None,
    ) -> None:
        super().__init__(credentials, _CALLS_PER_MEMBER)
        self.id = round_id
        self._order = list(credentials)
        self._timeout = timeout
        self._schedule = schedule
        limit = schedule.shape.value_limit if schedule else float(np.finfo(np.float64).max)
        self._value_limit = limit
        self._cond = threading.Condition()
        self.failure: RoundAbort | None = None
        self._seq = 0
        self._point: tuple[str, str] | None = None  # (phase, layer) the first arrival claims
        self._parts: dict[str, Moments | GradSums] = {}
        self._claims: dict[str, tuple[str, str, int]] = {}  # (phase, layer, channels) per part
        self._batch: dict[str, int] = {}  # each client's batch size, from its first count
        self._tokens: dict[str, object] = {}  # which accepted request each part came with
        self._started = 0.0  # when the first part of exchange _seq arrived
        self._reply = b""  # encoded result of exchange _seq - 1
        self._forward_layers: set[str] = set()

    @property
    def size(self) -> int:
        return len(self._order)

    def reduce(
        self, client_id: str, req: ReduceRequest, watch: Callable[[Callable[[], None]], bool]
    ) -> bytes:
        """Contribute ``req`` (from the authenticated member ``client_id``), wait for the
        others, return the combined value."""
        with self._cond:
            if self.failure is not None:
                raise Refusal(grpc.StatusCode.ABORTED, self._aborted())
            if req.phase == "abort":
                reason = _reason(req.payload)
                self._fail(
                    grpc.StatusCode.ABORTED,
                    f"client {client_id!r} gave up: {reason}",
                    AbortKind.GAVE_UP,
                    client_id,
                )
            value = self._accept(client_id, req)
            seq, token = self._seq, object()
            self._parts[client_id], self._tokens[client_id] = value, token
            self._claims[client_id] = (req.phase, req.layer, len(_first_vector(value)))
            if len(self._parts) == len(self._order):
                self._complete()
                if self.failure is not None:
                    raise Refusal(grpc.StatusCode.ABORTED, self._aborted())
                return self._reply
            # A client that disconnects (or hits its deadline) while parked here can never
            # take its result: stop the round now rather than after the timeout.
            if not watch(lambda: self._cancelled(client_id, req, seq, token)):
                self._abort(
                    f"client {client_id!r} disconnected during {_where(*self._point, seq)}",
                    AbortKind.DISCONNECTED,
                    (client_id,),
                )
            deadline = self._started + self._timeout
            while self.failure is None and self._seq == seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [c for c in self._order if c not in self._parts]
                    self._abort(
                        f"client(s) {', '.join(map(repr, missing))} sent nothing for "
                        f"{_where(*self._point, seq)} within {self._timeout:g} s",
                        AbortKind.SILENT,
                        tuple(missing),
                    )
                    break
                self._cond.wait(remaining)
            if self.failure is not None:
                raise Refusal(grpc.StatusCode.ABORTED, self._aborted())
            return self._reply

    def close(self) -> None:
        with self._cond:
            if self.failure is None and self._parts:
                waiting = ", ".join(map(repr, self._parts))
                self._abort(
                    f"the server closed the round while client(s) {waiting} were waiting "
                    f"in {_where(*self._point, self._seq)}",
                    AbortKind.CLOSED,
                    tuple(c for c in self._order if c not in self._parts),  # never came
                )

    def abort(self, reason: str) -> None:
        with self._cond:
            # Worth a warning only if someone was waiting; an idle round just ends.
            level = logging.WARNING if self._parts else logging.INFO
            self._abort(reason, AbortKind.CLOSED, (), level)

    def _accept(self, client_id: str, req: ReduceRequest) -> Moments | GradSums:
        """Check what a contribution says on its own; any problem aborts the round, naming its
        sender. What it says against the others (layer, channels) is judged in ``_complete``."""
        who = f"round {self.id}, client {client_id!r}"
        bad, out_of_step = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
        if req.phase not in PHASES:
            self._blame(client_id, bad, f"{who}: unknown phase {req.phase!r}")
        pending = client_id in self._parts
        sent = _where(req.phase, req.layer, req.seq)
        if req.seq < self._seq or (pending and req.seq == self._seq):
            state = "already completed" if req.seq < self._seq else "is still pending"
            self._blame(
                client_id, out_of_step, f"{who}: duplicate contribution to {sent}, which {state}"
            )
        if req.seq != self._seq:
            self._blame(
                client_id, out_of_step, f"{who}: out of step: sent {sent} while at seq {self._seq}"
            )
        schedule = self._schedule
        if schedule is not None:
            expected = schedule.shape.point(req.seq)
            if (req.phase, req.layer) != expected:
                wanted = "nothing more" if expected is None else _where(*expected, req.seq)
                self._blame(
                    client_id, out_of_step, f"{who}: sent {sent}, the round expects {wanted}"
                )
        elif req.phase == BACKWARD and req.layer not in self._forward_layers:
            self._blame(
                client_id, out_of_step, f"{who}: unknown layer: {sent} without a forward sync"
            )
        try:
            value = decode(req.payload)
        except BNSyncError as error:
            self._blame(client_id, bad, f"{who}: undecodable payload in {sent}: {error}")
        wanted_type = PHASES[req.phase].payload
        if not isinstance(value, wanted_type):
            self._blame(
                client_id,
                bad,
                f"{who}: {sent} carries {type(value).__name__}, not {wanted_type.__name__}",
            )
        channels = len(_first_vector(value))
        if schedule is not None and channels != schedule.shape.layers[req.layer].channels:
            layer_channels = schedule.shape.layers[req.layer].channels
            self._blame(
                client_id,
                bad,
                f"{who}: {sent} has {channels} channels, the layer has {layer_channels}",
            )
        if channels == 0:
            self._blame(client_id, bad, f"{who}: {sent} has no channels")
        if problem := _out_of_bounds(value, self._value_limit):
            self._blame(client_id, bad, f"{who}: {sent}: {problem}")
        if isinstance(value, Moments):
            self._check_count(client_id, req.layer, value.count, who, sent)
        if not self._parts:
            self._point, self._started = (req.phase, req.layer), time.monotonic()
        return value

    def _check_count(self, client_id: str, layer: str, count: int, who: str, sent: str) -> None:
        """A count the round allows: positive, the client's batch (at most the round's batch
        size) times the layer's spatial size, the same batch at every layer; totals fit."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if count <= 0:
            self._blame(client_id, bad, f"{who}: {sent}: count must be positive, got {count}")
        if self._schedule is None:
            # Without a schedule, only that the round's total cannot overflow 64 bits.
            if count > _INT64_MAX // self.size:
                self._blame(client_id, bad, f"{who}: {sent}: count {count} is impossibly large")
            return
        per_sample = self._schedule.shape.layers[layer].values_per_sample
        batch, rest = divmod(count, per_sample)
        if rest or batch > self._schedule.max_batch:
            self._blame(
                client_id,
                bad,
                f"{who}: {sent}: count {count} is not a batch of at most "
                f"{self._schedule.max_batch} samples of {per_sample} values per channel",
            )
        if self._batch.setdefault(client_id, batch) != batch:
            self._blame(
                client_id,
                bad,
                f"{who}: {sent}: count {count} is a batch of {batch}, its earlier layers had "
                f"{self._batch[client_id]}",
            )

    def _complete(self) -> None:
        """Every part is in: judge them against each other, combine, check, publish."""
        claims = [self._claims[c] for c in self._order]
        if len(set(claims)) > 1:
            self._judge_disagreement()
            return
        phase, layer, _ = claims[0]
        parts = {c: self._parts[c] for c in self._order}  # fixed order: reproducible sums
        try:
            combined = PHASES[phase].combine(layer, parts)
            problem = _out_of_bounds(combined, self._value_limit)
            reply = encode(combined)
        except Exception as error:  # noqa: BLE001 - whatever it is, the round must stop now
            culprit = _largest_contributor(parts)
            self._abort(
                bounded(
                    f"round {self.id}: combining {_where(phase, layer, self._seq)} failed "
                    f"({type(error).__name__}: {error}); largest part from client {culprit!r}"
                ),
                AbortKind.BAD_CONTRIBUTION,
                (culprit,),
            )
            return
        if problem:
            culprit = _largest_contributor(parts)
            self._abort(
                f"round {self.id}: the combined {_where(phase, layer, self._seq)} {problem}; "
                f"the largest part came from client {culprit!r}",
                AbortKind.BAD_CONTRIBUTION,
                (culprit,),
            )
            return
        self._reply = reply
        if phase == FORWARD:
            self._forward_layers.add(layer)
        self._seq += 1
        self._point, self._parts, self._tokens, self._claims = None, {}, {}, {}
        self._cond.notify_all()

    def _judge_disagreement(self) -> None:
        """Parts that claim different exchanges: the majority's claim stands, the others are
        at fault; with no majority, nobody can be blamed fairly."""
        counts = Counter(self._claims.values())
        (claim, votes), *_ = counts.most_common(1)
        where = _where(*self._point, self._seq)
        if votes * 2 > self.size:
            culprits = tuple(c for c in self._order if self._claims[c] != claim)
            said = "; ".join(
                f"client {c!r} sent {self._claims[c][2]} channels of "
                f"{_where(*self._claims[c][:2], self._seq)}"
                for c in culprits
            )
            agreed = f"{claim[2]} channels of {_where(*claim[:2], self._seq)}"
            self._abort(
                bounded(f"round {self.id}: {said}; the majority sent {agreed}"),
                AbortKind.BAD_CONTRIBUTION,
                culprits,
            )
        else:
            self._abort(
                bounded(
                    f"round {self.id}: the clients disagree on {where} and no majority agrees: "
                    + "; ".join(f"{c!r}: {self._claims[c]}" for c in self._order)
                ),
                AbortKind.DISAGREEMENT,
                (),
            )

    def _cancelled(self, client_id: str, req: ReduceRequest, seq: int, token: object) -> None:
        # Called by gRPC when the call ends, normally or not; only a still-parked one counts.
        with self._cond:
            if self.failure is None and self._seq == seq and self._tokens.get(client_id) is token:
                self._abort(
                    f"client {client_id!r} disconnected or cancelled its request while "
                    f"waiting in {_where(req.phase, req.layer, seq)}",
                    AbortKind.DISCONNECTED,
                    (client_id,),
                )

    def _fail(
        self,
        code: grpc.StatusCode,
        message: str,
        kind: AbortKind = AbortKind.BAD_CONTRIBUTION,
        culprit: str | None = None,
    ) -> NoReturn:
        self._abort(message, kind, () if culprit is None else (culprit,))
        raise Refusal(code, message)

    def blame(self, client_id: str, message: str) -> NoReturn:
        """Refuse a member's unreadable request and abort the round, naming it."""
        with self._cond:
            if self.failure is not None:
                raise Refusal(grpc.StatusCode.ABORTED, self._aborted())
            self._blame(client_id, grpc.StatusCode.INVALID_ARGUMENT, message)

    def _blame(self, client_id: str, code: grpc.StatusCode, message: str) -> NoReturn:
        """Refuse a request and abort the round, with its sender at fault."""
        self._fail(code, bounded(message), AbortKind.BAD_CONTRIBUTION, client_id)

    def _abort(
        self,
        reason: str,
        kind: AbortKind,
        culprits: tuple[str, ...],
        level: int = logging.WARNING,
    ) -> None:
        if self.failure is None:
            reason = bounded(reason)
            self.failure = RoundAbort(kind, culprits, reason)
            log.log(level, "BN sync round %s aborted: %s", self.id, reason)
            self._cond.notify_all()

    def _aborted(self) -> str:
        return f"BN sync round {self.id} was aborted: {self.failure}"


class BNSyncService:
    """gRPC all-reduce service for the BN exchanges of FedTAN rounds; owned by the ServerApp.

    ``timeout``: how long an exchange may wait for its last client before the round is aborted.
    ``max_clients``: the most clients of all open rounds together; the thread pool has a few
    workers per client (each member may have ``_CALLS_PER_MEMBER`` calls in flight) plus spares
    for refusals, and calls beyond that are refused by gRPC before they take a worker.
    ``tls``: (certificate chain, private key) in PEM; clients then need the root certificate.
    ``client_ca``: PEM; with TLS, clients must also present a certificate this CA signed.
    ``limits``: what a peer may hold (connections, streams, idle time, message sizes).
    ``protocol``: what carries the calls: "grpc", or "socket" (framed messages on TCP, at about
    a tenth of gRPC Python's CPU per call: sockets.py); the service is the same either way.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: tuple[bytes, bytes] | None = None,
        client_ca: bytes | None = None,
        timeout: float = 60.0,
        max_clients: int = 64,
        limits: Limits | None = None,
        protocol: str = "grpc",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
        if timeout <= 0 or max_clients < 1:
            raise ValueError(f"need timeout > 0 and max_clients >= 1, got {timeout}, {max_clients}")
        if client_ca is not None and tls is None:
            raise ValueError("client certificates (client_ca) need TLS (tls)")
        bracket = ":" in host and not host.startswith("[")  # an IPv6 literal
        self._address = f"[{host}]:{port}" if bracket else f"{host}:{port}"
        self._host, self._bind_port, self.protocol = host.strip("[]"), port, protocol
        self._tls, self._client_ca = tls, client_ca
        self._timeout, self._max_clients = timeout, max_clients
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._rounds: dict[int, _Round] = {}
        self._closed: OrderedDict[int, RoundAbort | None] = OrderedDict()
        self._blocks: dict[int, Block] = {}
        self._server: grpc.Server | SocketServer | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        """The bound port once started, else None."""
        return self._port

    def start(self) -> int:
        """Bind and serve; returns the bound port (useful with ``port=0``)."""
        if self._server is not None:
            raise RuntimeError("BNSyncService already started")
        if self.protocol == "socket":
            return self._start_sockets()
        calls = _CALLS_PER_MEMBER + (BLOCK_CALLS_PER_MEMBER if self.limits.max_block_request else 0)
        workers = self._max_clients * calls + _SPARE_WORKERS
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="bn-sync")
        server = grpc.server(
            self._pool,
            interceptors=[_Gate(self)],
            options=self._channel_options(),
            maximum_concurrent_rpcs=workers,  # beyond: refused at once, no worker waits
        )
        # The gate answers every call itself; the registered method only routes it there fast.
        handler = grpc.unary_unary_rpc_method_handler(_unreachable)
        server.add_registered_method_handlers(SERVICE_NAME, {"Reduce": handler, "Block": handler})
        try:
            if self._tls is None:
                port = server.add_insecure_port(self._address)
            else:
                chain, key = self._tls
                creds = grpc.ssl_server_credentials(
                    [(key, chain)],
                    root_certificates=self._client_ca,
                    require_client_auth=self._client_ca is not None,
                )
                port = server.add_secure_port(self._address, creds)
        except RuntimeError as error:
            self._pool.shutdown(wait=False)
            raise RuntimeError(f"BN sync service cannot bind {self._address}: {error}") from None
        server.start()
        self._server, self._port = server, port
        log.info("BN sync service listening on port %d (%s)", port, self.security)
        return port

    def _start_sockets(self) -> int:
        try:
            server = SocketServer(
                self,
                self._host,
                self._bind_port,
                limits=self.limits,
                timeout=self._timeout,
                tls=self._tls,
                client_ca=self._client_ca,
            )
        except OSError as error:
            raise RuntimeError(f"BN sync service cannot bind {self._address}: {error}") from None
        server.start()
        self._server, self._port = server, server.port
        log.info("BN sync service listening on port %d (sockets, %s)", server.port, self.security)
        return server.port

    @property
    def security(self) -> str:
        """How the service talks to clients, in words."""
        if self._tls is None:
            return "plaintext"
        return "mutual TLS" if self._client_ca is not None else "TLS"

    def _channel_options(self) -> list[tuple[str, int]]:
        limits = self.limits
        return [
            ("grpc.so_reuseport", 0),  # else a second service could bind the port, steal clients
            ("grpc.max_receive_message_length", limits.largest_request),
            (
                "grpc.max_send_message_length",
                max(frame_size(limits.max_channels), limits.max_block_reply),
            ),
            ("grpc.max_metadata_size", 8 * 1024),
            ("grpc.max_concurrent_streams", limits.streams_per_connection),
            ("grpc.max_allowed_incoming_connections", limits.max_connections),
            ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
            ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout * 1000)),
            # The deadline on receiving a request: a member's call that never sends its body
            # holds a worker until its connection is closed, at most this age plus the grace.
            # The grace outlasts an honest call (the client's deadline is about 2 timeouts);
            # calls after the age go over a fresh connection, transparently.
            ("grpc.max_connection_age_ms", int(self._timeout * 1000)),
            ("grpc.max_connection_age_grace_ms", int((3 * self._timeout + 5) * 1000)),
            # Dead peers are found by pings; peers may not flood pings either.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 2),
        ]

    def stop(self, grace: float = 1.0) -> None:
        """Abort the open rounds (their waiting clients get the reason), then shut down."""
        with self._lock:
            rounds, self._rounds = list(self._rounds.values()), {}
            blocks, self._blocks = list(self._blocks.values()), {}
            for block in blocks:
                block.end("the BN sync service was stopped")
            for rnd in rounds:
                rnd.abort("the BN sync service was stopped")
                self._remember(rnd)
            server, pool, self._server, self._pool = self._server, self._pool, None, None
        if isinstance(server, SocketServer):
            server.stop(grace)
        elif server is not None:
            server.stop(grace).wait()
        if pool is not None:
            pool.shutdown(wait=True)  # handlers return promptly: their rounds are aborted

    def __enter__(self) -> BNSyncService:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def open_round(
        self,
        round_id: int,
        client_ids: Sequence[str],
        schedule: RoundSchedule | None = None,
    ) -> dict[str, str]:
        """Admit ``client_ids`` to round ``round_id``; returns a fresh credential per client.

        Results are combined in the order of ``client_ids``. ``schedule``: the exchanges and
        counts the round allows (without one, only what each part says on its own is checked,
        and a disagreement is judged by the majority).
        """
        ids = list(client_ids)
        if not ids or len(set(ids)) != len(ids) or not all(isinstance(c, str) and c for c in ids):
            raise ValueError(f"client_ids must be distinct non-empty strings, got {ids!r}")
        if schedule is not None:
            most = max(s.values_per_sample for s in schedule.shape.layers.values())
            if len(ids) * schedule.max_batch * most > _INT64_MAX:
                raise ValueError(f"round {round_id}: its counts could overflow 64 bits")
            if schedule.shape.max_channels > self.limits.max_channels:
                raise ValueError(
                    f"round {round_id}: a layer of {schedule.shape.max_channels} channels exceeds "
                    f"the service's max_channels={self.limits.max_channels}"
                )
        credentials = {c: secrets.token_urlsafe(32) for c in ids}
        with self._lock:
            if round_id in self._rounds:
                raise ValueError(f"round {round_id} is already open")
            busy = sum(r.size for r in self._rounds.values())
            if busy + len(ids) > self._max_clients:
                raise ValueError(
                    f"round {round_id}: {len(ids)} clients would exceed max_clients="
                    f"{self._max_clients} ({busy} in open rounds)"
                )
            self._closed.pop(round_id, None)
            self._rounds[round_id] = _Round(round_id, credentials, self._timeout, schedule)
        return credentials

    def close_round(self, round_id: int) -> RoundAbort | None:
        """Forget the round (clients still waiting are aborted); returns its failure, if any."""
        with self._lock:
            rnd = self._rounds.pop(round_id, None)
            if rnd is None:
                raise KeyError(f"round {round_id} is not open")
            rnd.close()
            self._remember(rnd)
        return rnd.failure

    def open_block(
        self, block_id: int, client_ids: Sequence[str], spec: StateSpec, max_examples: int
    ) -> tuple[Block, dict[str, str]]:
        """Admit ``client_ids`` to block ``block_id`` (block.py) for a model of ``spec``; returns
        the block and a fresh credential per client."""
        ids = list(client_ids)
        if not ids or len(set(ids)) != len(ids) or not all(isinstance(c, str) and c for c in ids):
            raise ValueError(f"client_ids must be distinct non-empty strings, got {ids!r}")
        if not self.limits.max_block_request:
            raise ValueError("this service was not started for blocks (Limits.max_block_request)")
        credentials = {c: secrets.token_urlsafe(32) for c in ids}
        poll = min(self._timeout / 2, _LONGEST_BLOCK_POLL)
        block = Block(block_id, credentials, spec, max_examples, poll)
        with self._lock:
            if block_id in self._blocks:
                raise ValueError(f"block {block_id} is already open")
            busy = sum(len(b.members) for b in self._blocks.values())
            if busy + len(ids) > self._max_clients:
                raise ValueError(
                    f"block {block_id}: {len(ids)} clients would exceed max_clients="
                    f"{self._max_clients} ({busy} in open blocks)"
                )
            self._blocks[block_id] = block
        return block, credentials

    def end_block(self, block_id: int, reason: str) -> None:
        """End the block: its members' calls are answered ``reason`` until ``forget_block``."""
        with self._lock:
            block = self._blocks.get(block_id)
        if block is not None:
            block.end(reason)

    def forget_block(self, block_id: int) -> None:
        """Refuse the block's calls from now on (it must have ended)."""
        with self._lock:
            block = self._blocks.pop(block_id, None)
        if block is not None:
            block.end("the block was closed")

    def admit(self, method: str, caller: Caller | None) -> Answer:
        """Admit a call from its method and caller alone, before anything of its request is
        read: the function that answers it; ``Refusal`` for an outsider or an unknown method."""
        if method == REDUCE_METHOD:
            rnd = self._member_of(self._rounds, "round", caller)
            return lambda read, watch: self._serve_round(rnd, caller.client_id, read, watch)
        if method == BLOCK_METHOD:
            block = self._member_of(self._blocks, "block", caller)
            return lambda read, watch: self._serve_block(block, caller.client_id, read)
        raise Refusal(grpc.StatusCode.UNIMPLEMENTED, f"no method {method!r} on the BN sync service")

    def _member_of(self, open_now: Mapping[int, M], what: str, caller: Caller | None) -> M:
        """The open round or block ``caller`` names, if its credential is right."""
        if caller is None:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"a BN sync call must name its {what}, client and credential in its metadata",
            )
        with self._lock:
            members = open_now.get(caller.round_id)
        if members is None:
            where = " on this BN sync service (unknown, closed, or the service was restarted)"
            raise Refusal(
                grpc.StatusCode.NOT_FOUND,
                f"client {caller.client_id!r}: {what} {caller.round_id} is not open"
                + (where if what == "round" else ""),
            )
        if not members.authenticate(caller.client_id, caller.credential):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"client {caller.client_id!r} is not admitted to {what} {caller.round_id}: "
                "unknown client or wrong credential",
            )
        return members

    def _serve_round(self, rnd: _Round, client_id: str, read: Read, watch: Watch) -> bytes:
        """An admitted member's call: read its one request, contribute, answer."""
        with rnd.call(client_id):
            body = _request(read)
            try:
                req = decode_request(body)
            except BNSyncError as error:
                rnd.blame(client_id, f"client {client_id!r}: malformed request: {error}")
            return rnd.reduce(client_id, req, watch)

    def _serve_block(self, block: Block, client_id: str, read: Read) -> bytes:
        """An admitted block member's call: read its one request, answer it."""
        with block.call(client_id):
            body = _request(read)
            try:
                request = decode_block_request(body)
            except BNSyncError as error:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"client {client_id!r}: malformed block request: {error}",
                ) from None
            return block.serve(client_id, request)

    def round_failure(self, round_id: int) -> RoundAbort | None:
        """Why the round was aborted, None if it was not; for open and recently closed rounds."""
        with self._lock:
            if round_id in self._rounds:
                return self._rounds[round_id].failure
            if round_id in self._closed:
                return self._closed[round_id]
        raise KeyError(f"round {round_id} is unknown")

    def _remember(self, rnd: _Round) -> None:
        self._closed[rnd.id] = rnd.failure
        while len(self._closed) > _CLOSED_ROUNDS_KEPT:
            self._closed.popitem(last=False)


class _Gate(grpc.ServerInterceptor):
    """Authenticates a call from its metadata, on gRPC's own thread, before anything is read.

    Refused calls get a handler that answers at once without reading the body, so a call that
    sends headers and never a body holds no worker; admitted calls read their body in the
    service's answer. Both are request-streaming handlers for that reason: a unary handler
    would wait for the body in a worker thread before any of our code runs.
    """

    def __init__(self, service: BNSyncService) -> None:
        self._service = service

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if details.method not in (REDUCE_METHOD, BLOCK_METHOD):
            return None  # gRPC answers UNIMPLEMENTED
        try:
            answer = self._service.admit(
                details.method, Caller.from_metadata(details.invocation_metadata)
            )
        except Refusal as refusal:
            return grpc.stream_unary_rpc_method_handler(_refuse(refusal))
        return grpc.stream_unary_rpc_method_handler(_grpc_call(answer))


def _grpc_call(answer: Answer) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
    def call(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        try:
            return answer(lambda: next(requests, None), context.add_callback)
        except Refusal as refusal:
            context.abort(refusal.code, refusal.message)

    return call


def _refuse(refusal: Refusal) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
    def answer(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        context.abort(refusal.code, refusal.message)

    return answer


def _unreachable(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.INTERNAL, "BN sync call not routed through the gate")


def _request(read: Read) -> bytes:
    """An admitted call's request; a call that carried none is refused."""
    body = read()
    if body is None:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
    return body


def _where(phase: str, layer: str, seq: int) -> str:
    return f"{phase} of layer {layer!r} (seq {seq})"


def _first_vector(value: Moments | GradSums) -> Tensor:
    return value.mean if isinstance(value, Moments) else value.sum_dy


def _out_of_bounds(value: Moments | GradSums, limit: float) -> str | None:
    """What makes ``value`` unusable for clients whose statistics dtype holds magnitudes up to
    ``limit``, or None: non-finite or larger values, a negative sum of squared deviations."""
    if isinstance(value, Moments):
        mean, m2 = value.mean.numpy(), value.m2.numpy()
        if not np.isfinite(mean).all() or not np.isfinite(m2).all():
            return "has non-finite mean or m2"
        if (m2 < 0).any():
            return "has a negative sum of squared deviations (m2)"
        count = max(value.count, 1)
        if np.abs(mean).max(initial=0.0) > limit or (m2 / count).max(initial=0.0) > limit:
            return f"has a mean or variance beyond {limit:.3g}, what the clients' dtype holds"
        return None
    sums = (value.sum_dy.numpy(), value.sum_dy_xhat.numpy())
    if not all(np.isfinite(v).all() for v in sums):
        return "has non-finite gradient sums"
    if max(np.abs(v).max(initial=0.0) for v in sums) > limit:
        return f"has gradient sums beyond {limit:.3g}, what the clients' dtype holds"
    return None


def _largest_contributor(parts: Mapping[str, Moments | GradSums]) -> str:
    """Whose part weighs most in a combination that failed its checks (each part passed its
    own): the largest spread about the others' mean, or the largest gradient sum."""

    def weight(value: Moments | GradSums) -> float:
        if isinstance(value, Moments):
            spread = value.m2.numpy() + value.count * value.mean.numpy() ** 2
            return float(np.nan_to_num(spread, nan=np.inf).max(initial=0.0))
        return float(
            max(np.abs(v.numpy()).max(initial=0.0) for v in (value.sum_dy, value.sum_dy_xhat))
        )

    return max(parts, key=lambda client: weight(parts[client]))


def _reason(payload: bytes) -> str:
    try:
        value = decode(payload)
    except BNSyncError as error:
        return f"(unreadable reason: {error})"
    return value.message if isinstance(value, ErrorReply) else "(no reason given)"


__all__ = [
    "AbortKind",
    "BNSyncService",
    "LayerShape",
    "Limits",
    "RoundAbort",
    "RoundSchedule",
    "SyncShape",
]
