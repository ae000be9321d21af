"""Who may call a service round or a block, and how many of their calls may run at once."""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import grpc

from common.transports.grpc.wire import bounded


class Refusal(Exception):
    """A call is answered with an error status instead of a value (gRPC's status codes, which
    the socket protocol carries too)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = bounded(message)
        super().__init__(message)
        self.code, self.message = code, message


class Members:
    """The members of a service round or a block: one credential each, and a few call slots."""

    def __init__(self, credentials: Mapping[str, str], calls_per_member: int) -> None:
        self._credentials = {c: cred.encode() for c, cred in credentials.items()}
        self._calls_per_member = calls_per_member
        self._slots = threading.Lock()
        self._calls: Counter[str] = Counter()  # calls in flight per member

    @property
    def members(self) -> list[str]:
        return list(self._credentials)

    def authenticate(self, client_id: str, credential: str) -> bool:
        expected = self._credentials.get(client_id)
        given = credential.encode()
        # Compare even for unknown clients, so the time taken does not tell which ids exist.
        same = secrets.compare_digest(expected if expected is not None else b"", given)
        return expected is not None and same

    @contextmanager
    def call(self, client_id: str) -> Iterator[None]:
        """Hold one of a member's few call slots while its call runs (more are refused)."""
        with self._slots:
            if self._calls[client_id] >= self._calls_per_member:
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"client {client_id!r} has {self._calls_per_member} calls in flight already",
                )
            self._calls[client_id] += 1
        try:
            yield
        finally:
            with self._slots:
                self._calls[client_id] -= 1
