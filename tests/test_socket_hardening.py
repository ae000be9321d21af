"""The BN sync service over framed sockets (``bn-sync-protocol = "socket"``) under attack, on
127.0.0.1: what an outsider can hold is bounded in count and time, a refused or malformed call
never reaches the service's rounds, and TLS is all or nothing.

The service's own checks (counts, values, blame) are the same whichever carrier brings a call:
``test_grpc_bn_sync.py`` runs every round test over both, ``test_grpc_hardening.py`` the attacks
on the numbers, and its TLS tests over both. Here: what only the socket carrier does. Every
socket a test opens is closed by the test, every service stopped by the ``services`` fixture.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import grpc
import pytest

from common.fedtan.bn_channel import BNSyncError
from common.transports.grpc.client import GrpcBNChannel
from common.transports.grpc.service import BNSyncService, Limits
from common.transports.grpc.sockets import CALL_HEAD, REPLY_HEAD, call_frame
from common.transports.grpc.wire import REDUCE_METHOD, Caller, ReduceRequest, encode, encode_request
from tests import test_grpc_bn_sync as plain
from tests.certs import make_certs
from tests.test_grpc_bn_sync import CLIENTS, FAST, moments, wait_until_waiting
from tests.test_grpc_hardening import ATTACKERS, attacked_round, honest_round

services, channels = plain.services, plain.channels


@pytest.fixture
def protocol() -> str:
    return "socket"


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Closes what a test registers (sockets), failure or not."""
    with ExitStack() as stack:
        yield stack


def dial(service: BNSyncService, closing: ExitStack) -> socket.socket:
    return closing.enter_context(socket.create_connection(("127.0.0.1", service.port), 5))


def reply_of(sock: socket.socket) -> tuple[grpc.StatusCode | None, str]:
    """The status and details of the one reply the service sends before it closes."""
    sock.settimeout(FAST)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    _, status, size = REPLY_HEAD.unpack_from(data)
    codes = {code.value[0]: code for code in grpc.StatusCode}
    return codes.get(status), data[REPLY_HEAD.size : REPLY_HEAD.size + size].decode()


def assert_closed_within(sock: socket.socket, seconds: float, what: str) -> None:
    """The service closes ``sock`` within ``seconds`` (without a reply)."""
    sock.settimeout(seconds)
    try:
        assert sock.recv(4096) == b"", f"the service answered a connection that {what}"
    except ConnectionResetError:
        pass  # closed, abruptly: as good
    except TimeoutError:
        pytest.fail(f"a connection that {what} stayed open for {seconds} s")


def a_call(round_id: int, client: str, credential: str) -> bytes:
    request = encode_request(ReduceRequest("forward", "bn1", 0, encode(moments(0))))
    return call_frame(REDUCE_METHOD, Caller(round_id, client, credential), request)


# --- outsiders ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "code"),
    [
        ((1, "", ""), grpc.StatusCode.UNAUTHENTICATED),  # names no client
        ((1, "c1", "not-the-credential"), grpc.StatusCode.UNAUTHENTICATED),
        ((1, "someone", "x"), grpc.StatusCode.UNAUTHENTICATED),
        ((5, "c1", "x"), grpc.StatusCode.NOT_FOUND),  # a round that is not open
    ],
    ids=["anonymous", "wrong-credential", "unknown-client", "unknown-round"],
)
def test_an_outsiders_call_is_refused_its_connection_closed_and_the_round_goes_on(
    services, channels, closing, caller, code
) -> None:
    service = services(limits=Limits(handshake_timeout=60.0))  # closed for the refusal alone
    credentials = service.open_round(1, CLIENTS)
    sock = dial(service, closing)
    sock.sendall(a_call(*caller))
    got, details = reply_of(sock)  # reads to the end: the connection is closed after the reply
    assert got == code, details
    assert service.round_failure(1) is None  # nobody's round was touched

    def member(k: int):
        client = CLIENTS[k]
        return lambda: plain.scripted_step(channels(service, 1, client, credentials[client]), k)

    _, errors, _ = plain.run_clients({c: member(k) for k, c in enumerate(CLIENTS)})
    assert not errors, errors
    assert service.close_round(1) is None


