"""The Flower app, specified against the in-process engine.

The real strategy (server/) talks to the real ClientApp (client/) through an in-memory Grid, so
these tests check what the messages carry; tests/test_flower_runtime.py runs the same app under
Flower's simulation and deployment runtimes.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Message

from client.app import app as client_app
from common.experiment import task
from common.experiment.config import RunConfig
from common.fedtan.bn_channel import BNSyncError
from common.protocol import (
    CONFIG_RECORD,
    LOCAL_STATS_META_RECORD,
    LOCAL_STATS_RECORD,
    MODEL_RECORD,
    QUERY_BN_BACKWARD,
    QUERY_BN_FORWARD,
    QUERY_PARTITION,
    SERVER_ROUND,
    SYNC_LAYER,
    TRAIN_FEDTAN,
)
from server.app import run_fedtan
from server.checkpoint import load_state_dict
from server.local_run import LocalGrid, flower_in_this_process, run_locally
from tests.float_noise import assert_within_rounding_noise

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "partition": "sorted",
    "num-clients": 3,
    "batch-size": 12,
    "num-rounds": 2,
    "lr": 0.1,
    "momentum": 0.9,
    "weight-decay": 1e-4,
    "max-retries": 1,
    "reply-timeout": 5.0,  # how long a vanished client's reply is waited for
}


def run(tmp_path, faults=None, num_nodes=3, node_ids=None, **overrides):
    run_config = {**BASE, "output-dir": str(tmp_path / "out"), **overrides}
    return run_locally(
        client_app, run_config, faults=faults, num_nodes=num_nodes, node_ids=node_ids
    )


def in_process_reference(
    cfg: RunConfig, num_clients: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The same rounds through the in-process engine: what the messages must reproduce."""
    model = task.build_global_model(cfg).to(dtype)
    for r in range(1, cfg.num_rounds + 1):
        batches = [
            [(x.to(dtype), y) for x, y in client]
            for client in task.every_client_batches(cfg, num_clients, r)
        ]
        model.load_state_dict(task.engine_round(model, cfg, batches, r))
    return model.state_dict()


def assert_is_the_in_process_model(
    actual: dict[str, torch.Tensor], cfg: RunConfig, num_clients: int = 3
) -> None:
    """The app's float32 model is the in-process engine's, to float32's own noise: no farther
    from the engine's float64 result than the engine's float32 result is."""
    start = task.build_global_model(cfg).state_dict()
    assert_within_rounding_noise(
        actual,
        in_process_reference(cfg, num_clients),
        in_process_reference(cfg, num_clients, torch.float64),
        start,
    )


def assert_states_equal(actual, expected):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("local_steps", [1, 3])
def test_messages_give_the_in_process_engine_model(tmp_path, local_steps):
    result, _ = run(tmp_path, **{"local-steps": local_steps, "lr-milestones": "2"})
    cfg = RunConfig.from_flower({**BASE, "local-steps": local_steps, "lr-milestones": "2"})
    assert_is_the_in_process_model(result.arrays.to_torch_state_dict(), cfg)


def test_a_round_costs_2L_sync_exchanges_plus_the_train_message(tmp_path):
    _, grid = run(tmp_path, **{"num-rounds": 1})
    num_bn_layers = 3  # small_cnn: two BatchNorm2d and one BatchNorm1d
    types = [m.metadata.message_type for m in grid.sent]
    assert types.count(QUERY_BN_FORWARD) == 3 * num_bn_layers
    assert types.count(QUERY_BN_BACKWARD) == 3 * num_bn_layers
    assert types.count(TRAIN_FEDTAN) == 3
    # The model travels once per client and round: with the first query only.
    with_model = [m for m in grid.sent if MODEL_RECORD in m.content.array_records]
    assert len(with_model) == 3
    assert all(m.metadata.message_type == QUERY_BN_FORWARD for m in with_model)


def test_results_are_written_every_round(tmp_path):
    run(tmp_path)
    out = tmp_path / "out"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("round,") and len(rows) == 3
    assert {"train-loss", "test-accuracy", "round_trips", "bn_bytes_up"} <= set(rows[0].split(","))
    assert '"status": "completed"' in (out / "summary.json").read_text()
    assert set(load_state_dict(out)) == set(
        task.build_global_model(RunConfig.from_flower(BASE)).state_dict()
    )


