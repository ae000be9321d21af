"""A client's connection to the BN sync service, whatever carries it.

The service's two methods (a BN exchange, a block call) are bytes in, bytes out, with the caller
named beside the bytes (``wire.Caller``). Two carriers, chosen by run config ``bn-sync-protocol``:

* ``grpc``: a gRPC call per request (``GrpcConnection``); the caller travels as call metadata.
* ``socket``: framed messages on one TCP connection, TLS optional (``sockets.SocketConnection``);
  about a tenth of gRPC Python's CPU per message, which matters where the clients and the
  service share a few cores, as in a Ray simulation (docs/benchmarks.md).

Either raises ``CallFailed`` with one of gRPC's status codes, so callers explain failures the
same way whichever carried the call.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from common.protocol import BN_SYNC_PROTOCOLS as PROTOCOLS
from common.transports.grpc.wire import Caller


class CallFailed(Exception):
    """A call was answered with an error status, or got no answer (``UNAVAILABLE``,
    ``DEADLINE_EXCEEDED``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Connection(Protocol):
    """One client's connection to the service; one call at a time."""

    def call(self, method: str, caller: Caller, request: bytes, timeout: float) -> bytes:
        """The service's answer to ``request``; ``CallFailed`` if there is none."""

    def close(self) -> None:
        """Release the connection (a later call fails)."""


class GrpcConnection:
    """A gRPC channel (one HTTP/2 connection) to the service."""

    def __init__(
        self,
        address: str,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
    ) -> None:
        # A connection of its own, as a client in a process of its own has: clients of one
        # process (tests, benchmarks) must not share the service's per-connection stream cap.
        options = [("grpc.use_local_subchannel_pool", 1)]
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address, options)
        else:
            chain, key = client_certificate or (None, None)
            creds = grpc.ssl_channel_credentials(
                root_certificates=root_certificates, private_key=key, certificate_chain=chain
            )
            self._channel = grpc.secure_channel(address, creds, options)
        self._methods: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    def call(self, method: str, caller: Caller, request: bytes, timeout: float) -> bytes:
        if (stub := self._methods.get(method)) is None:
            # Bytes in, bytes out; registered as generated stubs do (a faster call path).
            stub = self._methods[method] = self._channel.unary_unary(
                method, _registered_method=True
            )
        try:
            return stub(request, timeout=timeout, metadata=caller.metadata())
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call):
                raise CallFailed(error.code(), str(error.details())) from None
            raise CallFailed(grpc.StatusCode.UNKNOWN, str(error)) from None

    def close(self) -> None:
        self._channel.close()


def connect(
    protocol: str,
    address: str,
    root_certificates: bytes | None = None,
    client_certificate: tuple[bytes, bytes] | None = None,
) -> Connection:
    """A connection to the service at ``address`` over ``protocol`` (one of ``PROTOCOLS``)."""
    if client_certificate is not None and root_certificates is None:
        raise ValueError("a client certificate needs TLS (root_certificates)")
    if protocol == "grpc":
        return GrpcConnection(address, root_certificates, client_certificate)
    if protocol == "socket":
        from common.transports.grpc.sockets import SocketConnection

        return SocketConnection(address, root_certificates, client_certificate)
    raise ValueError(f"unknown BN sync protocol {protocol!r}, expected one of {list(PROTOCOLS)}")
