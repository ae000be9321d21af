"""The BN sync service: the in-process engine's numbers, and loud, quick failures.

Every test runs over both carriers of the service's calls (``protocol``: gRPC, and framed
messages on a socket): they must behave the same. Every service listens on 127.0.0.1 only and
is stopped by the ``services`` fixture; every client thread is joined with a deadline, so a hang
fails the test instead of stalling the run.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from torch import nn

from common.fedtan import synced_round, train_client
from common.fedtan.aggregation import average_states
from common.fedtan.bn_channel import BNChannel, BNSyncError, GradSums, Moments, combine_moments
from common.fedtan.bn_sync import convert_federated_batchnorm
from common.transports.grpc.calls import CallFailed, connect
from common.transports.grpc.client import GrpcBNChannel
from common.transports.grpc.service import AbortKind, BNSyncService
from common.transports.grpc.wire import (
    REDUCE_METHOD,
    Caller,
    ErrorReply,
    ReduceRequest,
    decode,
    decode_request,
    encode,
    encode_request,
)
from tests.certs import make_certs

CLIENTS = ["c0", "c1", "c2"]
LR = 0.1
JOIN_TIMEOUT = 30.0
PATIENT = 20.0  # service timeout where an abort must reach everyone long before it
FAST = 8.0  # ... and the bound on how long that may take, generous for loaded CI machines


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(params=["grpc", "socket"])
def protocol(request: pytest.FixtureRequest) -> str:
    """What carries the calls."""
    return request.param


@pytest.fixture
def services(protocol: str) -> Iterator[Callable[..., BNSyncService]]:
    """Factory of started services; all are stopped at the end of the test."""
    started: list[BNSyncService] = []

    def make(timeout: float = PATIENT, **kwargs) -> BNSyncService:
        port = kwargs.pop("port", 0)
        service = BNSyncService("127.0.0.1", port, timeout=timeout, protocol=protocol, **kwargs)
        started.append(service)
        service.start()
        return service

    yield make
    for service in started:
        service.stop(grace=0.1)


@pytest.fixture
def channels(protocol: str) -> Iterator[Callable[..., GrpcBNChannel]]:
    """Factory of client channels; all are closed at the end of the test."""
    made: list[GrpcBNChannel] = []

    def make(service: BNSyncService, round_id: int, client_id: str, credential: str, **kw):
        channel = GrpcBNChannel(
            f"127.0.0.1:{service.port}",
            round_id=round_id,
            client_id=client_id,
            credential=credential,
            protocol=protocol,
            **kw,
        )
        made.append(channel)
        return channel

    yield make
    for channel in made:
        channel.close()


def run_clients(jobs: dict[str, Callable[[], object]]) -> tuple[dict, dict, float]:
    """Run each job in its own thread; returns (results, errors, seconds until all ended)."""
    results: dict[str, object] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str, job: Callable[[], object]) -> None:
        try:
            results[name] = job()
        except BaseException as error:  # noqa: BLE001 - inspected by the test
            errors[name] = error

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in jobs.items()]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a client thread hangs"
    return results, errors, time.monotonic() - start


def wait_until_waiting(service: BNSyncService, round_id: int, count: int) -> None:
    """Block until ``count`` clients are parked in the current exchange of the round.

    White-box (reads the service's private state), only to order events in a test.
    """
    deadline = time.monotonic() + 5.0
    while len(service._rounds[round_id]._parts) < count:
        assert time.monotonic() < deadline, f"{count} clients never arrived"
        time.sleep(0.002)


def moments(k: int, channels: int = 4) -> Moments:
    return Moments(k + 2, torch.arange(channels, dtype=torch.float64) + k, torch.ones(channels))


def grads(k: int, channels: int = 4) -> GradSums:
    return GradSums(torch.full((channels,), 0.1 * k), torch.ones(channels))


def scripted_step(channel: BNChannel, k: int, layers: tuple[str, ...] = ("bn1", "bn2")) -> None:
    """The exchanges of one synced step of a two-BN network, with made-up statistics."""
    for layer in layers:
        channel.reduce_moments(layer, moments(k))
    for layer in reversed(layers):
        channel.reduce_grad_sums(layer, grads(k))


def raw_call(
    service: BNSyncService, request: bytes, caller: Caller | None = None
) -> tuple[grpc.StatusCode, str]:
    """Send bytes as they are, as ``caller``; returns the error status (these requests must all
    be refused)."""
    connection = connect(service.protocol, f"127.0.0.1:{service.port}")
    try:
        with pytest.raises(CallFailed) as info:
            if caller is None and service.protocol == "grpc":  # no metadata at all
                with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                    try:
                        channel.unary_unary(REDUCE_METHOD)(request, timeout=5.0)
                    except grpc.RpcError as error:
                        raise CallFailed(error.code(), error.details()) from None
            connection.call(REDUCE_METHOD, caller or Caller(0, "", ""), request, 5.0)
    finally:
        connection.close()
    return info.value.code, info.value.details


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).double()


def client_batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Unequal batch sizes; two steps (the synced one, then a local one); shifted per client,
    so that local and union statistics differ (non-IID)."""
    g = torch.Generator().manual_seed(1)
    sizes = [(5, 4), (3, 6), (7, 2)]
    return [
        [
            (
                torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64) * (1 + k) + 2 * k,
                torch.randint(0, 3, (b,), generator=g),
            )
            for b in steps
        ]
        for k, steps in enumerate(sizes)
    ]


