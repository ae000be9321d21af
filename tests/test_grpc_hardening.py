"""The BN sync service under attack, on 127.0.0.1: outsiders cannot stall a round, members
cannot poison one unnoticed, the right member is blamed and left out, TLS is all or nothing.

Each attack runs against the real service with honest clients beside it; each test asserts that
the honest clients finish their round (or that the round aborts at once naming the attacker, so
that the retry without it finishes), and the end-to-end tests that nothing non-finite is saved.
Every connection, stream and thread a test opens is bounded in count and closed by the test.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import grpc
import pytest
import torch

from common.experiment import task
from common.experiment.config import RunConfig
from common.fedtan.bn_channel import BNSyncError, GradSums, Moments
from common.protocol import (
    BN_SYNC_ADDRESS,
    BN_SYNC_CREDENTIAL,
    BN_SYNC_PROTOCOL,
    BN_SYNC_ROOT_CERTIFICATES,
    BN_SYNC_ROUND,
    BN_SYNC_TIMEOUT,
)
from common.transports.grpc.client import GrpcBNChannel
from common.transports.grpc.server import GrpcTransport
from common.transports.grpc.service import (
    AbortKind,
    BNSyncService,
    LayerShape,
    Limits,
    RoundSchedule,
    SyncShape,
)
from common.transports.grpc.wire import (
    REDUCE_METHOD,
    Caller,
    ReduceRequest,
    encode,
    encode_request,
)
from server.checkpoint import load_state_dict
from tests import test_grpc_bn_sync as plain
from tests.certs import make_certs, make_client_certs
from tests.float_noise import assert_within_rounding_noise
from tests.test_grpc_bn_sync import (
    CLIENTS,
    FAST,
    PATIENT,
    moments,
    run_clients,
    scripted_step,
    wait_until_waiting,
)

# The started services and client channels of the plain tests, stopped and closed the same way.
services, channels = plain.services, plain.channels


@pytest.fixture
def protocol() -> str:
    """gRPC unless a test names both: what the service checks in a call is the same whichever
    carrier brings it; the socket carrier's own attacks are in test_socket_hardening.py."""
    return "grpc"

LAYERS = ("bn1", "bn2")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# The two-layer step of ``scripted_step`` as the server would trace it: 4 channels, one value
# per sample (BatchNorm1d), statistics in float32.
SHAPE = SyncShape(
    LAYERS, LAYERS[::-1], {name: LayerShape(4, 1) for name in LAYERS}, value_limit=FLOAT32_MAX
)
SCHEDULE = RoundSchedule(SHAPE, max_batch=8)  # moments(k) claims k + 2 samples
ATTACKERS = 24  # header-only streams, idle connections: several times the service's workers


def honest_round(service: BNSyncService, channels, round_id: int, clients: list[str]) -> None:
    """``clients`` run the scripted step to the end; fails the test if any of them fails."""
    credentials = service.open_round(round_id, clients, SCHEDULE)

    def member(k: int) -> Callable[[], None]:
        client = clients[k]
        return lambda: scripted_step(channels(service, round_id, client, credentials[client]), k)

    _, errors, elapsed = run_clients({c: member(k) for k, c in enumerate(clients)})
    assert not errors, errors
    assert service.close_round(round_id) is None
    assert elapsed < FAST


def attacked_round(
    service: BNSyncService,
    channels,
    attack: Callable[[BNSyncService, int, str, str], None],
    attacker: str = "c1",
    schedule: RoundSchedule | None = SCHEDULE,
) -> tuple[dict[str, BaseException], float]:
    """Round 1 of CLIENTS, ``attacker`` running ``attack(service, round, id, credential)`` in
    place of its step; then the retry without it (round 2), which must finish."""
    credentials = service.open_round(1, CLIENTS, schedule)

    def member(k: int) -> Callable[[], None]:
        client = CLIENTS[k]
        if client == attacker:
            return lambda: attack(service, 1, client, credentials[client])
        return lambda: scripted_step(channels(service, 1, client, credentials[client]), k)

    _, errors, elapsed = run_clients({c: member(k) for k, c in enumerate(CLIENTS)})
    failure = service.close_round(1)
    assert failure is not None and failure.culprits == (attacker,), failure
    honest_round(service, channels, 2, [c for c in CLIENTS if c != attacker])
    return errors, elapsed


