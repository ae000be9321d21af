"""The server's end of the low-latency BN synchronization channel: a small gRPC service.

Why a service of its own: a FedTAN round needs 2L sequential all-reduces (38 for ResNet-20), and
one Flower message exchange costs about 0.1 s in simulation and 6 s in deployment (shared doc,
section 4). The ServerApp starts a ``BNSyncService``, opens a round for the clients it is about to
train, sends each client the address and its credential in the train message, and closes the
round when the replies are in. Each client's ``GrpcBNChannel`` meets the others' here.

One unary method, ``/fedtan.BNSync/Reduce``; bytes in and out (``wire.py``), no codegen.
A call blocks until every client of the round has contributed to the same exchange (sequence
number, phase, layer), then all get the same combined value, computed by ``combine_moments`` /
``combine_grad_sums`` over the clients in the order given to ``open_round``, so the numbers are
bit for bit those of the in-process engine.

Failures abort the whole round: nothing of an aborted round is returned as a result, waiting
clients are released at once with the reason, and later calls get it too. Refusals that do not
abort are those that cannot be blamed on a member of the round: a malformed request header, an
unknown or closed round, and an unknown client or wrong credential (so that an outsider can
neither stop a round nor learn its aggregates).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

import grpc
import numpy as np
from torch import Tensor

from common.fedtan.bn_channel import (
    BNSyncError,
    GradSums,
    Moments,
)
from common.protocol import BACKWARD, FORWARD, PHASES
from common.transports.grpc.wire import (
    SERVICE_NAME,
    ErrorReply,
    ReduceRequest,
    decode,
    decode_request,
    encode,
)

_SPARE_WORKERS = 4  # answer refusals while every member's request is parked waiting
_CLOSED_ROUNDS_KEPT = 1024

log = logging.getLogger(__name__)


class AbortKind(Enum):
    """Why a round was aborted."""

    SILENT = "silent"  # a member sent nothing for an exchange within the timeout
    DISCONNECTED = "disconnected"  # a member left while waiting for an exchange's result
    GAVE_UP = "gave-up"  # a member aborted the round itself (its step failed)
    BAD_CONTRIBUTION = "bad-contribution"  # undecodable, invalid or out-of-step data
    CLOSED = "closed"  # the server closed the round while members were still waiting
    INTERNAL = "internal"  # the combination failed although every part passed its checks


@dataclass(frozen=True)
class RoundAbort:
    """A round's failure: its kind, the members at fault (maybe none) and the account."""

    kind: AbortKind
    culprits: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return self.message