def grpc_round(
    service: BNSyncService,
    round_id: int,
    channel_factory: Callable[..., GrpcBNChannel],
    root_certificates: bytes | None = None,
) -> dict[str, torch.Tensor]:
    """``synced_round`` over the gRPC service instead of the in-process hub."""
    model, batches = small_model(), client_batches()
    credentials = service.open_round(round_id, CLIENTS)
    clients = [convert_federated_batchnorm(copy.deepcopy(model)) for _ in CLIENTS]

    def job(k: int) -> Callable[[], object]:
        def train() -> list[float]:
            cid = CLIENTS[k]
            ch = channel_factory(
                service, round_id, cid, credentials[cid], root_certificates=root_certificates
            )
            with ch:
                return train_client(
                    clients[k], batches[k], nn.CrossEntropyLoss(), lr=LR, channel=ch
                )

        return train

    _, errors, _ = run_clients({c: job(k) for k, c in enumerate(CLIENTS)})
    assert not errors, errors
    assert service.close_round(round_id) is None
    weights = [sum(len(t) for _, t in b) for b in batches]
    return average_states([c.state_dict() for c in clients], weights)


def assert_states_close(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-12, rtol=0, msg=key)


# --- the wire format --------------------------------------------------------------------------


def test_wire_round_trips_exactly() -> None:
    m = Moments(7, torch.randn(5, dtype=torch.float32), torch.rand(5, dtype=torch.float32))
    back = decode(encode(m))
    assert back.count == 7 and back.mean.dtype == torch.float64
    assert torch.equal(back.mean, m.mean.double()) and torch.equal(back.m2, m.m2.double())
    s = GradSums(torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    back = decode(encode(s))
    assert torch.equal(back.sum_dy, s.sum_dy) and torch.equal(back.sum_dy_xhat, s.sum_dy_xhat)
    assert decode(encode(ErrorReply("client 'c1' gave up: é"))) == ErrorReply(
        "client 'c1' gave up: é"
    )
    req = ReduceRequest("forward", "layer1.0.bn1", 12, encode(m))
    assert decode_request(encode_request(req)) == req
    caller = Caller(3, "c1", "secret")
    assert Caller.from_metadata(caller.metadata()) == caller


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: b[:3], "truncated"),
        (lambda b: b"XXXX" + b[4:], "not a BN frame"),
        (lambda b: b[:4] + b"\x09" + b[5:], "unknown BN frame kind"),
        (lambda b: b[:13] + b"\xff\xff\xff\x7f" + b[17:], "claims"),  # huge channel count
    ],
)
def test_wire_rejects_malformed_frames(mangle: Callable[[bytes], bytes], message: str) -> None:
    data = encode(moments(0))
    with pytest.raises(BNSyncError, match=message):
        decode(mangle(data))


def test_wire_rejects_malformed_requests() -> None:
    request = encode_request(ReduceRequest("forward", "bn", 0, b""))
    for bad in (request[:10], request[:-2], b"BNQ1" + request[4:]):
        with pytest.raises(BNSyncError):
            decode_request(bad)


