"""Several FedTAN rounds per Flower message (run config ``rounds-per-message`` R > 1).

A block of R rounds is a property of transport "grpc": one Flower message per client starts it,
and each round runs over the BN sync service, averaged there. Every round must still be what a
round is with one message per round (R = 1), which these tests hold to through the real
ServerApp and ClientApp over the real service on 127.0.0.1 (``server.local_run``):

1. the same model, bit for bit, and the in-process engine's;
2. the same metrics per round, evaluations, checkpoints, and resume from the last completed round,
   while the clients already train the next round (abandoned if the last one fails after all);
3. the same failures: a client that raises, goes silent or uploads a bad state fails the round,
   which is retried from the last good model without it;
4. a clear error for a wrong ``rounds-per-message``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

import client.app as client_module
from client.app import app as client_app
from common.experiment import task
from common.experiment.config import RunConfig
from common.fedtan.bn_channel import BNSyncError
from common.protocol import (
    BN_SYNC_ROOT_CERTIFICATES,
    CONFIG_RECORD,
    TRAIN_FEDTAN,
    TRAIN_FEDTAN_BLOCK,
)
from common.transports.grpc.block import Block
from common.transports.grpc.calls import CallFailed, connect
from common.transports.grpc.service import BNSyncService, Limits
from common.transports.grpc.wire import (
    BLOCK_METHOD,
    NEXT,
    UPLOAD,
    BlockRequest,
    Caller,
    block_request_size,
    decode_block_request,
    decode_plan,
    decode_state,
    encode_next,
    encode_plan,
    encode_state,
    encode_upload,
    plan_size,
    state_size,
    state_spec,
)
from server.checkpoint import load_state_dict, read_checkpoint
from server.local_run import LocalGrid, run_locally
from server.processes import (
    Deadline,
)
from server.results import RunRecorder
from server.strategy import RoundStrategy
from tests.test_flower_app import assert_is_the_in_process_model

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "num-clients": 4,
    "batch-size": 12,
    "num-rounds": 4,
    "lr": 0.1,
    "lr-milestones": "3",
    "momentum": 0.9,
    "weight-decay": 1e-4,
    "max-retries": 1,
    "transport": "grpc",
    "reply-timeout": 10.0,
    "bn-sync-timeout": 10.0,
}
APP_DIR = Path(__file__).resolve().parents[1]
LEARNED = ("round", "train-loss", "num-examples", "clients", "test-loss", "test-accuracy")


def run(out: Path, **overrides):
    return run_locally(client_app, {**BASE, "output-dir": str(out), **overrides})


def rows(out: Path) -> list[dict]:
    return [{k: r.get(k) for k in LEARNED} for r in json.loads((out / "metrics.json").read_text())]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def message_types(grid) -> list[str]:
    return [m.metadata.message_type for m in grid.sent]


# --- 1. the same model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_steps", "clients_per_round", "protocol"),
    [(1, 0, "grpc"), (1, 2, "grpc"), (5, 0, "grpc"), (5, 2, "grpc"), (5, 2, "socket")],
)
def test_a_block_of_rounds_gives_exactly_the_model_of_a_message_per_round(
    tmp_path, local_steps, clients_per_round, protocol
):
    config = {
        "local-steps": local_steps,
        "clients-per-round": clients_per_round,
        "bn-sync-protocol": protocol,
    }
    per_round, _ = run(tmp_path / "r1", **config)
    blocks, grid = run(tmp_path / "r3", **config, **{"rounds-per-message": 3})

    assert_same_state(blocks.arrays.to_torch_state_dict(), per_round.arrays.to_torch_state_dict())
    assert blocks.train_metrics_clientapp == per_round.train_metrics_clientapp
    # 4 rounds in blocks of 3: a block of 3 rounds and a shorter one of 1; one Flower train
    # message per client and block, none per round.
    types = message_types(grid)
    assert types.count(TRAIN_FEDTAN_BLOCK) == 2 * BASE["num-clients"]
    assert TRAIN_FEDTAN not in types
    if clients_per_round:
        assert all(m["clients"] == 2 for m in blocks.train_metrics_clientapp.values())
    else:
        cfg = RunConfig.from_flower({**BASE, **config})
        assert_is_the_in_process_model(
            blocks.arrays.to_torch_state_dict(), cfg, BASE["num-clients"]
        )


# --- 2. the same results per round ------------------------------------------------------------


def test_a_block_records_every_round_evaluates_and_checkpoints_as_a_message_per_round(tmp_path):
    config = {"num-rounds": 5, "eval-interval": 2, "checkpoint-interval": 2, "checkpoint-keep": 5}
    run(tmp_path / "r1", **config)
    run(tmp_path / "r3", **config, **{"rounds-per-message": 3})

    assert rows(tmp_path / "r3") == rows(tmp_path / "r1")
    evaluated = [r["round"] for r in rows(tmp_path / "r3") if r["test-loss"] is not None]
    assert evaluated == [2, 4, 5]  # every eval-interval rounds, and the last
    checkpoints = sorted(p.name for p in (tmp_path / "r3" / "checkpoints").iterdir())
    assert checkpoints == sorted(p.name for p in (tmp_path / "r1" / "checkpoints").iterdir())
    assert len(checkpoints) == 2  # rounds 2 and 4
    for name in checkpoints:
        assert_same_state(
            load_state_dict(tmp_path / "r3" / "checkpoints" / name),
            load_state_dict(tmp_path / "r1" / "checkpoints" / name),
        )
    assert summary(tmp_path / "r3")["status"] == "completed"


REAL_EVALUATE = task.evaluate


def evaluation_changed_at(nth: int, change):
    """``task.evaluate`` whose ``nth`` call (1: round 0's) returns ``change(metrics)``; fresh
    for each run, since it counts its calls."""
    calls = [0]

    def evaluate(model, cfg, *args, **kwargs):
        calls[0] += 1
        metrics = REAL_EVALUATE(model, cfg, *args, **kwargs)
        return change(metrics) if calls[0] == nth else metrics

    return evaluate


def test_the_clients_train_a_blocks_next_round_while_the_server_evaluates(tmp_path, monkeypatch):
    """Round 3 is published before round 2 is evaluated and recorded: the clients train it
    meanwhile, and the rounds stay what they are with a message per round."""
    per_round, _ = run(tmp_path / "r1")

    real_train, trained, lock = client_module._train_synced, [0], threading.Lock()
    round_3_trained = threading.Event()

    def train(*args):
        result = real_train(*args)
        with lock:
            trained[0] += 1
            if trained[0] == 3 * BASE["num-clients"]:
                round_3_trained.set()
        return result

    monkeypatch.setattr(client_module, "_train_synced", train)
    seen = []  # whether round 3 was trained during round 2's evaluation (bounded wait)

    def wait_for_round_3(metrics):
        seen.append(round_3_trained.wait(timeout=30))
        return metrics

    monkeypatch.setattr(task, "evaluate", evaluation_changed_at(3, wait_for_round_3))
    blocks, _ = run(tmp_path / "r4", **{"rounds-per-message": 4})

    assert seen == [True]
    assert rows(tmp_path / "r4") == rows(tmp_path / "r1")
    assert_same_state(blocks.arrays.to_torch_state_dict(), per_round.arrays.to_torch_state_dict())


@pytest.mark.parametrize(("rounds_per_message", "drawn_ahead"), [(4, True), (1, False)])
def test_a_blocks_next_round_is_drawn_while_the_round_before_it_trains(
    tmp_path, monkeypatch, rounds_per_message, drawn_ahead
):
    """Drawing a round's clients may ask Flower for the connected nodes (deployed a round trip
    to the SuperLink). In a block it happens while the clients train the round before, not
    between the two rounds, where every client would wait for it; with a message per round
    nothing trains ahead."""
    events = []
    real_sample, real_run_round = RoundStrategy.sample_nodes, RoundStrategy.run_round

    def sample_nodes(self, grid, server_round, attempt=0, **kwargs):
        events.append(("drawn", server_round))
        return real_sample(self, grid, server_round, attempt, **kwargs)

    def run_round(self, grid, plan, *args):
        result = real_run_round(self, grid, plan, *args)
        events.append(("averaged", plan.server_round))
        return result

    monkeypatch.setattr(RoundStrategy, "sample_nodes", sample_nodes)
    monkeypatch.setattr(RoundStrategy, "run_round", run_round)
    run(tmp_path, **{"rounds-per-message": rounds_per_message})

    rounds = range(1, BASE["num-rounds"])
    ahead = [events.index(("drawn", r + 1)) < events.index(("averaged", r)) for r in rounds]
    assert ahead == [drawn_ahead] * len(rounds)


@pytest.mark.parametrize(
    ("rounds_per_message", "asked_in_round"), [(2, [1, 0, 1, 0]), (1, [1] * 4)]
)
def test_inside_a_block_a_round_draws_from_its_members_without_asking_flower(
    tmp_path, monkeypatch, rounds_per_message, asked_in_round
):
    """The block's members wait for its next round: drawing from them spares Flower's list of
    connected nodes, deployed a request to the SuperLink whose CPU slows the round in training.
    The first round of each block asks, as every round with a message per round."""
    asked, per_round = [0], []
    real_get_node_ids, real_round_nodes = LocalGrid.get_node_ids, RoundStrategy.round_nodes

    def get_node_ids(self):
        asked[0] += 1
        return real_get_node_ids(self)

    def round_nodes(self, *args, **kwargs):  # a round's draw (not the BN sync check's)
        before = asked[0]
        nodes = real_round_nodes(self, *args, **kwargs)
        per_round.append(min(1, asked[0] - before))
        return nodes

    monkeypatch.setattr(LocalGrid, "get_node_ids", get_node_ids)
    monkeypatch.setattr(RoundStrategy, "round_nodes", round_nodes)
    per_message, _ = run(tmp_path / "r1", **{"clients-per-round": 2})
    per_round.clear()
    blocks, _ = run(
        tmp_path / "blocks", **{"clients-per-round": 2, "rounds-per-message": rounds_per_message}
    )

    assert per_round == asked_in_round
    assert rows(tmp_path / "blocks") == rows(tmp_path / "r1")
    assert_same_state(blocks.arrays.to_torch_state_dict(), per_message.arrays.to_torch_state_dict())


def test_an_evaluation_that_raises_abandons_the_round_opened_ahead_and_fails_the_run(
    tmp_path, monkeypatch, caplog
):
    """The run fails with round 1's results, as with a message per round; round 3, which the
    clients were training meanwhile, is abandoned rather than waited for."""

    def crash(metrics):
        raise RuntimeError("the evaluation crashed")

    monkeypatch.setattr(task, "evaluate", evaluation_changed_at(3, crash))  # round 2's
    with pytest.raises(RuntimeError, match="the evaluation crashed"):
        run(tmp_path / "r4", **{"rounds-per-message": 4})

    assert summary(tmp_path / "r4")["status"] == "failed"
    assert [r["round"] for r in rows(tmp_path / "r4")] == [1]
    abandoned = [r.getMessage() for r in caplog.records if "opened ahead" in r.getMessage()]
    assert len(abandoned) == 1
    assert "round 3, opened ahead, was abandoned: round 2 failed: the evaluation" in abandoned[0]


def test_a_run_that_fails_while_recording_abandons_the_round_opened_ahead(
    tmp_path, monkeypatch, caplog
):
    """Recording round 2 fails (a full disk) while the clients train round 3: the run fails,
    and round 3 is abandoned, its clients released, rather than left to time out."""
    real = RunRecorder.record

    def record(self, server_round, *args, **kwargs):
        if server_round == 2:
            raise OSError("no space left on device")
        return real(self, server_round, *args, **kwargs)

    monkeypatch.setattr(RunRecorder, "record", record)
    with pytest.raises(OSError, match="no space left"):
        run(tmp_path / "r4", **{"rounds-per-message": 4})

    assert summary(tmp_path / "r4")["status"] == "failed"
    abandoned = [r.getMessage() for r in caplog.records if "opened ahead" in r.getMessage()]
    assert len(abandoned) == 1
    assert "round 3, opened ahead, was abandoned: the run ended: OSError" in abandoned[0]


def test_a_run_stopped_inside_a_block_resumes_from_its_last_completed_round(tmp_path, monkeypatch):
    config = {"num-rounds": 5, "rounds-per-message": 3, "on-failure": "stop"}
    run(tmp_path / "whole", **config)

    # Round 2, the middle of the first block, fails: the run stops with round 1's model.
    fail_at(monkeypatch, node=1001, nth=2, fault=raise_error)
    result, _ = run(tmp_path / "parts", **config)
    assert summary(tmp_path / "parts")["status"] == "stopped"
    assert read_checkpoint(tmp_path / "parts")["round"] == 1
    monkeypatch.undo()

    _, grid = run(tmp_path / "parts", resume=True, **config)  # a fresh block from round 2
    assert message_types(grid).count(TRAIN_FEDTAN_BLOCK) == 2 * BASE["num-clients"]
    assert rows(tmp_path / "parts") == rows(tmp_path / "whole")
    assert_same_state(load_state_dict(tmp_path / "parts"), load_state_dict(tmp_path / "whole"))
    assert summary(tmp_path / "parts")["status"] == "completed"


# --- 3. the same failures ---------------------------------------------------------------------


def raise_error(result):
    raise RuntimeError("the client crashed")


def go_silent(result):
    time.sleep(SILENCE_S)  # longer than the reply timeout; then the thread ends
    return result


def other_entries(result):
    state = dict(result.state)  # as large as the model's (a larger one exceeds the size cap)
    state["fc9.bias"] = state.pop("fc2.bias")
    return dataclasses.replace(result, state=state)


def wrong_shape(result):
    state = dict(result.state)
    state["fc2.weight"] = state["fc2.weight"].t().contiguous()  # as many values, other shape
    return dataclasses.replace(result, state=state)


def not_finite(result):
    state = dict(result.state)
    state["conv1.weight"] = state["conv1.weight"].clone().fill_(math.nan)
    return dataclasses.replace(result, state=state)


# Short enough to keep the tests quick, long enough for an honest client: a run's first round
# builds every client's model at once, and under load (two test workers on 2 cores) one client
# once reached the first exchange 2 s after the others and was taken for the silent one.
SILENT_TIMEOUTS = {"reply-timeout": 4.0, "bn-sync-timeout": 4.0}
SILENCE_S = 9.0


def silent_in_the_sync(train):
    """A wrapper of a client's training: the client never reaches the synced step."""
    time.sleep(SILENCE_S)
    return train()


