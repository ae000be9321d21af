"""The BN sync service's calls as framed messages on a TCP connection (``bn-sync-protocol =
"socket"``), TLS optional: the same service, rounds, blocks and checks as over gRPC, at about a
tenth of gRPC Python's CPU per message (``scripts/bench_grpc_floor.py``).

A call is one frame each way on a connection that carries one call at a time:

    CALL   magic "BNS1", method: uint8, id: int64, n_client: uint16, n_credential: uint16,
           n_body: uint32; then the client id, the credential (UTF-8) and the request body
    REPLY  magic "BNS1", status: uint8 (0, or a gRPC status code), n: uint32; then the answer,
           or the error's details (UTF-8)

The head names the caller before its body is read, as gRPC's metadata does: the service admits
a call from the head alone (``BNSyncService.admit``) and refuses bodies over the method's size
limit unread. What an outsider can hold is bounded like the gRPC service's (``Limits``): a
connection slot of ``max_connections``, for at most ``handshake_timeout`` until a call of it is
admitted (the TLS handshake included), then ``idle_timeout`` between calls; a call's body must
arrive within the service's timeout. A connection that is never admitted is closed after its
first refused call. A caller that hangs up while its call waits for the other clients is
noticed within ``_WATCH_INTERVAL`` and aborts the round, as a cancelled gRPC call does.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from common.transports.grpc.calls import CallFailed
from common.transports.grpc.members import Refusal
from common.transports.grpc.wire import (
    BLOCK_METHOD,
    MAX_NAME,
    REDUCE_METHOD,
    Caller,
    bounded,
)

if TYPE_CHECKING:
    from common.transports.grpc.service import BNSyncService, Limits

_MAGIC = b"BNS1"
CALL_HEAD = struct.Struct("<4sBqHHI")
REPLY_HEAD = struct.Struct("<4sBI")
METHODS = {1: REDUCE_METHOD, 2: BLOCK_METHOD}
_METHOD_CODES = {method: code for code, method in METHODS.items()}
MAX_CREDENTIAL = 256  # bytes; a credential is 43 (secrets.token_urlsafe(32))
_MAX_DETAILS = 4 * 4096  # bytes of an error's details (wire.MAX_MESSAGE characters of UTF-8)
_OK = 0
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_WATCH_INTERVAL = 0.1  # s between looks at the callers whose calls wait
_CONNECT_TIMEOUT = 10.0
_LINGER, _LINGER_READS = 0.5, 16  # s and reads of 64 KiB a closing connection drains at most

log = logging.getLogger(__name__)


class _Gone(OSError):
    """The peer closed the connection, or did not send in time."""


# --- both ends ---------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """``size`` bytes, all before ``deadline`` (time.monotonic); ``_Gone`` otherwise."""
    parts, left = [], size
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Gone(f"timed out with {left} of {size} bytes still to come")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(left, 1 << 20))
        except TimeoutError:
            raise _Gone(f"timed out with {left} of {size} bytes still to come") from None
        if not chunk:
            raise _Gone("the connection was closed (socket closed)")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has hung up, without reading anything (TLS records stay where they are:
    this peeks at the TCP stream under them)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    if not poller.poll(0):
        return False  # nothing to read: the peer is there (or silent), not gone
    try:  # the base class's recv: below TLS, and it does not wait (something is there)
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _with_pem_files(load: Callable[[str, str], None], chain: bytes, key: bytes) -> None:
    """``load(certfile, keyfile)`` with the PEM bytes in private files that are removed at once
    (``ssl`` reads certificate chains from files only)."""
    with tempfile.TemporaryDirectory(prefix="bn-sync-tls-") as folder:
        paths = [Path(folder, name) for name in ("chain.pem", "key.pem")]
        for path, data in zip(paths, (chain, key), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        load(str(paths[0]), str(paths[1]))


def call_frame(method: str, caller: Caller, request: bytes) -> bytes:
    """The CALL frame of ``request`` to ``method``, made by ``caller``."""
    client, credential = caller.client_id.encode(), caller.credential.encode()
    sizes = (len(client), len(credential), len(request))
    head = CALL_HEAD.pack(_MAGIC, _METHOD_CODES[method], caller.round_id, *sizes)
    return b"".join((head, client, credential, request))


def _failure(error: OSError, timeout: float, deadline: float, answered_before: bool) -> CallFailed:
    """What a call that broke off with ``error`` tells its caller."""
    if isinstance(error, TimeoutError) or time.monotonic() >= deadline:
        return CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s")
    if isinstance(error, ssl.SSLError):
        return CallFailed(grpc.StatusCode.UNAVAILABLE, f"TLS failed: {error}")
    if answered_before:  # not a handshake problem: the service answered on it before
        return CallFailed(
            grpc.StatusCode.UNAVAILABLE,
            f"the connection broke off mid-call ({type(error).__name__}: the service stopped?)",
        )
    return CallFailed(grpc.StatusCode.UNAVAILABLE, str(error))


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 literal]:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"BN sync address {address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


# --- the client's end ---------------------------------------------------------------------------


class SocketConnection:
    """One client's connection to the service; opened at the first call, reopened after a
    failed one (its reply would be out of step), one call at a time."""

    def __init__(
        self,
        address: str,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.address = address
        self._host, self._port = split_address(address)
        self._tls: ssl.SSLContext | None = None
        if root_certificates is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the host name too
            context.load_verify_locations(cadata=root_certificates.decode("ascii"))
            if client_certificate is not None:
                _with_pem_files(context.load_cert_chain, *client_certificate)
            self._tls = context
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._answered = False  # whether the service has answered on this socket yet

    def call(self, method: str, caller: Caller, request: bytes, timeout: float) -> bytes:
        frame = call_frame(method, caller, request)
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise CallFailed(grpc.StatusCode.CANCELLED, "the connection was closed")
            sock = self._open(deadline)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                sock.sendall(frame)
                magic, status, size = REPLY_HEAD.unpack(
                    _recv_exact(sock, REPLY_HEAD.size, deadline)
                )
                if magic != _MAGIC:
                    raise _Gone(f"not a BN sync reply (magic {magic!r})")
                body = _recv_exact(sock, size, deadline)
            except OSError as error:
                answered_before = self._answered
                self._drop()
                raise _failure(error, timeout, deadline, answered_before) from None
            self._answered = True
            if status != _OK:
                self._drop()  # the service may end the connection after a refusal
        if status == _OK:
            return body
        code = _STATUS.get(status, grpc.StatusCode.UNKNOWN)
        raise CallFailed(code, body.decode("utf-8", errors="replace"))

    def _open(self, deadline: float) -> socket.socket:
        if self._sock is not None and not _closed_by_peer(self._sock):
            return self._sock
        self._drop()  # the service closed an idle connection: a fresh one, nothing was sent
        timeout = max(min(deadline - time.monotonic(), _CONNECT_TIMEOUT), 1e-3)
        try:
            sock = socket.create_connection((self._host, self._port), timeout=timeout)
        except OSError as error:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, f"cannot connect: {error}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
            except OSError as error:
                sock.close()
                raise CallFailed(
                    grpc.StatusCode.UNAVAILABLE, f"TLS handshake failed: {error}"
                ) from None
        self._sock, self._answered = sock, False
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Close the connection; a call in flight ends at once (``UNAVAILABLE``)."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the call in flight, which holds the lock
        with self._lock:
            self._drop()


# --- the service's end --------------------------------------------------------------------------


class SocketServer:
    """The service's calls over framed sockets: a thread per connection, up to
    ``limits.max_connections``, each answering one call at a time through ``service.admit``."""

    def __init__(
        self,
        service: BNSyncService,
        host: str,
        port: int,
        *,
        limits: Limits,
        timeout: float,
        tls: tuple[bytes, bytes] | None = None,
        client_ca: bytes | None = None,
    ) -> None:
        self._service, self._limits, self._timeout = service, limits, timeout
        self._max_request = limits.largest_request
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            _with_pem_files(context.load_cert_chain, *tls)
            if client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cadata=client_ca.decode("ascii"))
            self._tls = context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        # Rebinding a port in TIME_WAIT (a restarted service); on Linux never a second listener.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port: int = listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._watcher = _Watcher(self._stopping)
        self._acceptor = threading.Thread(target=self._accept, name="bn-sync-accept", daemon=True)

    def start(self) -> None:
        self._watcher.start()
        self._acceptor.start()

    def stop(self, grace: float = 1.0) -> None:
        """Close the listener and every connection; wait for their threads. Calls in flight
        (released by the service, which aborts its rounds first) have ``grace`` seconds to send
        their answers."""
        self._stopping.set()
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join()
        with self._lock:
            connections = list(self._connections.items())
        for sock, _ in connections:  # no new calls; a reply still goes out
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for _, thread in connections:
            thread.join(max(deadline - time.monotonic(), 0))
        for sock, _ in connections:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in connections:
            thread.join()
        self._watcher.join()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stop
            with self._lock:
                full = len(self._connections) >= self._limits.max_connections
                if not full and not self._stopping.is_set():
                    thread = threading.Thread(
                        target=self._serve, args=(sock,), name="bn-sync-conn", daemon=True
                    )
                    self._connections[sock] = thread
            if full or self._stopping.is_set():
                sock.close()  # beyond the cap: refused before it costs a thread
                continue
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: this connection is refused, not all
                with self._lock:
                    self._connections.pop(sock, None)
                sock.close()

    def _serve(self, raw: socket.socket) -> None:
        sock = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                raw.settimeout(self._limits.handshake_timeout)
                sock = self._tls.wrap_socket(raw, server_side=True)
            admitted = False  # a connection is an outsider's until a call of it is admitted
            while not self._stopping.is_set():
                wait = self._limits.idle_timeout if admitted else self._limits.handshake_timeout
                head = _recv_head(sock, time.monotonic() + wait, self._limits.handshake_timeout)
                if head is None:
                    return  # closed between calls, or idle too long
                if self._call(sock, head, admitted):
                    admitted = True
                elif not admitted:
                    return  # an outsider's refused call ends its connection
        except (OSError, ValueError):
            return  # a broken, slow or foreign peer: its connection ends, nothing else
        finally:
            with self._lock:
                self._connections.pop(raw, None)
            _close_gently(sock)

    def _call(self, sock: socket.socket, head: bytes, known: bool) -> bool:
        """Answer one call; whether its caller was admitted. ``known``: a call of this
        connection was admitted before (else the connection ends if this one is refused)."""
        magic, method_code, round_id, n_client, n_credential, n_body = CALL_HEAD.unpack(head)
        deadline = time.monotonic() + self._timeout
        if magic != _MAGIC or method_code not in METHODS:
            raise _Gone(f"not a BN sync call: magic {magic!r}, method {method_code}")
        if n_client > MAX_NAME or n_credential > MAX_CREDENTIAL or n_body > self._max_request:
            _reply(
                sock,
                Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"call too large: client id {n_client} bytes (at most {MAX_NAME}), "
                    f"credential {n_credential} (at most {MAX_CREDENTIAL}), request {n_body} "
                    f"(at most {self._max_request})",
                ),
            )
            raise _Gone("a call beyond the size limits")  # its body is never read
        names = _recv_exact(sock, n_client + n_credential, deadline)
        try:
            client_id, credential = names[:n_client].decode(), names[n_client:].decode()
        except UnicodeDecodeError:
            client_id, credential = "", ""
        caller = Caller(round_id, client_id, credential) if client_id and round_id >= 0 else None
        body: bytes | None = None

        def read() -> bytes:
            nonlocal body
            body = _recv_exact(sock, n_body, deadline)
            return body

        try:
            answer = self._service.admit(METHODS[method_code], caller)
        except Refusal as refusal:
            if known:
                read()  # dropped, so that the connection's next call comes next
            _reply(sock, refusal)  # an outsider's body is left to _close_gently
            return False
        try:
            result: bytes | Refusal = answer(read, lambda gone: self._watcher.watch(sock, gone))
        except Refusal as refusal:
            result = refusal
        except OSError:
            raise
        except Exception as error:  # a bug of ours: the caller learns that much, the log more
            log.exception("BN sync call of client %r failed", client_id)
            result = Refusal(grpc.StatusCode.INTERNAL, f"the service failed: {error!r}")
        finally:
            self._watcher.forget(sock)
        if body is None:
            read()  # refused before it was read: dropped, so the next call's head comes next
        _reply(sock, result)
        return True


def _recv_head(sock: socket.socket, deadline: float, rest_within: float) -> bytes | None:
    """The next call's head; None if the peer closed the connection or sent nothing in time."""
    try:
        first = _recv_exact(sock, 1, deadline)
    except _Gone:
        return None
    return first + _recv_exact(sock, CALL_HEAD.size - 1, time.monotonic() + rest_within)