# --- equality with the in-process engine ------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_grpc_round_equals_in_process_round(services, channels, tmp_path, tls: bool) -> None:
    certs = make_certs(tmp_path) if tls else None
    service = services(tls=(certs.server_chain, certs.server_key) if tls else None)
    got = grpc_round(service, 1, channels, root_certificates=certs.ca_cert if tls else None)

    expected = synced_round(small_model(), client_batches(), nn.CrossEntropyLoss(), lr=LR)
    assert_states_close(got, expected)

    # Not vacuous: without synchronization (plain local BN) the round ends elsewhere.
    local = []
    for batches in client_batches():
        model = small_model()
        train_client(model, batches, nn.CrossEntropyLoss(), lr=LR)
        local.append(model.state_dict())
    fedavg = average_states(local, [sum(len(t) for _, t in b) for b in client_batches()])
    assert (fedavg["0.weight"] - expected["0.weight"]).abs().max() > 1e-6


def test_tls_service_refuses_untrusted_and_plaintext_clients(services, channels, tmp_path):
    certs = make_certs(tmp_path / "real")
    service = services(tls=(certs.server_chain, certs.server_key))
    credentials = service.open_round(1, ["c0"])
    other_ca = make_certs(tmp_path / "other").ca_cert
    for root in (other_ca, None):
        channel = channels(service, 1, "c0", credentials["c0"], root_certificates=root, timeout=5)
        with pytest.raises(BNSyncError, match="handshake with the BN sync service .* failed"):
            channel.reduce_moments("bn1", moments(0))
    assert service.round_failure(1) is None


# --- faults -----------------------------------------------------------------------------------