class _Refusal(Exception):
    """A request is answered with a gRPC error status instead of a value."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Round:
    """The exchanges of one round: a reusable all-reduce among a fixed set of clients.

    Exchange ``seq`` collects one contribution per client; the last one combines, stores the
    encoded result and advances ``seq``. The result of exchange s stays readable until s + 1
    completes, which needs every waiter of s to have come back, so one slot is enough.
    """

    def __init__(self, round_id: int, credentials: dict[str, str], timeout: float) -> None:
        self.id = round_id
        self._credentials = {c: cred.encode() for c, cred in credentials.items()}
        self._order = list(credentials)
        self._timeout = timeout
        self._cond = threading.Condition()
        self.failure: RoundAbort | None = None
        self._seq = 0
        self._point: tuple[str, str] | None = None  # (phase, layer) of exchange _seq
        self._parts: dict[str, Moments | GradSums] = {}
        self._tokens: dict[str, object] = {}  # which accepted request each part came with
        self._started = 0.0  # when the first part of exchange _seq arrived
        self._reply = b""  # encoded result of exchange _seq - 1
        self._forward_layers: set[str] = set()

    @property
    def size(self) -> int:
        return len(self._order)

    def authenticate(self, client_id: str, credential: str) -> bool:
        expected = self._credentials.get(client_id)
        given = credential.encode()
        # Compare even for unknown clients, so the time taken does not tell which ids exist.
        same = secrets.compare_digest(expected if expected is not None else b"", given)
        return expected is not None and same

    def reduce(self, req: ReduceRequest, watch: Callable[[Callable[[], None]], bool]) -> bytes:
        """Contribute ``req`` (from an authenticated member), wait for the others, return."""
        with self._cond:
            if self.failure is not None:
                raise _Refusal(grpc.StatusCode.ABORTED, self._aborted())
            if req.phase == "abort":
                reason = _reason(req.payload)
                self._fail(
                    grpc.StatusCode.ABORTED,
                    f"client {req.client_id!r} gave up: {reason}",
                    AbortKind.GAVE_UP,
                    req.client_id,
                )
            value = self._accept(req)
            seq, token = self._seq, object()
            self._parts[req.client_id], self._tokens[req.client_id] = value, token
            if len(self._parts) == len(self._order):
                self._complete()
                return self._reply
            # A client that disconnects (or hits its deadline) while parked here can never
            # take its result: stop the round now rather than after the timeout.
            if not watch(lambda: self._cancelled(req, seq, token)):
                self._abort(
                    f"client {req.client_id!r} disconnected during {_where(*self._point, seq)}",
                    AbortKind.DISCONNECTED,
                    (req.client_id,),
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
                raise _Refusal(grpc.StatusCode.ABORTED, self._aborted())
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

    def _accept(self, req: ReduceRequest) -> Moments | GradSums:
        """Check a contribution before it joins the exchange; any problem aborts the round."""
        who = f"round {self.id}, client {req.client_id!r}"
        bad, out_of_step = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
        if req.phase not in PHASES:
            self._blame(req, bad, f"{who}: unknown phase {req.phase!r}")
        pending = req.client_id in self._parts
        sent = _where(req.phase, req.layer, req.seq)
        if req.seq < self._seq or (pending and req.seq == self._seq):
            state = "already completed" if req.seq < self._seq else "is still pending"
            self._blame(req, out_of_step, f"{who}: duplicate contribution to {sent}, which {state}")
        if req.seq != self._seq or pending:
            self._blame(
                req, out_of_step, f"{who}: out of step: sent {sent} while at seq {self._seq}"
            )
        if self._point is not None and (req.phase, req.layer) != self._point:
            others = ", ".join(map(repr, self._parts))
            self._blame(
                req,
                out_of_step,
                f"{who}: out of step: sent {sent}, but client(s) {others} sent "
                f"{_where(*self._point, self._seq)}",
            )
        if req.phase == BACKWARD and req.layer not in self._forward_layers:
            self._blame(req, out_of_step, f"{who}: unknown layer: {sent} without a forward sync")
        try:
            value = decode(req.payload)
        except BNSyncError as error:
            self._blame(req, bad, f"{who}: undecodable payload in {sent}: {error}")
        expected = PHASES[req.phase].payload
        if not isinstance(value, expected):
            self._blame(
                req, bad, f"{who}: {sent} carries {type(value).__name__}, not {expected.__name__}"
            )
        if _suspicious(value):  # cheap numpy screen; the core's checks word the verdict
            try:
                PHASES[req.phase].check(req.client_id, req.layer, value)
            except BNSyncError as error:
                self._blame(req, bad, f"round {self.id}: {error}")
        if self._parts:
            channels = {len(_first_vector(p)) for p in self._parts.values()}
            if channels != {len(_first_vector(value))}:
                self._blame(
                    req,
                    bad,
                    f"{who}: {sent} has {len(_first_vector(value))} channels, the other "
                    f"clients' have {channels.pop()}",
                )
        else:
            self._point, self._started = (req.phase, req.layer), time.monotonic()
        return value

    def _complete(self) -> None:
        phase, layer = self._point
        parts = {c: self._parts[c] for c in self._order}  # fixed order: reproducible sums
        try:
            self._reply = encode(PHASES[phase].combine(layer, parts))
        except BNSyncError as error:  # pre-checked above, so not expected
            self._fail(grpc.StatusCode.INTERNAL, f"round {self.id}: {error}", AbortKind.INTERNAL)
        if phase == FORWARD:
            self._forward_layers.add(layer)
        self._seq += 1
        self._point, self._parts, self._tokens = None, {}, {}
        self._cond.notify_all()

    def _cancelled(self, req: ReduceRequest, seq: int, token: object) -> None:
        # Called by gRPC when the call ends, normally or not; only a still-parked one counts.
        with self._cond:
            if (
                self.failure is None
                and self._seq == seq
                and self._tokens.get(req.client_id) is token
            ):
                self._abort(
                    f"client {req.client_id!r} disconnected or cancelled its request while "
                    f"waiting in {_where(req.phase, req.layer, seq)}",
                    AbortKind.DISCONNECTED,
                    (req.client_id,),
                )

    def _fail(
        self,
        code: grpc.StatusCode,
        message: str,
        kind: AbortKind = AbortKind.BAD_CONTRIBUTION,
        culprit: str | None = None,
    ) -> NoReturn:
        self._abort(message, kind, () if culprit is None else (culprit,))
        raise _Refusal(code, message)

    def _blame(self, req: ReduceRequest, code: grpc.StatusCode, message: str) -> NoReturn:
        """Refuse ``req`` and abort the round, with its sender at fault."""
        self._fail(code, message, AbortKind.BAD_CONTRIBUTION, req.client_id)

    def _abort(
        self,
        reason: str,
        kind: AbortKind,
        culprits: tuple[str, ...],
        level: int = logging.WARNING,
    ) -> None:
        if self.failure is None:
            self.failure = RoundAbort(kind, culprits, reason)
            log.log(level, "BN sync round %s aborted: %s", self.id, reason)
            self._cond.notify_all()

    def _aborted(self) -> str:
        return f"BN sync round {self.id} was aborted: {self.failure}"


class BNSyncService:
    """gRPC all-reduce service for the BN exchanges of FedTAN rounds; owned by the ServerApp.

    ``timeout``: how long an exchange may wait for its last client before the round is aborted.
    ``max_clients``: the most clients of all open rounds together; the thread pool has one worker
    per client (each has at most one call parked at a time) plus a few spare ones.
    ``tls``: (certificate chain, private key) in PEM; clients then need the root certificate.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: tuple[bytes, bytes] | None = None,
        timeout: float = 60.0,
        max_clients: int = 64,
    ) -> None:
        if timeout <= 0 or max_clients < 1:
            raise ValueError(f"need timeout > 0 and max_clients >= 1, got {timeout}, {max_clients}")
        bracket = ":" in host and not host.startswith("[")  # an IPv6 literal
        self._address = f"[{host}]:{port}" if bracket else f"{host}:{port}"
        self._tls, self._timeout, self._max_clients = tls, timeout, max_clients
        self._lock = threading.Lock()
        self._rounds: dict[int, _Round] = {}
        self._closed: OrderedDict[int, RoundAbort | None] = OrderedDict()
        self._server: grpc.Server | None = None
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
        self._pool = futures.ThreadPoolExecutor(
            self._max_clients + _SPARE_WORKERS, thread_name_prefix="bn-sync"
        )
        # Without so_reuseport=0, a second service could bind the same port and steal clients.
        server = grpc.server(self._pool, options=[("grpc.so_reuseport", 0)])
        handler = grpc.unary_unary_rpc_method_handler(self._handle)  # bytes in, bytes out
        # Registered (not generic) handlers: as generated code does, a faster dispatch.
        server.add_registered_method_handlers(SERVICE_NAME, {"Reduce": handler})
        try:
            if self._tls is None:
                port = server.add_insecure_port(self._address)
            else:
                chain, key = self._tls
                creds = grpc.ssl_server_credentials([(key, chain)])
                port = server.add_secure_port(self._address, creds)
        except RuntimeError as error:
            self._pool.shutdown(wait=False)
            raise RuntimeError(f"BN sync service cannot bind {self._address}: {error}") from None
        server.start()
        self._server, self._port = server, port
        log.info("BN sync service listening on port %d (%s)", port, "TLS" if self._tls else "plain")
        return port

    def stop(self, grace: float = 1.0) -> None:
        """Abort the open rounds (their waiting clients get the reason), then shut down."""
        with self._lock:
            rounds, self._rounds = list(self._rounds.values()), {}
            for rnd in rounds:
                rnd.abort("the BN sync service was stopped")
                self._remember(rnd)
            server, pool, self._server, self._pool = self._server, self._pool, None, None
        if server is not None:
            server.stop(grace).wait()
        if pool is not None:
            pool.shutdown(wait=True)  # handlers return promptly: their rounds are aborted

    def __enter__(self) -> BNSyncService:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def open_round(self, round_id: int, client_ids: Sequence[str]) -> dict[str, str]:
        """Admit ``client_ids`` to round ``round_id``; returns a fresh credential per client.

        Results are combined in the order of ``client_ids``.
        """
        ids = list(client_ids)
        if not ids or len(set(ids)) != len(ids) or not all(isinstance(c, str) and c for c in ids):
            raise ValueError(f"client_ids must be distinct non-empty strings, got {ids!r}")
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
            self._rounds[round_id] = _Round(round_id, credentials, self._timeout)
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

    def _handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            try:
                req = decode_request(request)
            except BNSyncError as error:
                raise _Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}"
                ) from None
            with self._lock:
                rnd = self._rounds.get(req.round_id)
            if rnd is None:
                raise _Refusal(
                    grpc.StatusCode.NOT_FOUND,
                    f"client {req.client_id!r}: round {req.round_id} is not open on this BN sync "
                    "service (unknown, closed, or the service was restarted)",
                )
            if not rnd.authenticate(req.client_id, req.credential):
                raise _Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client {req.client_id!r} is not admitted to round {req.round_id}: "
                    "unknown client or wrong credential",
                )
            return rnd.reduce(req, context.add_callback)
        except _Refusal as refusal:
            context.abort(refusal.code, refusal.message)