@pytest.mark.parametrize(
    "sends",
    ["nothing", "half a head", "a head and no names", "a TLS hello"],
)
def test_connections_that_never_complete_a_call_are_closed(
    services, channels, closing, sends
) -> None:
    """Idle, half-sent and foreign connections are closed within the handshake timeout (the
    call's own timeout once its head is in); the honest round beside them finishes."""
    limits = Limits(idle_timeout=0.5, handshake_timeout=0.5)
    service = services(timeout=2.0, limits=limits)
    head = CALL_HEAD.pack(b"BNS1", 1, 1, 2, 3, 100)
    payload = {
        "nothing": b"",
        "half a head": head[:7],
        "a head and no names": head,
        "a TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    }[sends]
    sockets = []
    for _ in range(ATTACKERS // 4):
        sock = dial(service, closing)
        sock.sendall(payload)
        sockets.append(sock)
    honest_round(service, channels, 1, CLIENTS)
    for sock in sockets:
        assert_closed_within(sock, 2.0 + FAST, f"sent {sends}")


def test_a_call_beyond_the_size_limits_is_refused_before_its_body_is_read(
    services, closing
) -> None:
    """The largest request follows the largest layer; a head that claims more is refused from
    the head alone, and the connection closed (its body is never read)."""
    service = services(limits=Limits(max_channels=4))
    credentials = service.open_round(1, ["c0"])
    sock = dial(service, closing)
    head = CALL_HEAD.pack(b"BNS1", 1, 1, 2, len(credentials["c0"]), 1 << 30)  # claims 1 GiB
    sock.sendall(head + b"c0" + credentials["c0"].encode())
    code, details = reply_of(sock)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "request 1073741824" in details
    assert service.round_failure(1) is None


def test_connections_beyond_the_cap_are_closed_at_once_and_the_timeouts_free_the_slots(
    services, channels, closing
) -> None:
    # "At once" is well within the handshake timeout, which would close them too.
    limits = Limits(max_connections=4, handshake_timeout=5.0, idle_timeout=5.0)
    service = services(limits=limits)
    held = [dial(service, closing) for _ in range(4)]
    time.sleep(0.2)  # the service has taken them all
    for _ in range(ATTACKERS):
        assert_closed_within(dial(service, closing), 1.0, "was beyond the cap")
    for sock in held:
        assert_closed_within(sock, 5.0 + FAST, "held a slot and sent nothing")
    honest_round(service, channels, 1, CLIENTS)


# --- members ------------------------------------------------------------------------------


def test_a_member_that_stalls_inside_its_call_is_named_and_left_out(
    services, channels, closing
) -> None:
    """A member that sends a call's head and names but never its body is silent: the round
    aborts after the timeout naming it, and the retry without it finishes."""
    service = services(timeout=1.0)

    def stall(service: BNSyncService, round_id: int, client: str, credential: str) -> None:
        sock = dial(service, closing)
        frame = a_call(round_id, client, credential)
        sock.sendall(frame[: CALL_HEAD.size + len(client) + len(credential)])
        assert_closed_within(sock, 1.0 + FAST, "stalled in its body")

    errors, _ = attacked_round(service, channels, stall)
    assert set(errors) == {"c0", "c2"}, errors
    for error in errors.values():
        assert "'c1' sent nothing" in str(error)


def test_a_member_that_hangs_up_while_waiting_aborts_the_round_at_once(
    services, closing
) -> None:
    service = services()
    credentials = service.open_round(1, CLIENTS)
    sock = dial(service, closing)
    sock.sendall(a_call(1, "c0", credentials["c0"]))
    wait_until_waiting(service, 1, 1)
    start = time.monotonic()
    sock.close()
    while service.round_failure(1) is None:
        assert time.monotonic() - start < FAST, "the hang-up was never noticed"
        time.sleep(0.01)
    assert "'c0' disconnected" in str(service.round_failure(1))


def test_stop_ends_every_connection_and_thread(services, channels, closing) -> None:
    """At once: not by waiting for the idle connections' timeouts."""
    service = services(limits=Limits(handshake_timeout=60.0, idle_timeout=60.0))
    credentials = service.open_round(1, CLIENTS)
    idle = [dial(service, closing) for _ in range(3)]
    waiting = channels(service, 1, "c0", credentials["c0"])
    result: dict[str, BaseException] = {}

    def wait() -> None:
        try:
            waiting.reduce_moments("bn1", moments(0))
        except BNSyncError as error:
            result["c0"] = error

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    wait_until_waiting(service, 1, 1)
    start = time.monotonic()
    service.stop()
    assert time.monotonic() - start < FAST
    thread.join(FAST)
    assert "stopped" in str(result["c0"])
    for sock in idle:
        assert_closed_within(sock, FAST, "was open when the service stopped")
    names = [t.name for t in threading.enumerate() if t.name.startswith("bn-sync")]
    assert not names, names


# --- TLS ----------------------------------------------------------------------------------


def test_a_tls_service_refuses_plaintext_and_untrusting_clients(services, channels, tmp_path):
    certs = make_certs(tmp_path / "real")
    service = services(tls=(certs.server_chain, certs.server_key))
    credentials = service.open_round(1, ["c0"])
    plaintext = channels(service, 1, "c0", credentials["c0"], timeout=5)
    with pytest.raises(BNSyncError, match="handshake|unreachable"):
        plaintext.reduce_moments("bn1", moments(0))
    untrusting = channels(
        service, 1, "c0", credentials["c0"], root_certificates=make_certs().ca_cert, timeout=5
    )
    with pytest.raises(BNSyncError, match="TLS handshake with the BN sync service .* failed"):
        untrusting.reduce_moments("bn1", moments(0))
    assert service.round_failure(1) is None


def test_a_reply_frame_is_what_the_client_expects_or_a_clear_error(services, closing) -> None:
    """Not a BN sync service at the address (here: a socket that answers garbage): the client
    says so instead of decoding the garbage."""
    listener = closing.enter_context(socket.create_server(("127.0.0.1", 0)))

    def answer_garbage() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(struct.pack("<4sBI", b"HTTP", 0, 0))

    threading.Thread(target=answer_garbage, daemon=True).start()
    channel = GrpcBNChannel(
        f"127.0.0.1:{listener.getsockname()[1]}",
        round_id=1,
        client_id="c0",
        credential="x",
        protocol="socket",
        timeout=5,
    )
    with channel, pytest.raises(BNSyncError, match="not a BN sync reply"):
        channel.reduce_moments("bn1", moments(0))