def test_wrong_credential_is_refused_and_the_round_survives(services, channels) -> None:
    service = services()
    credentials = service.open_round(1, CLIENTS)
    forwards: dict[str, Moments] = {}

    def member(k: int) -> Callable[[], None]:
        def job() -> None:
            channel = channels(service, 1, CLIENTS[k], credentials[CLIENTS[k]])
            forwards[CLIENTS[k]] = channel.reduce_moments("bn1", moments(k))
            channel.reduce_grad_sums("bn1", grads(k))

        return job

    def outsiders() -> None:
        wait_until_waiting(service, 1, 2)  # c0 and c1 are parked in the first exchange
        for client_id, credential in (("c2", "guess"), ("c2", credentials["c0"]), ("x", "y")):
            intruder = channels(service, 1, client_id, credential)
            with pytest.raises(BNSyncError, match="UNAUTHENTICATED.*wrong credential"):
                intruder.reduce_moments("bn1", moments(2))
        # Only then does the real c2 arrive, and the round completes.
        member(2)()

    _, errors, _ = run_clients({"c0": member(0), "c1": member(1), "outsiders": outsiders})
    assert not errors, errors
    assert service.round_failure(1) is None
    expected = combine_moments("bn1", {k: moments(k) for k in range(3)})
    for result in forwards.values():
        assert result.count == expected.count and torch.equal(result.mean, expected.mean)
    code, details = raw_call(
        service, encode_request(ReduceRequest("forward", "bn9", 2, b"")), Caller(1, "c1", "nope")
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and "'c1'" in details
    code, details = raw_call(service, encode_request(ReduceRequest("forward", "bn9", 2, b"")))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "metadata" in details


def _corrupt(value, what: str):
    if what == "nan mean":
        return Moments(value.count, value.mean * float("nan"), value.m2)
    if what == "negative m2":
        return Moments(value.count, value.mean, -value.m2)
    if what == "zero count":
        return Moments(0, value.mean, value.m2)
    if what == "wrong shape":
        return Moments(value.count, torch.zeros(5), torch.ones(5))
    if what == "inf grad sums":
        return GradSums(value.sum_dy, value.sum_dy_xhat + float("inf"))
    raise AssertionError(what)


class _Corrupting(BNChannel):
    """c1's channel: corrupts one exchange, after the other two clients are parked in it."""

    def __init__(self, inner: BNChannel, service: BNSyncService, what: str) -> None:
        self.inner, self.service, self.what = inner, service, what

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        if layer == "bn2" and self.what != "inf grad sums":
            wait_until_waiting(self.service, 1, 2)
            local = _corrupt(local, self.what)
        return self.inner.reduce_moments(layer, local)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        if layer == "bn2" and self.what == "inf grad sums":
            wait_until_waiting(self.service, 1, 2)
            local = _corrupt(local, self.what)
        return self.inner.reduce_grad_sums(layer, local)


@pytest.mark.parametrize(
    "what, message",
    [
        ("nan mean", "non-finite"),
        ("negative m2", "negative"),
        ("zero count", "count must be positive"),
        ("wrong shape", "5 channels"),
        ("inf grad sums", "non-finite"),
    ],
)
def test_bad_statistics_abort_the_round_for_everyone(services, channels, what, message) -> None:
    service = services(timeout=PATIENT)  # the others must be released at once, not by the timeout
    credentials = service.open_round(1, CLIENTS)

    def job(k: int) -> Callable[[], None]:
        def run() -> None:
            channel: BNChannel = channels(service, 1, CLIENTS[k], credentials[CLIENTS[k]])
            if k == 1:
                channel = _Corrupting(channel, service, what)
            scripted_step(channel, k)

        return run

    results, errors, elapsed = run_clients({c: job(k) for k, c in enumerate(CLIENTS)})
    assert set(errors) == set(CLIENTS) and elapsed < FAST
    for error in errors.values():
        assert isinstance(error, BNSyncError)
        assert "client 'c1'" in str(error) or "client c1," in str(error), str(error)
        assert message in str(error)
    assert message in service.round_failure(1).message
    assert service.round_failure(1).culprits == ("c1",)  # who sent it, as a field
    assert service.round_failure(1).kind is AbortKind.BAD_CONTRIBUTION


def test_bad_statistics_are_refused_on_arrival(services, channels) -> None:
    """No waiting for the others: a NaN is refused at once, and the round aborted."""
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)
    nan = Moments(3, torch.full((4,), float("nan")), torch.ones(4))
    start = time.monotonic()
    with pytest.raises(
        BNSyncError, match="INVALID_ARGUMENT.*client 'c1': forward of layer 'bn1' .*non-finite"
    ):
        channels(service, 1, "c1", credentials["c1"]).reduce_moments("bn1", nan)
    assert time.monotonic() - start < FAST
    with pytest.raises(BNSyncError, match="ABORTED.*non-finite"):
        channels(service, 1, "c0", credentials["c0"]).reduce_moments("bn1", moments(0))


def test_silent_client_makes_the_others_fail_after_the_timeout(services, channels) -> None:
    service = services(timeout=1.0)
    credentials = service.open_round(1, CLIENTS)
    wake_up = threading.Event()

    def job(k: int) -> Callable[[], None]:
        def run() -> None:
            channel = channels(service, 1, CLIENTS[k], credentials[CLIENTS[k]])
            if k == 2:
                wake_up.wait(JOIN_TIMEOUT / 2)  # silent until the others have given up
            scripted_step(channel, k)

        return run

    def wake_later() -> None:
        wait_until_failed(service, 1)
        wake_up.set()

    jobs = {c: job(k) for k, c in enumerate(CLIENTS)} | {"waker": wake_later}
    _, errors, elapsed = run_clients(jobs)
    assert set(errors) == set(CLIENTS)
    for name in ("c0", "c1"):
        assert "'c2' sent nothing for forward of layer 'bn1' (seq 0) within 1 s" in str(
            errors[name]
        )
    assert "was aborted" in str(errors["c2"])  # the late client learns why, too
    assert 0.9 < elapsed < FAST
    assert "'c2'" in service.round_failure(1).message
    assert service.round_failure(1).culprits == ("c2",)
    assert service.round_failure(1).kind is AbortKind.SILENT


def wait_until_failed(service: BNSyncService, round_id: int) -> None:
    deadline = time.monotonic() + 5.0
    while service.round_failure(round_id) is None:
        assert time.monotonic() < deadline, "round never failed"
        time.sleep(0.01)