def fail_at(monkeypatch, *, node: int, nth: int, fault=None, around=None) -> None:
    """Node ``node``'s ``nth`` trained round (R = 1 or inside a block alike) ends with
    ``fault`` applied to its result, or runs inside ``around``."""
    real, count, lock = client_module._train_synced, [0], threading.Lock()

    def train(model, batches, settings, channel, context):
        hit = False
        if context.node_id == node:
            with lock:
                count[0] += 1
                hit = count[0] == nth
        if hit and around is not None:
            return around(lambda: real(model, batches, settings, channel, context))
        result = real(model, batches, settings, channel, context)
        return fault(result) if hit and fault is not None else result

    monkeypatch.setattr(client_module, "_train_synced", train)


@pytest.mark.parametrize(
    ("fault", "around", "timeouts", "protocol"),
    [
        (raise_error, None, {}, "grpc"),
        (go_silent, None, SILENT_TIMEOUTS, "grpc"),
        (None, silent_in_the_sync, SILENT_TIMEOUTS, "grpc"),
        (raise_error, None, {}, "socket"),
        (None, silent_in_the_sync, SILENT_TIMEOUTS, "socket"),
    ],
    ids=[
        "raises",
        "silent-after-the-sync",
        "silent-in-the-sync",
        "raises-socket",
        "silent-in-the-sync-socket",
    ],
)
def test_a_client_that_fails_inside_a_block_fails_the_round_which_is_retried_without_it(
    tmp_path, monkeypatch, caplog, fault, around, timeouts, protocol
):
    """Round 2 fails in the middle of a block; the retry starts from round 1's model without the
    culprit, exactly as with a message per round."""
    caplog.set_level(logging.INFO)
    fail_at(monkeypatch, node=1001, nth=2, fault=fault, around=around)
    per_round, _ = run(tmp_path / "r1", **timeouts)
    fail_at(monkeypatch, node=1001, nth=2, fault=fault, around=around)
    caplog.clear()
    blocks, _ = run(
        tmp_path / "r3", **timeouts, **{"rounds-per-message": 3, "bn-sync-protocol": protocol}
    )

    retries = [r.getMessage() for r in caplog.records if "Retrying without" in r.getMessage()]
    assert retries == ["Retrying without nodes [1001]"]
    assert [m["clients"] for m in blocks.train_metrics_clientapp.values()] == [4, 3, 3, 3]
    assert_same_state(blocks.arrays.to_torch_state_dict(), per_round.arrays.to_torch_state_dict())
    assert summary(tmp_path / "r3")["status"] == "completed"