# --- faults: a bad or missing reply stops the round, names the client, loses nothing ---------


def corrupt_stats(value, field="mean"):
    """A client whose forward replies carry ``value(its true field)`` instead."""

    def fault(reply: Message) -> Message:
        if reply.metadata.message_type == QUERY_BN_FORWARD and not reply.has_error():
            from flwr.app import Array

            stats = reply.content.array_records[LOCAL_STATS_RECORD]
            stats[field] = Array(value(stats[field].numpy().copy()))
        return reply

    return fault


def nan_stats(mean):
    mean[0] = math.nan
    return mean


def fail_with(reason: str):
    def fault(reply: Message) -> Message:
        raise RuntimeError(reason)  # as if the ClientApp had raised

    return fault


def retype(message_type: str):
    def fault(reply: Message) -> Message:
        reply.metadata.message_type = message_type
        return reply

    return fault


FAULTS = {
    "non-finite statistics": (corrupt_stats(nan_stats), "non-finite"),
    "wrongly shaped statistics": (corrupt_stats(lambda m: m[:-1]), "one shape"),
    "a client that vanishes": (lambda reply: None, "no reply"),
    "a stale reply": (
        lambda reply: _retag(reply, SERVER_ROUND, 99) if not reply.has_error() else reply,
        "stale",
    ),
    "an answer for another layer": (
        lambda reply: _retag(reply, SYNC_LAYER, "fc") if not reply.has_error() else reply,
        "out-of-step",
    ),
    "a zero count": (lambda reply: _retag(reply, "count", 0), "count must be a positive"),
    "integer statistics": (corrupt_stats(lambda m: m.astype("int64")), "dtype torch.int64"),
    "negative variance": (
        corrupt_stats(lambda m2: -m2 - 1.0, field="m2"),
        "negative sum of squared",
    ),
    "a client that raises": (fail_with("out of memory"), "out of memory"),
    "a reply of the wrong type": (retype("query.bn_sideways"), "replied with"),
}


def _retag(reply: Message, key: str, value) -> Message:
    if LOCAL_STATS_META_RECORD in reply.content.config_records:
        reply.content.config_records[LOCAL_STATS_META_RECORD][key] = value
    return reply


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_client_is_named_and_the_round_retried_without_it(tmp_path, caplog, fault):
    inject, expected_message = FAULTS[fault]
    bad_node = 1001
    result, grid = run(tmp_path, faults={bad_node: inject})
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any(expected_message in f and str(bad_node) in f for f in failures), failures
    # Both rounds completed with the two good clients; the model is finite.
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["clients"] == 2 for m in result.train_metrics_clientapp.values())
    for tensor in result.arrays.to_torch_state_dict().values():
        assert torch.isfinite(tensor.double()).all()


def test_on_failure_stop_ends_cleanly_with_the_last_good_model(tmp_path):
    fails_in_round_2 = {1002: vanish_at_train_reply(2)}
    result, _ = run(tmp_path, faults=fails_in_round_2, **{"on-failure": "stop"})
    assert sorted(result.train_metrics_clientapp) == [1]
    saved = load_state_dict(tmp_path / "out")
    assert_states_equal(saved, result.arrays.to_torch_state_dict())
    assert '"status": "stopped"' in (tmp_path / "out" / "summary.json").read_text()
    # ... and that model is round 1 of the in-process engine.
    cfg = RunConfig.from_flower({**BASE, "num-rounds": 1})
    assert_is_the_in_process_model(saved, cfg)


def vanish_at_train_reply(n: int):
    """A client that answers everything until its n-th train reply, which never arrives."""
    seen = []

    def fault(reply: Message) -> Message | None:
        if reply.metadata.message_type == TRAIN_FEDTAN:
            seen.append(reply)
            if len(seen) == n:
                return None
        return reply

    return fault