def sends(step: Callable[[GrpcBNChannel, int], None], k: int = 1):
    """An attack that opens the member's channel and runs ``step`` on it."""

    def attack(service: BNSyncService, round_id: int, client: str, credential: str) -> None:
        channel = GrpcBNChannel(
            f"127.0.0.1:{service.port}", round_id=round_id, client_id=client, credential=credential
        )
        with channel:
            step(channel, k)

    return attack


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Closes what a test registers (sockets, gRPC channels, events), failure or not."""
    with ExitStack() as stack:
        yield stack


def separate_channel(service: BNSyncService, closing: ExitStack) -> grpc.Channel:
    """A gRPC channel with a connection of its own (channels to one target share one)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return closing.enter_context(grpc.insecure_channel(f"127.0.0.1:{service.port}", options))


def header_only_calls(
    service: BNSyncService, closing: ExitStack, count: int, caller: Caller | None
) -> list[grpc.Future]:
    """``count`` calls that send their headers (as ``caller``) and never a body."""
    never = threading.Event()
    closing.callback(never.set)  # lets gRPC's request-consuming threads end

    def no_body() -> Iterator[bytes]:
        never.wait()
        return
        yield b""

    metadata = caller.metadata() if caller else None
    calls = []
    for _ in range(count):
        channel = separate_channel(service, closing)
        call = channel.stream_unary(REDUCE_METHOD).future(no_body(), metadata=metadata, timeout=30)
        closing.callback(call.cancel)
        calls.append(call)
    return calls


# --- outsiders ----------------------------------------------------------------------------


@pytest.mark.parametrize("credential", ["none", "wrong"])
def test_header_only_streams_of_outsiders_are_refused_at_once_and_stall_nothing(
    services, channels, closing, credential
) -> None:
    service = services(max_clients=len(CLIENTS) + 1)  # 4 x 2 + 4 workers
    caller = None if credential == "none" else Caller(9, "someone", "not-the-credential")
    service.open_round(9, ["someone"])  # an open round the outsiders could aim at
    start = time.monotonic()
    calls = header_only_calls(service, closing, ATTACKERS, caller)
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=FAST)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - start < FAST
    # More of them open while the honest clients run their round: it finishes regardless.
    header_only_calls(service, closing, ATTACKERS, caller)
    honest_round(service, channels, 1, CLIENTS)


def test_a_member_holding_header_only_streams_is_named_and_left_out(
    services, channels, closing
) -> None:
    """A member may hold two calls; more are refused. Its silence aborts the round after the
    timeout, naming it, and the retry without it finishes."""
    service = services(timeout=1.0, max_clients=2 * len(CLIENTS))

    def stall(service: BNSyncService, round_id: int, client: str, credential: str) -> None:
        calls = header_only_calls(service, closing, 3, Caller(round_id, client, credential))
        deadline = time.monotonic() + FAST
        while not any(call.done() for call in calls):  # whichever the service saw last
            assert time.monotonic() < deadline, "the third call was never refused"
            time.sleep(0.01)
        (refused,) = [call for call in calls if call.done()]
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_until_waiting(service, round_id, 2)
        held.extend(call for call in calls if call is not refused)

    held: list[grpc.Future] = []
    errors, _ = attacked_round(service, channels, stall)
    # The held calls end when their connection reaches its age and grace (1 + 3 x 1 + 5 s):
    # the workers they hold are freed without the attacker's consent.
    for call in held:
        with pytest.raises(grpc.RpcError):
            call.result(timeout=9 + FAST)
    assert set(errors) == {"c0", "c2"}, errors
    for error in errors.values():
        assert "'c1' sent nothing" in str(error)