@pytest.mark.parametrize("when", ["pending", "completed"])
def test_duplicate_sender_aborts_the_round(services, channels, when: str) -> None:
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)
    replayed = threading.Event()

    def member(k: int) -> Callable[[], None]:
        def run() -> None:
            channel = channels(service, 1, CLIENTS[k], credentials[CLIENTS[k]])
            if when == "pending" and k != 1:
                replayed.wait(5.0)  # c0 and c2 arrive after the replay: c1's request is parked
            channel.reduce_moments("bn1", moments(k))
            if when == "completed" and k == 2:
                replayed.wait(5.0)  # the round stays at seq 1 until the replay
            scripted_step(channel, k, layers=("bn2",))

        return run

    def replay() -> None:
        # A second channel with c1's credential starts again at seq 0: a replay.
        if when == "pending":
            wait_until_waiting(service, 1, 1)
        else:
            wait_until_seq(service, 1, 1)
        try:
            channels(service, 1, "c1", credentials["c1"]).reduce_moments("bn1", moments(1))
        finally:
            replayed.set()

    jobs = {c: member(k) for k, c in enumerate(CLIENTS)} | {"replay": replay}
    _, errors, elapsed = run_clients(jobs)
    assert set(errors) == set(jobs) and elapsed < FAST
    state = "is still pending" if when == "pending" else "already completed"
    expected = (
        f"client 'c1': duplicate contribution to forward of layer 'bn1' (seq 0), which {state}"
    )
    for error in errors.values():
        assert expected in str(error)


def wait_until_seq(service: BNSyncService, round_id: int, seq: int) -> None:
    deadline = time.monotonic() + 5.0
    while service._rounds[round_id]._seq < seq:  # white-box, as wait_until_waiting
        assert time.monotonic() < deadline
        time.sleep(0.002)


@pytest.mark.parametrize(
    "phase, layer, message",
    [
        ("forward", "bn9", "sent 4 channels of forward of layer 'bn9' (seq 0); the majority sent"),
        ("backward", "bn1", "unknown layer: backward of layer 'bn1' (seq 0) without a forward"),
    ],
)
def test_out_of_step_layer_aborts_the_round(services, channels, phase, layer, message) -> None:
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)

    def member(k: int) -> Callable[[], None]:
        return lambda: scripted_step(channels(service, 1, CLIENTS[k], credentials[CLIENTS[k]]), k)

    def stray() -> None:
        wait_until_waiting(service, 1, 2)
        channel = channels(service, 1, "c2", credentials["c2"])
        if phase == "forward":
            channel.reduce_moments(layer, moments(2))
        else:
            channel.reduce_grad_sums(layer, grads(2))

    _, errors, elapsed = run_clients({"c0": member(0), "c1": member(1), "c2": stray})
    assert set(errors) == set(CLIENTS) and elapsed < FAST
    for error in errors.values():
        assert "client 'c2'" in str(error) and message in str(error)
    assert service.round_failure(1).culprits == ("c2",)