def _close_gently(sock: socket.socket) -> None:
    """Close after the last reply has gone out: what the peer still sends (a body the service
    refused unread, a TLS hello it could not take) is read for a moment and dropped, since
    closing with unread data resets the connection, and the peer would lose the reply."""
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER
        for _ in range(_LINGER_READS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            socket.socket.settimeout(sock, remaining)
            if not socket.socket.recv(sock, 1 << 16):
                break
    with suppress(OSError):
        sock.close()


def _reply(sock: socket.socket, result: bytes | Refusal) -> None:
    if isinstance(result, Refusal):
        details = bounded(result.message).encode("utf-8")[:_MAX_DETAILS]
        sock.sendall(REPLY_HEAD.pack(_MAGIC, result.code.value[0], len(details)) + details)
    else:
        sock.sendall(REPLY_HEAD.pack(_MAGIC, _OK, len(result)) + result)


class _Watcher:
    """Notices callers that hang up while their calls wait (gRPC's ``add_callback``): one
    thread looks at the waiting connections every ``_WATCH_INTERVAL``."""

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[socket.socket, Callable[[], None]]] = {}
        self._thread = threading.Thread(target=self._run, name="bn-sync-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def watch(self, sock: socket.socket, gone: Callable[[], None]) -> bool:
        if _closed_by_peer(sock):
            return False
        with self._lock:
            self._watched[sock.fileno()] = (sock, gone)
        return True

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._watched.pop(sock.fileno(), None)

    def _run(self) -> None:
        while not self._stopping.wait(_WATCH_INTERVAL):
            with self._lock:
                watched = dict(self._watched)
            if not watched:
                continue
            poller = select.poll()
            for fd in watched:
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            for fd, _ in poller.poll(0):
                sock, gone = watched[fd]
                with self._lock:
                    if self._watched.get(fd, (None,))[0] is not sock:
                        continue  # its call ended meanwhile
                    del self._watched[fd]  # data or a hang-up: either way, not watched again
                if _closed_by_peer(sock):
                    gone()