def test_a_round_the_server_rejects_after_the_average_is_retried_in_a_new_block(
    tmp_path, monkeypatch, caplog
):
    """The strategy may still fail a round the block has averaged (a non-finite test loss): the
    retry starts from the last good model, as with a message per round."""

    def nan_loss(metrics):
        return {**metrics, "test-loss": math.nan}

    monkeypatch.setattr(task, "evaluate", evaluation_changed_at(3, nan_loss))  # round 2's
    per_round, _ = run(tmp_path / "r1")
    monkeypatch.setattr(task, "evaluate", evaluation_changed_at(3, nan_loss))
    caplog.clear()
    blocks, grid = run(tmp_path / "r3", **{"rounds-per-message": 3})

    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("Round 2 (attempt 1) failed" in f and "test loss is nan" in f for f in failures)
    # A block for rounds 1-2 (round 2 rejected), a new one for the retry of round 2 and 3-4.
    assert message_types(grid).count(TRAIN_FEDTAN_BLOCK) == 2 * BASE["num-clients"]
    assert_same_state(blocks.arrays.to_torch_state_dict(), per_round.arrays.to_torch_state_dict())
    assert summary(tmp_path / "r3")["status"] == "completed"


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        (other_entries, r"other entries: missing \['fc2.bias'\], extra \['fc9.bias'\]"),
        (
            wrong_shape,
            r"'fc2.weight' is torch.float32 \[64, 10\], the model's is torch.float32 \[10, 64\]",
        ),
        (not_finite, "'conv1.weight' has non-finite values"),
    ],
    ids=["other-keys", "wrong-shape", "nan"],
)
@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_a_bad_state_is_refused_naming_its_client(
    tmp_path, monkeypatch, caplog, fault, named, protocol
):
    fail_at(monkeypatch, node=1002, nth=2, fault=fault)
    result, _ = run(tmp_path / "out", **{"rounds-per-message": 3, "bn-sync-protocol": protocol})

    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("Round 2 (attempt 1) failed" in f and "client 1002" in f for f in failures)
    assert any(re.search(named, f) for f in failures), failures
    retries = [r.getMessage() for r in caplog.records if "Retrying without" in r.getMessage()]
    assert retries == ["Retrying without nodes [1002]"]
    assert [m["clients"] for m in result.train_metrics_clientapp.values()] == [4, 3, 3, 3]
    state = result.arrays.to_torch_state_dict()
    assert all(bool(t.double().isfinite().all()) for t in state.values())


