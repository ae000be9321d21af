"""The client's end of the low-latency BN synchronization channel (see service.py).

A ``GrpcBNChannel`` lives for one round: the ServerApp's train message carries the service
address, the round id and this client's credential; the ClientApp opens the channel, runs its
synchronized step through it and closes it. One connection (``calls.py``: a gRPC channel, or a
framed socket with ``bn-sync-protocol = "socket"``) serves all 2L exchanges of the round. The
step is sequential, so there is one call in flight at a time, numbered by ``seq`` so that the
service can refuse duplicates and out-of-step calls.

    with GrpcBNChannel(address, round_id=r, client_id=c, credential=cred) as channel:
        train_client(model, batches, loss_fn, lr=lr, channel=channel)

Leaving the ``with`` block by an exception tells the service that this client gives up, so that
the other clients of the round are released at once instead of after the service's timeout.

With run config ``rounds-per-message`` > 1, a ``GrpcBlockChannel`` lives for a block of rounds
(block.py): ``run_block`` asks it for each round's plan, trains the rounds this client is
sampled for over a ``GrpcBNChannel`` on the block's connection, and uploads the results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import torch
from torch import Tensor

from common.fedtan.bn_channel import BNChannel, BNSyncError, GradSums, Moments
from common.protocol import (
    BACKWARD,
    BN_SYNC_ADDRESS,
    BN_SYNC_BLOCK,
    BN_SYNC_BLOCK_WAIT,
    BN_SYNC_CREDENTIAL,
    BN_SYNC_PROTOCOL,
    BN_SYNC_ROOT_CERTIFICATES,
    BN_SYNC_ROUND,
    BN_SYNC_TIMEOUT,
    FORWARD,
)
from common.transports.grpc.calls import CallFailed, Connection, connect
from common.transports.grpc.wire import (
    BLOCK_METHOD,
    REDUCE_METHOD,
    Caller,
    ErrorReply,
    Plan,
    ReduceRequest,
    bounded,
    decode,
    decode_plan,
    encode,
    encode_give_up,
    encode_next,
    encode_request,
    encode_state,
    encode_upload,
)

# Node config keys (the SuperNode's --node-config): this client's certificate for mutual TLS.
CLIENT_CERTFILE, CLIENT_KEYFILE = "bn-sync-client-certfile", "bn-sync-client-keyfile"
_ABORT_TIMEOUT = 2.0  # best effort: never hold up the client's own failure for long
# Words of gRPC's UNAVAILABLE details that mean the two ends do not speak the same security.
_HANDSHAKE_HINTS = ("ssl", "tls", "handshake", "certificate", "socket closed", "wrong version")
_PLAINTEXT_HINTS = ("socket closed", "connection reset", "handshake", "http2")


class GrpcBNChannel(BNChannel):
    """One client's BN channel for one round, over gRPC (TLS when ``root_certificates``).

    ``timeout`` bounds one exchange, waiting for the slowest client included (plus a few seconds
    of grace, so that a service with the same timeout reports who it waited for first). Every
    failure is raised as ``BNSyncError`` with the service's explanation. The combined statistics
    are checked too: finite in this client's dtype, and a union that contains this client.
    ``client_certificate``: (certificate chain, private key) in PEM, for a service that wants
    mutual TLS.
    """

    def __init__(
        self,
        address: str,
        *,
        round_id: int,
        client_id: str,
        credential: str,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        timeout: float = 60.0,
        protocol: str = "grpc",
        connection: Connection | None = None,
    ) -> None:
        if client_certificate is not None and root_certificates is None:
            raise ValueError("a client certificate needs TLS (root_certificates)")
        self.address, self.round_id, self.client_id = address, round_id, client_id
        self._caller = Caller(round_id, client_id, credential)
        self._tls = root_certificates is not None
        self._timeout = timeout
        # The gRPC deadline has some grace: with equal timeouts on both ends, the service, which
        # can name the client it waited for, must answer before this client gives up on its own.
        self._deadline = timeout + min(5.0, timeout / 2)
        self._seq = 0
        self._closed = False
        self._refused = False  # the service has answered with an error: it knows already
        # ``connection``: a block's (GrpcBlockChannel), which outlives this round's channel.
        self._owns_connection = connection is None
        self._connection = connection or connect(
            protocol, address, root_certificates, client_certificate
        )

    @classmethod
    def from_train_config(
        cls,
        config: Mapping[str, object],
        client_id: str,
        node_config: Mapping[str, object] | None = None,
    ) -> GrpcBNChannel:
        """The channel a train message of transport "grpc" tells ``client_id`` to open.

        ``node_config``: the SuperNode's; ``bn-sync-client-certfile`` and
        ``bn-sync-client-keyfile`` there are this client's certificate for mutual TLS.
        """
        root = str(config[BN_SYNC_ROOT_CERTIFICATES])
        return cls(
            str(config[BN_SYNC_ADDRESS]),
            round_id=int(config[BN_SYNC_ROUND]),
            client_id=client_id,
            credential=str(config[BN_SYNC_CREDENTIAL]),
            root_certificates=root.encode() if root else None,
            client_certificate=_client_certificate(node_config or {}),
            timeout=float(config[BN_SYNC_TIMEOUT]),
            protocol=str(config.get(BN_SYNC_PROTOCOL, "grpc")),
        )

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        return self._exchange(FORWARD, layer, local)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        return self._exchange(BACKWARD, layer, local)

    def abort(self, reason: str) -> None:
        """Tell the service that this client cannot go on; the round stops for everyone."""
        if self._closed or self._refused:
            return
        request = self._request("abort", "", ErrorReply(reason), seq=self._seq)
        try:
            self._connection.call(
                REDUCE_METHOD, self._caller, request, min(self._timeout, _ABORT_TIMEOUT)
            )
        except CallFailed:
            pass  # the expected answer is an error status: the round is now aborted

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owns_connection:
                self._connection.close()

    def __enter__(self) -> GrpcBNChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None and not self._refused:
                self.abort(f"{type(exc).__name__}: {exc}")
        finally:
            self.close()

    def _exchange(self, phase: str, layer: str, local: Moments | GradSums) -> Moments | GradSums:
        if self._closed:
            raise BNSyncError(f"client {self.client_id!r}: the BN channel is closed")
        request = self._request(phase, layer, local, seq=self._seq)
        self._seq += 1
        try:
            reply = self._connection.call(REDUCE_METHOD, self._caller, request, self._deadline)
        except CallFailed as error:
            self._refused = True
            raise BNSyncError(self._explain(error, phase, layer)) from None
        try:
            result = decode(reply)
        except BNSyncError as error:
            raise BNSyncError(f"client {self.client_id!r}: unreadable reply: {error}") from None
        mine = local.mean if isinstance(local, Moments) else local.sum_dy
        if type(result) is not type(local) or len(_first(result)) != len(mine):
            raise BNSyncError(
                f"client {self.client_id!r}: the BN sync service answered {phase} of layer "
                f"{layer!r} with {type(result).__name__} of the wrong kind or size"
            )
        if problem := _unusable(result, local, mine.dtype):
            raise BNSyncError(
                f"client {self.client_id!r}: the BN sync service's result for {phase} of layer "
                f"{layer!r} {problem}"
            )
        # Like the in-process combine: float64, on the device of the caller's tensors (CUDA).
        device = mine.device
        if isinstance(result, Moments):
            return Moments(result.count, result.mean.to(device), result.m2.to(device))
        return GradSums(result.sum_dy.to(device), result.sum_dy_xhat.to(device))

    def _request(self, phase: str, layer: str, value: object, *, seq: int) -> bytes:
        return encode_request(ReduceRequest(phase, layer, seq, encode(value)))

    def _explain(self, error: CallFailed, phase: str, layer: str) -> str:
        code, details = error.code, error.details
        where = f"client {self.client_id!r}, {phase} of layer {layer!r}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{where}: no answer from the BN sync service within {self._deadline:g} s"
        if code == grpc.StatusCode.UNAVAILABLE:
            handshake = _HANDSHAKE_HINTS if self._tls else _PLAINTEXT_HINTS
            if any(hint in str(details).lower() for hint in handshake):
                how = "TLS" if self._tls else "plaintext"
                return bounded(
                    f"{where}: the {how} handshake with the BN sync service at {self.address} "
                    f"failed (does the service use {'plaintext' if self._tls else 'TLS'}, or a "
                    f"certificate this client does not trust?): {details}"
                )
            return bounded(f"{where}: BN sync service at {self.address} unreachable: {details}")
        return bounded(f"{where}: BN sync service refused ({code.name}): {details}")


# --- blocks of rounds (run config rounds-per-message > 1; block.py) ---------------------------


@dataclass(frozen=True)
class RoundResult:
    """What a client uploads after a round of a block."""

    state: Mapping[str, Tensor]
    num_examples: int
    train_loss: float
    partition_id: int


TrainRound = Callable[[Plan, BNChannel], RoundResult]  # one round: the plan, its BN channel


def run_block(block: GrpcBlockChannel, train_round: TrainRound) -> int:
    """Take part in a block until it ends: every round's plan in turn; in the rounds this client
    is sampled for, ``train_round`` over the round's BN channel and the upload of its result.
    Returns the rounds trained. A round that fails here is reported to the service (which ends
    the round for the others at once) and raised."""
    seq, trained, answer = -1, 0, None
    while (plan := block.next_plan(after=seq, answer=answer)) is not None:
        seq, answer = plan.seq, None
        if plan.bn_round is None:
            continue  # not sampled: wait for the next round's model
        try:
            with block.bn_channel(plan) as channel:
                result = train_round(plan, channel)
            answer = block.upload(seq, result)
        except Exception as error:
            block.give_up(seq, f"{type(error).__name__}: {error}")
            raise
        trained += 1
    return trained


class GrpcBlockChannel:
    """One client's membership of a block of rounds on the BN sync service.

    One connection serves the block's calls and every round's BN exchanges. ``timeout``: one
    BN exchange or block call; ``wait``: how long the next round's plan may take to come (the
    server averages a round before it publishes the next, and at the end of a block collects
    its replies and starts the next one).
    """

    def __init__(
        self,
        address: str,
        *,
        block_id: int,
        client_id: str,
        credential: str,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        timeout: float = 60.0,
        wait: float = 600.0,
        protocol: str = "grpc",
    ) -> None:
        self.address, self.block_id, self.client_id = address, block_id, client_id
        self._root, self._timeout, self._wait = root_certificates, timeout, wait
        self._caller = Caller(block_id, client_id, credential)
        self._deadline = timeout + min(5.0, timeout / 2)
        self._connection = connect(protocol, address, root_certificates, client_certificate)
        self.end_reason = ""  # why the block ended, once it has

    @classmethod
    def from_block_config(
        cls,
        config: Mapping[str, object],
        client_id: str,
        node_config: Mapping[str, object] | None = None,
    ) -> GrpcBlockChannel:
        """The block a block train message tells ``client_id`` to join (see
        ``GrpcBNChannel.from_train_config`` for ``node_config``)."""
        root = str(config[BN_SYNC_ROOT_CERTIFICATES])
        return cls(
            str(config[BN_SYNC_ADDRESS]),
            block_id=int(config[BN_SYNC_BLOCK]),
            client_id=client_id,
            credential=str(config[BN_SYNC_CREDENTIAL]),
            root_certificates=root.encode() if root else None,
            client_certificate=_client_certificate(node_config or {}),
            timeout=float(config[BN_SYNC_TIMEOUT]),
            wait=float(config[BN_SYNC_BLOCK_WAIT]),
            protocol=str(config.get(BN_SYNC_PROTOCOL, "grpc")),
        )

    def next_plan(self, after: int, answer: bytes | None = None) -> Plan | None:
        """The plan of the round after round ``after`` of the block; None once it has ended.
        ``answer``: what the service answered to this member's upload of round ``after``."""
        deadline = time.monotonic() + self._wait
        while True:
            reply = self._request(encode_next(after), "plan") if answer is None else answer
            answer = None
            try:
                plan = decode_plan(reply)
            except BNSyncError as error:
                raise BNSyncError(f"client {self.client_id!r}: unreadable plan: {error}") from None
            if isinstance(plan, ErrorReply):
                self.end_reason = plan.message
                return None
            if plan is not None:
                return plan
            if time.monotonic() > deadline:
                raise BNSyncError(
                    f"client {self.client_id!r}: no plan for the round after {after} of block "
                    f"{self.block_id} within {self._wait:g} s"
                )

    def bn_channel(self, plan: Plan) -> GrpcBNChannel:
        """The BN channel of a round this client is sampled for, over the block's connection."""
        return GrpcBNChannel(
            self.address,
            round_id=int(plan.bn_round),
            client_id=self.client_id,
            credential=plan.credential,
            root_certificates=self._root,
            timeout=self._timeout,
            connection=self._connection,
        )

    def upload(self, seq: int, result: RoundResult) -> bytes:
        """Upload this member's result of round ``seq``; returns the service's answer, which
        comes once the next round is published (or the poll is over): for ``next_plan``."""
        state = encode_state(result.state)
        return self._request(
            encode_upload(seq, result.num_examples, result.train_loss, result.partition_id, state),
            f"upload of round {seq}",
        )

    def give_up(self, seq: int, reason: str) -> None:
        """Tell the service this client fails round ``seq`` (best effort)."""
        try:
            self._connection.call(
                BLOCK_METHOD,
                self._caller,
                encode_give_up(seq, reason),
                min(self._timeout, _ABORT_TIMEOUT),
            )
        except CallFailed:
            pass  # the service may know already (it refused this client's upload)

    def _request(self, request: bytes, what: str) -> bytes:
        try:
            return self._connection.call(BLOCK_METHOD, self._caller, request, self._deadline)
        except CallFailed as error:
            raise BNSyncError(
                bounded(
                    f"client {self.client_id!r}, block {self.block_id}, {what}: the BN sync "
                    f"service at {self.address} answered {error.code.name}: {error.details}"
                )
            ) from None

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> GrpcBlockChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _client_certificate(node_config: Mapping[str, object]) -> tuple[bytes, bytes] | None:
    """(certificate chain, key) from the node config's files, or None if it names none."""
    paths = {key: node_config.get(key) for key in (CLIENT_CERTFILE, CLIENT_KEYFILE)}
    if not any(paths.values()):
        return None
    if not all(paths.values()):
        raise BNSyncError(f"node config: {CLIENT_CERTFILE} and {CLIENT_KEYFILE} go together")
    try:
        return tuple(Path(str(path)).read_bytes() for path in paths.values())
    except OSError as error:
        raise BNSyncError(f"node config: cannot read {error.filename}: {error.strerror}") from None


def _first(value: object) -> Tensor:
    return value.mean if isinstance(value, Moments) else value.sum_dy


def _unusable(result: Moments | GradSums, local: Moments | GradSums, dtype: torch.dtype) -> str:
    """What makes a combined value unusable for this client, or "" (it is checked here again,
    not only on the service: a client trusts its own arithmetic, not the server's)."""
    if isinstance(result, Moments):
        if result.count < local.count:
            return f"has count {result.count}, less than this client's own {local.count}"
        if not bool((result.m2 >= 0).all()):
            return "has a negative or NaN sum of squared deviations"
        vectors = (result.mean, result.m2 / result.count)
    else:
        vectors = (result.sum_dy, result.sum_dy_xhat)
    if not all(bool(v.to(dtype).isfinite().all()) for v in vectors):
        return f"has values that are not finite in {dtype}"
    return ""


__all__ = ["GrpcBNChannel", "GrpcBlockChannel", "RoundResult", "TrainRound", "run_block"]