def test_a_client_without_the_rounds_model_refuses_a_stale_query(tmp_path):
    _, grid = run(tmp_path, **{"num-rounds": 1})
    later_query = next(m for m in grid.sent if m.metadata.message_type == QUERY_BN_BACKWARD)
    later_query.content.config_records[CONFIG_RECORD][SERVER_ROUND] = 7
    with pytest.raises(BNSyncError, match="no global model for round 7"):
        client_app(later_query, grid.contexts[later_query.metadata.dst_node_id])


def test_an_unknown_message_type_is_refused_by_the_client(tmp_path):
    _, grid = run(tmp_path, **{"num-rounds": 1})
    msg = grid.sent[0]
    msg.metadata.message_type = "query.bn_sideways"
    with pytest.raises(ValueError, match="bn_sideways"):
        client_app(msg, grid.contexts[msg.metadata.dst_node_id])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"learning-rate": 0.1}, "unknown run config key 'learning-rate'"),
        ({"lr": "fast"}, "'lr': expected float"),
        ({"partition": "by-color"}, "'partition': 'by-color' is not one of"),
        ({"local-steps": 0}, "'local-steps' must be >= 1"),
        ({"lr-milestones": "600,oops"}, "'lr-milestones'"),
    ],
)
def test_a_wrong_config_fails_at_start_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_flower({**BASE, **override})


# --- transport = "grpc": one Flower message per client and round, the sync over the service --


@pytest.mark.parametrize(
    ("transport", "protocol"), [("grpc", "grpc"), ("grpc", "socket"), ("inprocess", "grpc")]
)
def test_a_transport_beside_flower_gives_the_in_process_engine_model(
    tmp_path, transport, protocol
):
    overrides = {"transport": transport, "local-steps": 2, "bn-sync-protocol": protocol}
    result, grid = run(tmp_path, **overrides)
    cfg = RunConfig.from_flower({**BASE, **overrides})
    assert_is_the_in_process_model(result.arrays.to_torch_state_dict(), cfg)
    # One Flower message per client and round (after one check before round 1); nothing of
    # the BN sync crosses Flower.
    assert [m.metadata.message_type for m in grid.sent] == [QUERY_PARTITION] * 3 + [
        "query.bn_sync_preflight"
    ] * 3 + [TRAIN_FEDTAN] * 3 * 2
    from common.transports.inprocess import OPEN_HUBS

    assert not OPEN_HUBS  # no in-process hub left open once the run is over


@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_the_grpc_transport_uses_tls_when_configured(tmp_path, protocol):
    from tests.certs import make_certs

    certs = tmp_path / "certs"
    make_certs(certs)
    overrides = {
        "transport": "grpc",
        "bn-sync-protocol": protocol,
        "num-rounds": 1,
        "bn-sync-certfile": str(certs / "server.pem"),
        "bn-sync-keyfile": str(certs / "server.key"),
        "bn-sync-ca-certfile": str(certs / "ca.pem"),
    }
    result, grid = run(tmp_path, **overrides)
    cfg = RunConfig.from_flower({**BASE, **overrides})
    assert_is_the_in_process_model(result.arrays.to_torch_state_dict(), cfg)
    preflight = next(m for m in grid.sent if m.metadata.message_type == "query.bn_sync_preflight")
    sent_root = preflight.content.config_records[CONFIG_RECORD]["bn-sync-root-certificates"]
    assert "BEGIN CERTIFICATE" in sent_root


@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_a_client_killed_mid_round_over_grpc_is_named_and_the_round_retried(
    tmp_path, caplog, monkeypatch, protocol
):
    from common.transports.grpc.client import GrpcBNChannel

    real = GrpcBNChannel.reduce_grad_sums

    def killed_in_backward(self, layer, local):
        if self.client_id == "1001":
            raise RuntimeError("client process killed")
        return real(self, layer, local)

    monkeypatch.setattr(GrpcBNChannel, "reduce_grad_sums", killed_in_backward)
    vanished = {1001: vanish_at_train_reply(1)}  # and its reply never comes
    overrides = {"transport": "grpc", "bn-sync-timeout": 5.0, "bn-sync-protocol": protocol}
    result, _ = run(tmp_path, faults=vanished, **overrides)
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("1001" in f for f in failures), failures
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["clients"] == 2 for m in result.train_metrics_clientapp.values())