def test_a_member_that_missed_a_round_while_not_sampled_gets_the_current_one():
    """Only the sampled clients' uploads hold the next round back: another member may still be
    busy when two rounds have been published, and must not fall out of the block for it."""
    block = Block(1, {"1": "a", "2": "b"}, spec=(), max_examples=1, poll=0.01)
    for seq in (0, 1):
        block.publish(seq, ["1"], {"1": b"plan-%d-1" % seq, "2": b"plan-%d-2" % seq})
    asked = BlockRequest(NEXT, -1, memoryview(b""))  # it last saw no round at all
    assert block.serve("2", asked) == b"plan-1-2"
    block.end("done")
    assert decode_plan(block.serve("2", BlockRequest(NEXT, 1, memoryview(b"")))).message == "done"


def test_an_upload_is_answered_with_the_next_rounds_plan_once_it_is_published():
    """A member's upload is also its ask for the next plan: one call a round, not two."""
    block = Block(1, {"1": "a"}, spec=(), max_examples=1, poll=30.0)
    block.publish(0, ["1"], {"1": b"plan-0"})
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(block.serve, "1", decode_block_request(_empty_upload(0)))
        (update,) = block.collect(timeout=30)
        assert (update.node, update.num_examples) == (1, 1)
        assert not answer.done()  # held until the next round is published
        block.publish(1, ["1"], {"1": b"plan-1"})
        assert answer.result(timeout=30) == b"plan-1"

        answer = pool.submit(block.serve, "1", decode_block_request(_empty_upload(1)))
        block.collect(timeout=30)
        block.end("the block's last round is done")
        assert decode_plan(answer.result(timeout=30)).message == "the block's last round is done"