@pytest.mark.parametrize("speaks", ["nothing", "http2 preface"])
def test_idle_connections_are_closed(services, channels, closing, speaks) -> None:
    """Connections that never finish a handshake, or never make a call, are closed; the
    honest round beside them finishes."""
    limits = Limits(idle_timeout=0.5, handshake_timeout=0.5)
    service = services(limits=limits, max_clients=len(CLIENTS))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    sockets = []
    for _ in range(ATTACKERS // 4):
        sock = closing.enter_context(socket.create_connection(("127.0.0.1", service.port), 5))
        if speaks != "nothing":
            sock.sendall(preface)
        sockets.append(sock)
    honest_round(service, channels, 1, CLIENTS)
    deadline = time.monotonic() + FAST
    for sock in sockets:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while sock.recv(4096):  # the server's SETTINGS and GOAWAY frames, then the end
                pass
        except ConnectionResetError:
            pass  # closed, abruptly: as good
        except TimeoutError:
            pytest.fail(f"a connection that {speaks} stayed open for {FAST} s")


def test_a_sender_of_an_oversized_message_is_refused_without_reading_it(services, channels) -> None:
    """Message sizes follow the largest layer: 10 MB of 'statistics' for a 4-channel layer
    never reach the service's code."""
    service = services(limits=Limits(max_channels=4))
    credentials = service.open_round(1, ["c0"], SCHEDULE)
    huge = Moments(2, torch.zeros(600_000, dtype=torch.float64), torch.ones(600_000))
    channel = channels(service, 1, "c0", credentials["c0"])
    with pytest.raises(BNSyncError, match="RESOURCE_EXHAUSTED"):
        channel.reduce_moments("bn1", huge)


# --- members: every number checked where it enters and where it leaves -----------------------


def claim(count: int, layer: str = "bn1") -> Callable[[GrpcBNChannel, int], None]:
    def step(channel: GrpcBNChannel, k: int) -> None:
        real = moments(k)
        channel.reduce_moments(layer, Moments(count, real.mean, real.m2))

    return step


@pytest.mark.parametrize("count", [2**62, 9, 0, -3], ids=["2^62", "batch+1", "zero", "negative"])
def test_a_count_the_round_does_not_allow_aborts_at_once_naming_the_sender(
    services, channels, count
) -> None:
    service = services(timeout=PATIENT)
    errors, elapsed = attacked_round(service, channels, sends(claim(count)))
    assert elapsed < FAST  # at once, not after the timeout
    assert set(errors) == set(CLIENTS)
    assert all("'c1'" in str(e) and "count" in str(e) for e in errors.values()), errors


def test_a_count_must_be_the_same_batch_at_every_layer(services, channels) -> None:
    def shrinks(channel: GrpcBNChannel, k: int) -> None:
        channel.reduce_moments("bn1", moments(k))  # k + 2 = 3 samples
        real = moments(k)
        channel.reduce_moments("bn2", Moments(real.count - 1, real.mean, real.m2))

    errors, _ = attacked_round(services(), channels, sends(shrinks))
    assert "count 2 is a batch of 2, its earlier layers had 3" in str(errors["c1"])


def test_counts_that_would_overflow_the_total_are_refused_without_a_schedule(
    services, channels
) -> None:
    """Two members claim 2^62 + 1 each: 2^63 + 2 does not fit 64 bits. The first claim is
    already refused, naming its sender; nobody waits for the timeout."""
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)
    liars = {"c1", "c2"}

    def member(k: int) -> Callable[[], None]:
        client = CLIENTS[k]
        channel = channels(service, 1, client, credentials[client])
        return lambda: (claim(2**62 + 1) if client in liars else scripted_step)(channel, k)

    _, errors, elapsed = run_clients({c: member(k) for k, c in enumerate(CLIENTS)})
    failure = service.close_round(1)
    assert set(errors) == set(CLIENTS) and elapsed < FAST
    assert len(failure.culprits) == 1 and set(failure.culprits) <= liars
    assert "impossibly large" in failure.message