def test_a_client_sending_a_bad_payload_over_grpc_is_left_out_of_the_retry(
    tmp_path, caplog, monkeypatch
):
    """The service names the sender of non-finite moments; the other clients' errors only echo
    the abort, so the round is retried without that client alone and the run completes."""
    import math

    from common.fedtan.bn_channel import Moments
    from common.transports.grpc.client import GrpcBNChannel
    from common.transports.grpc.server import PREFLIGHT_ROUND

    real = GrpcBNChannel.reduce_moments

    def non_finite_from_1001(self, layer, local):
        if self.client_id == "1001" and self.round_id != PREFLIGHT_ROUND:
            local = Moments(local.count, local.mean.clone().fill_(math.nan), local.m2)
        return real(self, layer, local)

    monkeypatch.setattr(GrpcBNChannel, "reduce_moments", non_finite_from_1001)
    result, grid = run(tmp_path, **{"transport": "grpc", "bn-sync-timeout": 5.0})
    retries = [r.getMessage() for r in caplog.records if "Retrying without" in r.getMessage()]
    assert retries == ["Retrying without nodes [1001]"]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["clients"] == 2 for m in result.train_metrics_clientapp.values())
    last_round = [
        m
        for m in grid.sent
        if m.metadata.message_type == TRAIN_FEDTAN
        and m.content.config_records[CONFIG_RECORD][SERVER_ROUND] == 2
    ]
    assert sorted(m.metadata.dst_node_id for m in last_round) == [1000, 1002]


def test_grpc_fails_at_start_when_the_clients_cannot_run_at_the_same_time(tmp_path):
    """A Ray simulation with one actor for 3 clients: the check before round 1 says so."""
    overrides = {"transport": "grpc", "bn-sync-timeout": 1.0}
    run_config = {**BASE, "output-dir": str(tmp_path / "out"), **overrides}
    grid = LocalGrid(client_app, 3, run_config, concurrency=1)
    with pytest.raises(RuntimeError, match="before round 1.*sent nothing.*init-args-num-cpus"):
        with flower_in_this_process():
            run_fedtan(grid, RunConfig.from_flower(run_config))
    assert not (tmp_path / "out" / "metrics.csv").exists()  # no round was started
    types = {m.metadata.message_type for m in grid.sent}
    assert types == {QUERY_PARTITION, "query.bn_sync_preflight"}


def test_clients_per_round_samples_a_seeded_subset_every_round(tmp_path):
    first, grid = run(tmp_path / "a", num_nodes=4, **{"num-clients": 4, "clients-per-round": 2})
    again, grid_again = run(
        tmp_path / "b", num_nodes=4, **{"num-clients": 4, "clients-per-round": 2}
    )
    assert all(m["clients"] == 2 for m in first.train_metrics_clientapp.values())

    def trained(grid):
        return [
            m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == TRAIN_FEDTAN
        ]

    assert trained(grid) == trained(grid_again)  # the same seed samples the same nodes
    assert len(set(trained(grid))) > 2  # and not the same two every round


@pytest.mark.parametrize("transport", ["messages", "grpc", "inprocess"])
def test_the_model_does_not_depend_on_the_node_ids_flower_draws(tmp_path, transport):
    """Flower draws new node ids for every simulation (and SuperLink): the clients are sampled
    and combined in partition order, so the same run gives the same model bit for bit. The
    float sums of an average do depend on their order (measured: about 0.6 % of float32 means
    of five values change with it), which is why that order must not be the node ids'."""
    overrides = {"num-clients": 4, "clients-per-round": 3, "transport": transport}
    ascending, grid = run(tmp_path / "a", num_nodes=4, **overrides)
    shuffled_ids = [7003, 2001, 9002, 4000]  # partition k on node shuffled_ids[k]
    shuffled, shuffled_grid = run(tmp_path / "b", num_nodes=4, node_ids=shuffled_ids, **overrides)
    assert_states_equal(
        shuffled.arrays.to_torch_state_dict(), ascending.arrays.to_torch_state_dict()
    )

    def partitions_trained(grid, ids):
        return [
            ids.index(m.metadata.dst_node_id)
            for m in grid.sent
            if m.metadata.message_type == TRAIN_FEDTAN
        ]

    default_ids = [1000, 1001, 1002, 1003]
    assert partitions_trained(grid, default_ids) == partitions_trained(shuffled_grid, shuffled_ids)