def test_a_member_makes_one_block_call_per_round_it_trains(tmp_path, monkeypatch):
    """Every call costs the service and the client CPU that the round's training shares: after
    its first plan, a member sampled every round only uploads (the answer is the next plan)."""
    kinds: list[int] = []
    serve = Block.serve

    def counted(self, client_id, request):
        kinds.append(request.kind)
        return serve(self, client_id, request)

    monkeypatch.setattr(Block, "serve", counted)
    run(tmp_path / "out", **{"rounds-per-message": 4})

    members, rounds = BASE["num-clients"], BASE["num-rounds"]
    assert kinds.count(UPLOAD) == members * rounds
    # One NEXT per member for its first plan; more only if a plan took a whole poll to come.
    assert members <= kinds.count(NEXT) < members * rounds


def _empty_upload(seq: int) -> bytes:
    return encode_upload(seq, 1, 0.5, 0, encode_state({}))


# --- security: the block's calls go through the service's gate and caps -----------------------


@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_a_block_runs_over_tls_when_configured(tmp_path, protocol):
    from tests.certs import make_certs

    certs = tmp_path / "certs"
    make_certs(certs)
    tls = {
        "bn-sync-protocol": protocol,
        "bn-sync-certfile": str(certs / "server.pem"),
        "bn-sync-keyfile": str(certs / "server.key"),
        "bn-sync-ca-certfile": str(certs / "ca.pem"),
    }
    result, grid = run(tmp_path / "out", **tls, **{"rounds-per-message": 3, "num-rounds": 3})
    blocks = [m for m in grid.sent if m.metadata.message_type == TRAIN_FEDTAN_BLOCK]
    assert len(blocks) == BASE["num-clients"]
    for message in blocks:
        config = message.content.config_records[CONFIG_RECORD]
        assert "BEGIN CERTIFICATE" in config[BN_SYNC_ROOT_CERTIFICATES]
    cfg = RunConfig.from_flower({**BASE, "num-rounds": 3})
    assert_is_the_in_process_model(result.arrays.to_torch_state_dict(), cfg, BASE["num-clients"])