def huge_mean(channel: GrpcBNChannel, k: int) -> None:
    real = moments(k)
    channel.reduce_moments(
        "bn1", Moments(real.count, torch.full((4,), 1e200, dtype=torch.float64), real.m2)
    )


def huge_grad_sums(channel: GrpcBNChannel, k: int) -> None:
    for layer in LAYERS:
        channel.reduce_moments(layer, moments(k))
    channel.reduce_grad_sums(
        "bn2", GradSums(torch.full((4,), 1e308, dtype=torch.float64), torch.ones(4))
    )


@pytest.mark.parametrize("attack", [huge_mean, huge_grad_sums], ids=["mean 1e200", "sums 1e308"])
def test_values_beyond_the_clients_dtype_are_refused_on_arrival(services, channels, attack):
    """With float32 statistics, 1e200 or 1e308 can only be an attack: refused, sender named."""
    service = services(timeout=PATIENT)
    errors, elapsed = attacked_round(service, channels, sends(attack))
    assert elapsed < FAST
    assert "beyond 3.4e+38" in str(errors["c1"])


def test_a_union_variance_that_overflows_is_refused_naming_its_largest_part(
    services, channels
) -> None:
    """In float64 (no schedule) a mean of 1e200 is finite, but the union's variance is not:
    the service checks what it is about to return."""
    errors, elapsed = attacked_round(
        services(timeout=PATIENT), channels, sends(huge_mean), schedule=None
    )
    assert set(errors) == set(CLIENTS) and elapsed < FAST
    assert all("combined forward of layer 'bn1'" in str(e) for e in errors.values()), errors


def test_gradient_sums_that_overflow_together_are_refused_naming_a_sender(
    services, channels
) -> None:
    """In float64 (no schedule) 1e308 is finite; two of them sum to inf."""
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)

    def member(k: int) -> Callable[[], None]:
        client = CLIENTS[k]
        channel = channels(service, 1, client, credentials[client])
        step = scripted_step if client == "c0" else huge_grad_sums
        return lambda: step(channel, k)

    _, errors, elapsed = run_clients({c: member(k) for k, c in enumerate(CLIENTS)})
    failure = service.close_round(1)
    assert set(errors) == set(CLIENTS) and elapsed < FAST
    assert failure.kind is AbortKind.BAD_CONTRIBUTION and failure.culprits in {("c1",), ("c2",)}
    assert "combined backward of layer 'bn2'" in failure.message


def test_a_client_refuses_a_result_its_dtype_cannot_hold(services, channels) -> None:
    """Without a schedule the service sums in float64: 3e38 + 3e38 is finite there, but not
    in the clients' float32, and they check what they are given."""

    def sums_once(value: float, round_id: int, client: str, credential: str) -> GradSums:
        channel = channels(service, round_id, client, credential)
        channel.reduce_moments("bn1", moments(0))
        local = torch.full((4,), value, dtype=torch.float32)
        return channel.reduce_grad_sums("bn1", GradSums(local, torch.ones(4)))

    service = services()
    for round_id, values in ((1, (1.0, 3e38)), (2, (3e38, 3e38))):  # fits float32, does not
        credentials = service.open_round(round_id, ["c0", "c1"])
        results, errors, _ = run_clients(
            {
                c: lambda c=c, v=v, r=round_id, cred=credentials[c]: sums_once(v, r, c, cred)
                for c, v in zip(("c0", "c1"), values, strict=True)
            }
        )
        service.close_round(round_id)
    assert not errors or round_id == 2
    assert set(errors) == {"c0", "c1"}
    assert all("not finite in torch.float32" in str(e) for e in errors.values()), errors