def test_unknown_layer_and_skipped_seq_abort_the_round(services, channels) -> None:
    service = services()
    credentials = service.open_round(1, ["c0", "c1"])
    c0 = channels(service, 1, "c0", credentials["c0"])
    with pytest.raises(BNSyncError, match="'c0': unknown layer: backward of layer 'bn1'"):
        c0.reduce_grad_sums("bn1", grads(0))  # no forward sync of 'bn1' in this round

    credentials = service.open_round(2, ["c0", "c1"])
    code, details = raw_call(
        service,
        encode_request(ReduceRequest("forward", "bn1", 3, encode(moments(1)))),
        Caller(2, "c1", credentials["c1"]),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "client 'c1': out of step: sent forward of layer 'bn1' (seq 3) while at seq 0" in details
    assert "seq 3" in service.round_failure(2).message


def test_undecodable_data_from_a_member_aborts_naming_it_but_an_outsiders_does_not(
    services, channels
) -> None:
    service = services()
    credentials = service.open_round(1, ["c0", "c1"])
    code, details = raw_call(service, b"garbage", Caller(1, "c1", "wrong"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert service.round_failure(1) is None  # an outsider cannot stop a round

    truncated = encode(moments(1))[:-3]
    code, details = raw_call(
        service,
        encode_request(ReduceRequest("forward", "bn1", 0, truncated)),
        Caller(1, "c1", credentials["c1"]),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "client 'c1': undecodable payload in forward of layer 'bn1' (seq 0)" in details
    with pytest.raises(BNSyncError, match="ABORTED.*'c1': undecodable"):
        channels(service, 1, "c0", credentials["c0"]).reduce_moments("bn1", moments(0))

    credentials = service.open_round(2, ["c0", "c1"])
    code, details = raw_call(service, b"garbage", Caller(2, "c0", credentials["c0"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in details
    assert service.round_failure(2).culprits == ("c0",)


def test_unknown_and_closed_rounds_are_refused(services, channels) -> None:
    service = services()
    with pytest.raises(BNSyncError, match="NOT_FOUND.*round 99 is not open"):
        channels(service, 99, "c0", "whatever").reduce_moments("bn1", moments(0))

    credentials = service.open_round(1, ["c0", "c1"])
    c0 = channels(service, 1, "c0", credentials["c0"])

    def closer() -> None:
        wait_until_waiting(service, 1, 1)
        reason = service.close_round(1)
        assert "server closed the round while client(s) 'c0' were waiting" in reason.message
        assert reason.culprits == ("c1",) and reason.kind is AbortKind.CLOSED  # c1 never came

    _, errors, elapsed = run_clients(
        {"c0": lambda: c0.reduce_moments("bn1", moments(0)), "x": closer}
    )
    assert set(errors) == {"c0"} and elapsed < FAST
    assert "server closed the round" in str(errors["c0"])
    with pytest.raises(BNSyncError, match="round 1 is not open"):
        channels(service, 1, "c1", credentials["c1"]).reduce_moments("bn1", moments(1))
    assert "server closed" in service.round_failure(1).message


class _Killed(Exception):
    pass


def test_client_killed_before_backward(services, channels) -> None:
    """c2 dies after its forward pass (its connection closes); the others fail at the timeout."""
    service = services(timeout=1.0)
    model, batches = small_model(), client_batches()
    credentials = service.open_round(1, CLIENTS)

    class Dying(BNChannel):
        def __init__(self, inner: GrpcBNChannel) -> None:
            self.inner = inner

        def reduce_moments(self, layer: str, local: Moments) -> Moments:
            return self.inner.reduce_moments(layer, local)

        def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
            self.inner.close()  # the process is gone: no goodbye to the service
            raise _Killed

    def job(k: int) -> Callable[[], None]:
        def run() -> None:
            channel = channels(service, 1, CLIENTS[k], credentials[CLIENTS[k]])
            client = convert_federated_batchnorm(copy.deepcopy(model))
            with channel:
                train_client(
                    client,
                    batches[k],
                    nn.CrossEntropyLoss(),
                    lr=LR,
                    channel=Dying(channel) if k == 2 else channel,
                )

        return run

    _, errors, elapsed = run_clients({c: job(k) for k, c in enumerate(CLIENTS)})
    assert isinstance(errors.pop("c2"), _Killed)
    assert set(errors) == {"c0", "c1"} and 0.9 < elapsed < FAST
    for error in errors.values():
        assert "'c2' sent nothing for backward of layer '5' (seq 2) within 1 s" in str(error)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_client_disconnecting_while_waiting_aborts_at_once(services, channels, tmp_path, tls):
    certs = make_certs(tmp_path) if tls else None
    service = services(timeout=PATIENT, tls=(certs.server_chain, certs.server_key) if tls else None)
    credentials = service.open_round(1, CLIENTS)
    root = certs.ca_cert if tls else None
    c2 = channels(service, 1, "c2", credentials["c2"], root_certificates=root)

    def killer() -> None:
        wait_until_waiting(service, 1, 1)  # c2 is parked in the first exchange
        c2.close()
        wait_until_failed(service, 1)

    _, errors, elapsed = run_clients(
        {"c2": lambda: c2.reduce_moments("bn1", moments(2)), "killer": killer}
    )
    assert set(errors) == {"c2"} and elapsed < FAST
    with pytest.raises(BNSyncError, match="'c2' disconnected or cancelled its request"):
        c0 = channels(service, 1, "c0", credentials["c0"], root_certificates=root)
        c0.reduce_moments("bn1", moments(0))


def test_client_deadline_bounds_the_wait_and_aborts_the_round(services, channels) -> None:
    """A client never waits forever: its own deadline ends the call, and the round with it."""
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)
    c0 = channels(service, 1, "c0", credentials["c0"], timeout=0.4)
    start = time.monotonic()
    with pytest.raises(BNSyncError, match="no answer from the BN sync service within 0.6 s"):
        c0.reduce_moments("bn1", moments(0))
    assert time.monotonic() - start < FAST
    wait_until_failed(service, 1)
    assert "'c0' disconnected or cancelled its request" in service.round_failure(1).message
    assert service.round_failure(1).culprits == ("c0",)
    assert service.round_failure(1).kind is AbortKind.DISCONNECTED


@pytest.mark.parametrize(
    "error", [RuntimeError("CUDA out of memory"), BNSyncError("inconsistent counts")]
)
def test_client_exception_releases_the_others_at_once(services, channels, error) -> None:
    """A client that fails on its own (even with a BNSyncError) tells the service at once."""
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)

    def job(k: int) -> Callable[[], None]:
        def run() -> None:
            with channels(service, 1, CLIENTS[k], credentials[CLIENTS[k]]) as channel:
                channel.reduce_moments("bn1", moments(k))
                if k == 2:
                    raise error
                channel.reduce_grad_sums("bn1", grads(k))

        return run

    _, errors, elapsed = run_clients({c: job(k) for k, c in enumerate(CLIENTS)})
    assert set(errors) == set(CLIENTS) and elapsed < FAST
    assert errors["c2"] is error
    for name in ("c0", "c1"):
        expected = f"client 'c2' gave up: {type(error).__name__}: {error}"
        assert expected in str(errors[name])


def test_service_restart_between_rounds(services, channels) -> None:
    first = services()
    credentials = first.open_round(1, CLIENTS)
    old = {c: channels(first, 1, c, credentials[c]) for c in CLIENTS}
    _, errors, _ = run_clients(
        {c: lambda k=k, c=c: scripted_step(old[c], k) for k, c in enumerate(CLIENTS)}
    )
    assert not errors and first.close_round(1) is None
    port = first.port
    first.stop()

    second = services(port=port)  # same address, new instance
    assert second.port == port
    new_credentials = second.open_round(2, CLIENTS)
    _, errors, _ = run_clients(
        {
            c: lambda k=k, c=c: scripted_step(channels(second, 2, c, new_credentials[c]), k)
            for k, c in enumerate(CLIENTS)
        }
    )
    assert not errors, errors
    # The old channels reconnect to the new instance, which does not know round 1 ...
    with pytest.raises(BNSyncError, match="round 1 is not open"):
        old["c0"].reduce_moments("bn1", moments(0))
    # ... nor, if round 1 is opened again, the old credentials.
    second.open_round(1, CLIENTS)
    with pytest.raises(BNSyncError, match="UNAUTHENTICATED"):
        channels(second, 1, "c0", credentials["c0"]).reduce_moments("bn1", moments(0))
    assert second.round_failure(1) is None


def test_stop_releases_waiting_clients(services, channels) -> None:
    service = services(timeout=PATIENT)
    credentials = service.open_round(1, CLIENTS)
    c0 = channels(service, 1, "c0", credentials["c0"])

    def stopper() -> None:
        wait_until_waiting(service, 1, 1)
        service.stop()

    _, errors, elapsed = run_clients(
        {"c0": lambda: c0.reduce_moments("bn1", moments(0)), "s": stopper}
    )
    assert set(errors) == {"c0"} and elapsed < FAST
    assert "service was stopped" in str(errors["c0"])


def test_open_round_validates(services) -> None:
    service = services()
    with pytest.raises(ValueError, match="distinct"):
        service.open_round(1, ["a", "a"])
    with pytest.raises(ValueError, match="distinct"):
        service.open_round(1, [])
    service.open_round(1, ["a"])
    with pytest.raises(ValueError, match="already open"):
        service.open_round(1, ["b"])
    with pytest.raises(ValueError, match="max_clients"):
        service.open_round(2, [f"c{i}" for i in range(64)])
    with pytest.raises(KeyError):
        service.round_failure(7)