def _where(phase: str, layer: str, seq: int) -> str:
    return f"{phase} of layer {layer!r} (seq {seq})"


def _first_vector(value: Moments | GradSums) -> Tensor:
    return value.mean if isinstance(value, Moments) else value.sum_dy


def _suspicious(value: Moments | GradSums) -> bool:
    """Whether ``check_moments`` / ``check_grad_sums`` might refuse ``value``.

    Those take ~50 us of torch calls per client; this takes a few, and it runs for every client
    of every exchange. ``combine_*`` runs the full checks again anyway, once all have arrived.
    """
    if isinstance(value, Moments):
        m2 = value.m2.numpy()
        vectors_ok = np.isfinite(value.mean.numpy()).all() and np.isfinite(m2).all()
        return value.count <= 0 or not vectors_ok or bool((m2 < 0).any())
    return not (
        np.isfinite(value.sum_dy.numpy()).all() and np.isfinite(value.sum_dy_xhat.numpy()).all()
    )


def _reason(payload: bytes) -> str:
    try:
        value = decode(payload)
    except BNSyncError as error:
        return f"(unreadable reason: {error})"
    return value.message if isinstance(value, ErrorReply) else "(no reason given)"


__all__ = ["AbortKind", "BNSyncService", "RoundAbort"]