def test_any_exception_while_combining_aborts_at_once_naming_a_sender(
    services, channels, monkeypatch
) -> None:
    """Whatever breaks while the result is made (here the encoder, as a 64-bit overflow once
    did), the waiting clients are released at once with a reason, not left to the timeout."""
    import struct

    from common.transports.grpc import service as service_module

    def overflowing(value):
        raise struct.error("argument out of range")

    monkeypatch.setattr(service_module, "encode", overflowing)
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS, SCHEDULE)
    _, errors, elapsed = run_clients(
        {
            c: lambda c=c, k=k: scripted_step(channels(service, 1, c, credentials[c]), k)
            for k, c in enumerate(CLIENTS)
        }
    )
    failure = service.close_round(1)
    assert set(errors) == set(CLIENTS) and elapsed < FAST
    assert failure.kind is AbortKind.BAD_CONTRIBUTION and len(failure.culprits) == 1
    assert all("argument out of range" in str(e) for e in errors.values()), errors


# --- members: the culprit decided fairly -----------------------------------------------------


def wrong_layer_first(channel: GrpcBNChannel, k: int) -> None:
    channel.reduce_moments("bogus", moments(k))


def zero_channels_first(channel: GrpcBNChannel, k: int) -> None:
    channel.reduce_moments("bn1", Moments(3, torch.zeros(0), torch.zeros(0)))


@pytest.mark.parametrize("schedule", [SCHEDULE, None], ids=["schedule", "majority"])
@pytest.mark.parametrize("attack", [wrong_layer_first, zero_channels_first])
def test_a_bad_first_arrival_is_blamed_not_the_honest_second(
    services, channels, attack, schedule
) -> None:
    service = services(timeout=PATIENT)

    def first(service: BNSyncService, round_id: int, client: str, credential: str) -> None:
        sends(attack)(service, round_id, client, credential)

    credentials = service.open_round(1, CLIENTS, schedule)
    arrived = threading.Event()

    def member(k: int) -> Callable[[], None]:
        client = CLIENTS[k]
        channel = channels(service, 1, client, credentials[client])
        if client == "c2":
            return lambda: (attack(channel, k), arrived.set())
        return lambda: (arrived.wait(FAST), scripted_step(channel, k))

    # c2 goes first: when it is not refused on its own, it waits for the others' arrival.
    def c2_first() -> None:
        threading.Timer(0.2, arrived.set).start()
        member(2)()

    _, errors, elapsed = run_clients({"c0": member(0), "c1": member(1), "c2": c2_first})
    failure = service.close_round(1)
    assert failure.culprits == ("c2",), failure
    assert set(errors) == set(CLIENTS) and elapsed < FAST


def test_without_a_majority_nobody_is_blamed(services, channels) -> None:
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, ["c0", "c1"])
    _, errors, _ = run_clients(
        {
            c: (
                lambda c=c, layer=layer: channels(service, 1, c, credentials[c]).reduce_moments(
                    layer, moments(0)
                )
            )
            for c, layer in (("c0", "bn1"), ("c1", "bn2"))
        }
    )
    failure = service.close_round(1)
    assert set(errors) == {"c0", "c1"}
    assert failure.kind is AbortKind.DISAGREEMENT and failure.culprits == ()


def test_error_texts_are_bounded(services, channels) -> None:
    """A 60 kB reason reaches the others cut to size, not as gRPC's metadata-size error."""
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)

    def gives_up(service, round_id, client, credential) -> None:
        wait_until_waiting(service, round_id, 2)
        channel = channels(service, round_id, client, credential)
        channel.abort("x" * 60_000)

    _, errors, _ = run_clients(
        {
            "c0": lambda: scripted_step(channels(service, 1, "c0", credentials["c0"]), 0),
            "c1": lambda: gives_up(service, 1, "c1", credentials["c1"]),
            "c2": lambda: scripted_step(channels(service, 1, "c2", credentials["c2"]), 2),
        }
    )
    assert set(errors) == {"c0", "c2"}
    for error in errors.values():
        assert "'c1' gave up" in str(error) and "characters cut" in str(error)
        assert len(str(error)) < 5000
    with pytest.raises(BNSyncError, match="too long"):
        encode_request(ReduceRequest("forward", "x" * 60_000, 0, encode(moments(0))))