def test_a_state_frame_is_exact_or_refused():
    """A state travels as itself (every dtype a model holds, bit for bit), and any truncated or
    padded frame is refused before anything is allocated from its claims."""
    state = {
        "w": torch.randn(3, 4),
        "half": torch.randn(5).half(),
        "brain": torch.randn(2).bfloat16(),
        "double": torch.randn(2, dtype=torch.float64),
        "count": torch.tensor(7),
        "mask": torch.tensor([True, False]),
    }
    frame = encode_state(state)
    assert len(frame) == state_size(state_spec(state))
    assert_same_state(decode_state(frame, state_spec(state)), state)
    for cut in range(len(frame)):
        with pytest.raises(BNSyncError):
            decode_state(frame[:cut])
    with pytest.raises(BNSyncError, match="trailing bytes"):
        decode_state(frame + b"\0")


@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_block_calls_need_the_blocks_credential_and_fit_the_models_size(tmp_path, protocol):
    cfg = RunConfig.from_flower(BASE)
    state = task.build_global_model(cfg).state_dict()
    spec = state_spec(state)
    limits = Limits(max_block_request=block_request_size(spec), max_block_reply=plan_size(spec))
    # The service's timeout is also its connections' age: a call that outlives it is cut off
    # (UNAVAILABLE), and gRPC refuses an oversized request only after 0.1-1 s. 30 s keeps that
    # race out of a test about credentials and sizes.
    with BNSyncService(timeout=30.0, max_clients=2, limits=limits, protocol=protocol) as service:
        block, credentials = service.open_block(7, ["1", "2"], spec, max_examples=12)
        plans = {c: encode_plan(0, 1, 0.1, None, credentials[c], encode_state(state)) for c in "12"}
        block.publish(0, ["1"], plans)

        def ask(credential: str, request: bytes) -> tuple[grpc.StatusCode, bytes]:
            connection = connect(protocol, f"127.0.0.1:{service.port}")
            try:
                reply = connection.call(BLOCK_METHOD, Caller(7, "1", credential), request, 30)
            except CallFailed as error:
                return error.code, b""
            finally:
                connection.close()
            return grpc.StatusCode.OK, reply

        assert ask("not-the-credential", encode_next(-1))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert ask(credentials["2"], encode_next(-1))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert ask(credentials["1"], encode_next(-1)) == (grpc.StatusCode.OK, plans["1"])
        # The cap is the model's own size: a state twice as large never reaches a handler.
        bigger = {**state, "extra": torch.zeros(sum(t.numel() for t in state.values()))}
        upload = encode_upload(0, 12, 1.0, 0, encode_state(bigger))
        assert len(upload) > block_request_size(spec)
        assert ask(credentials["1"], upload)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The same upload at the model's own size is taken, and answered with the next plan.
        fitting = encode_upload(0, 12, 1.0, 0, encode_state(state))
        later = {c: encode_plan(1, 2, 0.1, None, credentials[c], encode_state(state)) for c in "12"}

        def next_round() -> None:
            block.collect(timeout=30)
            block.publish(1, ["1"], later)

        threading.Thread(target=next_round, daemon=True).start()
        assert ask(credentials["1"], fitting) == (grpc.StatusCode.OK, later["1"])