# --- transport = "inprocess": the clients are threads of the ServerApp's process ------------


def test_a_client_failing_mid_step_in_process_releases_the_others_and_is_left_out(
    tmp_path, caplog, monkeypatch
):
    """The others are released by the failing client at once, not after their timeout; the
    retry leaves out that client alone, whose error is not an echo of the abort."""
    import time

    from common.transports.inprocess import InProcessBNChannel

    real = InProcessBNChannel.reduce_grad_sums

    def killed_in_backward(self, layer, local):
        if self.node_id == 1001:
            raise RuntimeError("client process killed")
        return real(self, layer, local)

    monkeypatch.setattr(InProcessBNChannel, "reduce_grad_sums", killed_in_backward)
    started = time.monotonic()
    result, grid = run(tmp_path, **{"transport": "inprocess", "reply-timeout": 120.0})
    assert time.monotonic() - started < 60.0  # far below one wait at the hub (120 s)
    retries = [r.getMessage() for r in caplog.records if "Retrying without" in r.getMessage()]
    assert retries == ["Retrying without nodes [1001]"]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["clients"] == 2 for m in result.train_metrics_clientapp.values())


def test_a_client_whose_reply_vanishes_in_process_is_the_only_one_left_out(tmp_path, caplog):
    vanished = {1002: vanish_at_train_reply(1)}
    result, _ = run(tmp_path, faults=vanished, **{"transport": "inprocess"})
    retries = [r.getMessage() for r in caplog.records if "Retrying without" in r.getMessage()]
    assert retries == ["Retrying without nodes [1002]"]
    assert sorted(result.train_metrics_clientapp) == [1, 2]


def test_inprocess_fails_at_start_when_the_clients_cannot_meet_in_this_process(tmp_path):
    """Clients that cannot run at once (here one at a time) never meet at the hub: the check
    before round 1 says what the transport needs, and no round starts."""
    overrides = {"transport": "inprocess", "reply-timeout": 1.0}
    run_config = {**BASE, "output-dir": str(tmp_path / "out"), **overrides}
    grid = LocalGrid(client_app, 3, run_config, concurrency=1)
    with pytest.raises(RuntimeError, match="before round 1.*running at once.*'grpc'"):
        with flower_in_this_process():
            run_fedtan(grid, RunConfig.from_flower(run_config))
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_a_client_outside_the_servers_process_finds_no_hub():
    from flwr.app import ConfigRecord

    from common.protocol import BN_SYNC_HUB
    from common.transports.inprocess import InProcessBNChannel

    with pytest.raises(BNSyncError, match="no in-process BN sync hub 'round-1-x'.*run_locally"):
        InProcessBNChannel(ConfigRecord({BN_SYNC_HUB: "round-1-x"}), 1000)


def test_a_client_sending_non_finite_statistics_in_process_is_named_and_left_out(
    tmp_path, caplog, monkeypatch
):
    """The trusted hub checks the values once the clients are done (one device read per
    step); a non-finite contribution still fails the round, naming its sender alone."""
    from common.fedtan.bn_channel import Moments
    from common.transports.inprocess import InProcessBNChannel

    real = InProcessBNChannel.reduce_moments

    def non_finite_from_1001(self, layer, local):
        if self.node_id == 1001 and layer != "preflight":
            local = Moments(local.count, local.mean.clone().fill_(math.nan), local.m2)
        return real(self, layer, local)

    monkeypatch.setattr(InProcessBNChannel, "reduce_moments", non_finite_from_1001)
    result, _ = run(tmp_path, **{"transport": "inprocess"})
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("non-finite" in f for f in failures), failures
    retries = [r.getMessage() for r in caplog.records if "Retrying without" in r.getMessage()]
    assert retries == ["Retrying without nodes [1001]"]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["clients"] == 2 for m in result.train_metrics_clientapp.values())