# --- TLS: all or nothing -----------------------------------------------------------------------


def grpc_config(tmp_path, **keys: object) -> RunConfig:
    return RunConfig(transport="grpc", output_dir=str(tmp_path / "out"), **keys)


def tls_keys(tmp_path) -> dict[str, str]:
    make_certs(tmp_path / "certs")
    return {
        "bn_sync_certfile": str(tmp_path / "certs" / "server.pem"),
        "bn_sync_keyfile": str(tmp_path / "certs" / "server.key"),
        "bn_sync_ca_certfile": str(tmp_path / "certs" / "ca.pem"),
    }


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"bn_sync_ca_certfile": ""}, "bn-sync-ca-certfile missing"),
        ({"bn_sync_certfile": "", "bn_sync_keyfile": ""}, "certfile, bn-sync-keyfile missing"),
        ({"bn_sync_keyfile": "/nonexistent/key.pem"}, "'bn-sync-keyfile': cannot read"),
        ({"bn_sync_ca_certfile": "/etc/hostname"}, "'bn-sync-ca-certfile'.* is not PEM"),
        ({"bn_sync_host": "0.0.0.0"}, "binds every interface: set 'bn-sync-address'"),
        ("plaintext", "no TLS: set 'bn-sync-certfile'"),
        ("client CA without TLS", "'bn-sync-client-ca-certfile' \\(mutual TLS\\) needs TLS"),
    ],
)
def test_tls_misconfigurations_stop_the_server_before_it_binds(tmp_path, keys, message) -> None:
    """Half a TLS setup never falls back to plaintext; plaintext beyond loopback needs
    ``bn-sync-insecure-network``; clients are never told to dial a wildcard address."""
    config = tls_keys(tmp_path)
    if keys == "plaintext":
        config = {"bn_sync_host": "0.0.0.0", "bn_sync_address": "server.example:9000"}
    elif keys == "client CA without TLS":
        config = {"bn_sync_client_ca_certfile": config["bn_sync_ca_certfile"]}
    else:
        config.update(keys)
    with pytest.raises(ValueError, match=message):
        GrpcTransport(grpc_config(tmp_path, **config), shape=SHAPE, max_clients=3, max_retries=0)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "trusted network"])