# --- 4. config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"rounds-per-message": 0}, "'rounds-per-message' must be >= 1, got 0"),
        ({"rounds-per-message": 2.5}, "'rounds-per-message': expected int"),
        (
            {"rounds-per-message": 2, "transport": "messages"},
            "'rounds-per-message' = 2 needs method 'fedtan' and transport 'grpc'.*'messages'",
        ),
        (
            {"rounds-per-message": 2, "transport": "messages", "method": "fedavg-bn"},
            "'rounds-per-message' = 2 needs method 'fedtan'.*'fedavg-bn'",
        ),
    ],
)
def test_a_wrong_rounds_per_message_fails_at_start_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_flower({**BASE, **override})


# --- under Flower's Ray simulation -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "socket"])
def test_blocks_under_the_ray_simulation_give_the_in_process_engine_model(tmp_path, protocol):
    """``flwr run . local``: 3 simulated SuperNodes on 3 Ray actors, 6 rounds in blocks of 5
    (one of 5, one of 1), the service's calls over ``protocol``; every process started is
    stopped (tests/test_flower_runtime.py)."""
    from tests.test_flower_runtime import SIMULATION_TIMEOUT_S, assert_same_model, reference_config
    from tests.test_resume import simulate

    out = tmp_path / "out"
    run_config = {
        "dataset": "digits",
        "model": "small_cnn",
        "batch-size": 12,
        "local-steps": 2,
        "momentum": 0.9,
        "num-clients": 3,
        "num-rounds": 6,
        "output-dir": str(out),
        "transport": "grpc",
        "rounds-per-message": 5,
        "bn-sync-protocol": protocol,
    }
    simulate(tmp_path, "blocks", run_config, Deadline(SIMULATION_TIMEOUT_S), actors=3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["rounds_completed"] == 6, summary
    assert_same_model(out / "model.pt", reference_config(run_config), 3)