def test_a_public_bind_is_accepted_with_tls_or_an_explicitly_trusted_network(
    tmp_path, caplog, tls
) -> None:
    keys = tls_keys(tmp_path) if tls else {"bn_sync_insecure_network": True}
    cfg = grpc_config(tmp_path, bn_sync_host="0.0.0.0", bn_sync_address="server:1", **keys)
    with caplog.at_level("INFO"):
        transport = GrpcTransport(cfg, shape=SHAPE, max_clients=3, max_retries=0)
    try:
        assert transport.address == "server:1"
        assert transport.root_certificates.startswith("-----BEGIN CERTIFICATE") == tls
    finally:
        transport.close()
    security = "with TLS; clients dial server:1" if tls else "with plaintext; clients dial server:1"
    assert any(security in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_a_tls_client_of_a_plaintext_service_is_told_of_the_handshake(services, channels):
    service = services()
    credentials = service.open_round(1, ["c0"])
    root = make_certs().ca_cert
    channel = channels(service, 1, "c0", credentials["c0"], root_certificates=root, timeout=5)
    with pytest.raises(BNSyncError, match="TLS handshake with the BN sync service .* failed"):
        channel.reduce_moments("bn1", moments(0))


@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_mutual_tls_admits_only_clients_with_a_certificate_of_its_ca(
    services, channels, tmp_path, protocol
) -> None:
    server = make_certs(tmp_path / "server")
    clients = make_client_certs(names=["c0"])
    client_ca, good = clients.ca_cert, clients.chains["c0"]
    other = make_client_certs(names=["c0"]).chains["c0"]  # signed by another client CA
    service = services(tls=(server.server_chain, server.server_key), client_ca=client_ca)
    assert service.security == "mutual TLS"
    credentials = service.open_round(1, ["c0"])
    for certificate in (None, other):
        channel = channels(
            service,
            1,
            "c0",
            credentials["c0"],
            root_certificates=server.ca_cert,
            client_certificate=certificate,
            timeout=5,
        )
        with pytest.raises(BNSyncError, match="handshake|unreachable"):
            channel.reduce_moments("bn1", moments(0))
    # A SuperNode names its certificate in its node config; the train message names the rest,
    # the protocol included.
    (tmp_path / "client.pem").write_bytes(good[0])
    (tmp_path / "client.key").write_bytes(good[1])
    node_config = {
        "bn-sync-client-certfile": str(tmp_path / "client.pem"),
        "bn-sync-client-keyfile": str(tmp_path / "client.key"),
    }
    train_config = {
        BN_SYNC_ADDRESS: f"127.0.0.1:{service.port}",
        BN_SYNC_PROTOCOL: protocol,
        BN_SYNC_ROUND: 1,
        BN_SYNC_CREDENTIAL: credentials["c0"],
        BN_SYNC_ROOT_CERTIFICATES: server.ca_cert.decode(),
        BN_SYNC_TIMEOUT: 10.0,
    }
    with GrpcBNChannel.from_train_config(train_config, "c0", node_config) as channel:
        result = channel.reduce_moments("bn1", moments(0))
    assert result.count == moments(0).count
    assert service.close_round(1) is None


# --- over Flower: the culprit is left out, the model is the remaining clients' -------------------


def nan_mean(local: Moments, layer: str) -> tuple[Moments, str]:
    return Moments(local.count, local.mean.clone().fill_(math.nan), local.m2), layer


def huge_count(local: Moments, layer: str) -> tuple[Moments, str]:
    return Moments(2**62, local.mean, local.m2), layer


def wrong_layer(local: Moments, layer: str) -> tuple[Moments, str]:
    return local, "features.0"


@pytest.mark.parametrize("attack", [nan_mean, huge_count, wrong_layer])
def test_over_grpc_a_poisoning_member_is_left_out_and_the_model_is_the_others(
    tmp_path, monkeypatch, caplog, attack
) -> None:
    """Node 1001 poisons every synced step; each round is retried without it, the run completes,
    and the model is the in-process engine's over the other two clients, finite on disk."""
    from tests.test_flower_app import BASE, run

    real = GrpcBNChannel.reduce_moments

    def poisoned(self, layer, local):
        if self.client_id == "1001" and layer != "preflight":
            local, layer = attack(local, layer)
        return real(self, layer, local)

    monkeypatch.setattr(GrpcBNChannel, "reduce_moments", poisoned)
    overrides = {"transport": "grpc", "bn-sync-timeout": 10.0}
    result, _ = run(tmp_path, **overrides)
    retries = [r.getMessage() for r in caplog.records if "Retrying without" in r.getMessage()]
    assert retries == ["Retrying without nodes [1001]"]
    assert sorted(result.train_metrics_clientapp) == [1, 2]

    cfg = RunConfig.from_flower({**BASE, **overrides})
    start = task.build_global_model(cfg).state_dict()

    def reference(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model = task.build_global_model(cfg).to(dtype)
        for r in range(1, cfg.num_rounds + 1):
            batches = task.every_client_batches(cfg, 3, r)
            others = [[(x.to(dtype), y) for x, y in batches[k]] for k in (0, 2)]
            model.load_state_dict(task.engine_round(model, cfg, others, r))
        return model.state_dict()

    got = result.arrays.to_torch_state_dict()
    assert_within_rounding_noise(got, reference(torch.float32), reference(torch.float64), start)
    saved = load_state_dict(tmp_path / "out" / "model.pt")
    assert all(v.isfinite().all() for v in saved.values() if v.is_floating_point())
