"""The run folder: it belongs to one run, its files survive a kill at any moment, its model
describes itself, and a failed round or a failed run is never mistaken for a good one.

Runs are the real server and client code over the in-memory Grid (``server/local_run.py``);
the kill test runs a recorder in a subprocess and SIGKILLs it while it writes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Result

from client.app import app as client_app
from common.experiment import task
from common.experiment.config import RunConfig
from common.protocol import MODEL_RECORD, TRAIN_FEDTAN
from server import results
from server.app import STOPPED_BY_FLOWER
from server.checkpoint import evaluate_run, load_model, load_state_dict, read_checkpoint
from server.local_run import run_locally
from server.results import RunFolderError, RunRecorder

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "num-clients": 3,
    "batch-size": 12,
    "num-rounds": 2,
    "max-retries": 1,
}


def run(out: Path, faults=None, **overrides):
    return run_locally(client_app, {**BASE, "output-dir": str(out), **overrides}, faults=faults)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --- the checkpoint describes itself ---------------------------------------------------------


def test_the_saved_model_rebuilds_and_evaluates_from_the_run_folder_alone(tmp_path):
    out = tmp_path / "out"
    result, _ = run(out)
    model = load_model(out)
    final = result.arrays.to_torch_state_dict()
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)
    assert not model.training
    assert set(load_model(out / "model.pt").state_dict()) == set(final)

    checkpoint = read_checkpoint(out)
    cfg = RunConfig.from_flower({**BASE, "output-dir": str(out)})
    test = task.eval_dataset(cfg)
    assert checkpoint["round"] == 2
    assert (checkpoint["model"], checkpoint["norm"]) == ("small_cnn", "batch")
    assert (checkpoint["in_channels"], checkpoint["num_classes"]) == (1, 10)
    assert (checkpoint["data_mean"], checkpoint["data_std"]) == (list(test.mean), list(test.std))
    assert checkpoint["run_config"] == json.loads((out / "config.json").read_text())
    assert RunConfig.from_flower(checkpoint["run_config"]) == cfg

    # The same numbers the run reported for its last round, recomputed from the folder.
    final_row = summary(out)["final"]
    evaluated = evaluate_run(out)
    assert evaluated == {k: final_row[k] for k in ("test-loss", "test-accuracy")}


def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(ValueError, match="bare.pt is not a FedTAN checkpoint"):
        load_model(bare)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_model(tmp_path)


# --- a folder belongs to one run --------------------------------------------------------------


@pytest.mark.parametrize(
    "second",
    [{}, {"lr": 0.05}, {"method": "fedavg-bn"}],
    ids=["the same config", "another lr", "another method"],
)
def test_a_folder_with_results_is_refused_and_left_untouched(tmp_path, second):
    out = tmp_path / "out"
    run(out)
    before = folder_bytes(out)
    with pytest.raises(RunFolderError, match=f"{out}.*'resume = true'.*'overwrite = true'"):
        run(out, **second)
    assert folder_bytes(out) == before


def test_a_folder_with_another_runs_config_and_no_results_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = {**RunConfig.from_flower({**BASE, "lr": 0.05}).to_flower(), "output-dir": str(out)}
    (out / "config.json").write_text(json.dumps(other))
    with pytest.raises(RunFolderError, match="holds another run"):
        run(out)
    assert json.loads((out / "config.json").read_text()) == other


def test_overwrite_replaces_every_file_of_the_old_run_and_only_those(tmp_path):
    out = tmp_path / "out"
    run(out, **{"num-rounds": 3, "checkpoint-interval": 1})
    (out / "notes.txt").write_text("the user's own file")
    run(out, overwrite=True, lr=0.05)
    assert summary(out)["rounds_completed"] == 2
    assert json.loads((out / "config.json").read_text())["lr"] == 0.05
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [1, 2]
    assert not (out / "checkpoints").exists()  # round 1..3 checkpoints of the old run
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_config_json_keeps_the_run_not_how_the_folder_was_opened(tmp_path):
    out = tmp_path / "out"
    run(out, overwrite=True)
    saved = json.loads((out / "config.json").read_text())
    assert saved["overwrite"] is False and saved["resume"] is False
    assert RunConfig.from_flower(saved).to_flower() == saved


# --- summary.json tells how the run ended -----------------------------------------------------


def evaluate_then(monkeypatch, after_calls: int, then):
    """``task.evaluate`` as usual for its first ``after_calls`` calls (round 0, round 1, ...),
    then ``then(model, cfg)``."""
    real, calls = task.evaluate, []

    def evaluate(model, cfg, *args, **kwargs):
        calls.append(1)
        if len(calls) <= after_calls:
            return real(model, cfg, *args, **kwargs)
        return then(model, cfg)

    monkeypatch.setattr(task, "evaluate", evaluate)


def test_an_exception_in_the_server_app_is_written_down_and_raised(tmp_path, monkeypatch):
    def broken(model, cfg):
        raise RuntimeError("the disk is full")

    evaluate_then(monkeypatch, 2, broken)  # rounds 0 and 1 evaluate, round 2 raises
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the disk is full"):
        run(out)
    ended = summary(out)
    assert ended["status"] == "failed"
    assert "RuntimeError: the disk is full" in ended["reason"]
    assert (ended["rounds_completed"], ended["num_rounds"]) == (1, 2)
    assert read_checkpoint(out)["round"] == 1
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [1]


def test_a_run_that_fails_before_its_first_round_says_so(tmp_path, monkeypatch):
    def no_data(cfg):
        raise FileNotFoundError("no CIFAR-10 under data/")

    monkeypatch.setattr(task, "build_global_model", no_data)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        run(out)
    ended = summary(out)
    assert (ended["status"], ended["rounds_completed"]) == ("failed", 0)
    assert "no CIFAR-10 under data/" in ended["reason"]


def test_a_round_whose_model_evaluates_to_a_nan_loss_fails_and_is_never_saved(
    tmp_path, monkeypatch
):
    evaluate_then(monkeypatch, 2, lambda model, cfg: {"test-loss": math.nan, "test-accuracy": 0})
    out = tmp_path / "out"
    result, _ = run(out, **{"num-rounds": 3})  # max-retries 1: round 2 twice, then stop
    assert sorted(result.train_metrics_clientapp) == [1]
    ended = summary(out)
    assert ended["status"] == "stopped"
    assert "round 2 failed" in ended["reason"] and "test loss is nan" in ended["reason"]
    assert ended["rounds_completed"] == 1
    assert read_checkpoint(out)["round"] == 1
    assert_saved_is(out, result)


def nan_in_train_reply(reply: Message) -> Message:
    """A client whose train reply carries a model with a NaN weight."""
    if reply.metadata.message_type != TRAIN_FEDTAN or reply.has_error():
        return reply
    state = reply.content.array_records[MODEL_RECORD].to_torch_state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = math.nan
    reply.content[MODEL_RECORD] = ArrayRecord(state)
    return reply


def test_a_round_whose_averaged_model_is_not_finite_fails_and_is_never_saved(tmp_path):
    out = tmp_path / "out"
    result, _ = run(out, faults={1001: nan_in_train_reply}, **{"on-failure": "stop"})
    assert result.train_metrics_clientapp == {}
    ended = summary(out)
    assert ended["status"] == "stopped" and "non-finite" in ended["reason"]
    assert ended["rounds_completed"] == 0
    assert not (out / "model.pt").exists()


def test_a_summary_left_running_is_closed_by_whoever_stopped_the_run(tmp_path):
    out = tmp_path / "out"
    run(out)
    completed = summary(out)
    # A summary that tells how its run ended is the ServerApp's word: it stays as it is.
    assert results.close_abandoned_run(out, "interrupted", "stopped by SIGINT") == completed
    assert summary(out) == completed
    # As a ServerApp killed while writing round 2 leaves it: the model is round 2's, the
    # summary still "running" at round 1.
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    abandoned = {**completed, "status": "running", "rounds_completed": 1, "final": first}
    (out / "summary.json").write_text(json.dumps(abandoned))

    closed = results.close_abandoned_run(out, "interrupted", "stopped by SIGINT")

    assert closed == {**completed, "status": "interrupted", "reason": "stopped by SIGINT"}
    assert summary(out) == closed
    assert results.close_abandoned_run(out, "failed", "later") == closed  # closed once
    assert results.close_abandoned_run(tmp_path / "no-run", "failed", "x") is None


def assert_saved_is(out: Path, result: Result) -> None:
    saved, final = load_state_dict(out), result.arrays.to_torch_state_dict()
    assert all(torch.equal(saved[k], final[k]) for k in final)


# --- checkpoints and TensorBoard --------------------------------------------------------------


@pytest.mark.parametrize(("interval", "keep", "kept"), [(2, 1, [4]), (1, 2, [4, 5]), (0, 3, [])])
def test_checkpoints_every_n_rounds_keep_the_last_few(tmp_path, interval, keep, kept):
    out = tmp_path / "out"
    result, _ = run(
        out, **{"num-rounds": 5, "checkpoint-interval": interval, "checkpoint-keep": keep}
    )
    files = sorted((out / "checkpoints").glob("*"))
    assert [f.name for f in files] == [f"round-{r:06d}.pt" for r in kept]
    assert [read_checkpoint(f)["round"] for f in files] == kept
    if 5 in kept:  # the last round's checkpoint is the final model
        assert files[-1].read_bytes() == (out / "model.pt").read_bytes()


def test_a_rounds_seconds_run_from_the_previous_rounds_end_so_they_add_up_to_the_run(
    tmp_path, monkeypatch
):
    """What happens between two rounds (here a recording made slow on purpose) is part of the
    next round's seconds, as it is of the run's wall time."""
    pause = 0.5
    real_record = RunRecorder.record

    def slow_record(self, *args, **kwargs):
        real_record(self, *args, **kwargs)
        time.sleep(pause)

    monkeypatch.setattr(RunRecorder, "record", slow_record)
    out = tmp_path / "out"
    started = time.monotonic()
    run(out, **{"num-rounds": 3})
    wall = time.monotonic() - started
    seconds = [row["seconds"] for row in json.loads((out / "metrics.json").read_text())]
    assert all(s >= pause for s in seconds[1:]), seconds
    assert sum(seconds) <= wall


def test_tensorboard_events_hold_every_rounds_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run(out, **{"num-rounds": 3})
    assert list(out.glob(results.EVENTS_GLOB))
    events = EventAccumulator(str(out))
    events.Reload()
    rows = json.loads((out / "metrics.json").read_text())
    for key in ("train-loss", "test-accuracy", "seconds"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6)


def test_without_tensorboard_no_event_files_are_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "out"
    run(out)
    assert summary(out)["status"] == "completed"
    assert not list(out.glob(results.EVENTS_GLOB))


# --- durable writes ---------------------------------------------------------------------------


def test_every_round_is_appended_to_the_log_and_the_views_are_rewritten_ever_less_often(
    tmp_path, monkeypatch
):
    """A 10,000-round run must not rewrite files that grow with it every round: the log takes
    one line per round, metrics.json/csv are rewritten every round for the first 100 rounds,
    then once the run has grown by 1 %; at the end they hold every row."""
    out = tmp_path / "out"
    rounds = 400
    cfg = RunConfig.from_flower({**BASE, "output-dir": str(out), "num-rounds": rounds})
    recorder = RunRecorder(cfg)
    real_write, rewrites = results.atomic_write, []

    def counting_write(path, data):
        rewrites.append(Path(path).name)
        real_write(path, data)

    monkeypatch.setattr(results, "atomic_write", counting_write)
    state = ArrayRecord({"weight": torch.zeros(3)})
    for server_round in range(1, rounds + 1):
        result = Result(arrays=state)
        result.train_metrics_clientapp[server_round] = MetricRecord({"train-loss": 1.0})
        recorder.record(server_round, result, {"seconds": 0.0})
        recorder.flush()
        logged = results.read_metrics_log(out / "metrics.jsonl")
        assert [row["round"] for row in logged] == list(range(1, server_round + 1))
    recorder.finish("completed")

    views = rewrites.count("metrics.json")
    assert rewrites.count("model.pt") == rounds  # the model: every round
    assert views == rewrites.count("metrics.csv")
    # 100 rewrites, then one per 1 % of growth: log(4) / log(1.01) = 140 more, and the end.
    assert 100 < views <= 100 + math.ceil(math.log(rounds / 100) / math.log(1.01)) + 1
    assert_consistent(out, settled=True)


def rendered_afresh(rows: list[dict]) -> tuple[bytes, bytes]:
    """metrics.json and metrics.csv as rendering every row anew writes them."""
    finite = [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        for row in rows
    ]
    text = io.StringIO(newline="")
    fields = dict.fromkeys([*results.COLUMNS, *(key for row in rows for key in row)])
    writer = csv.DictWriter(text, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    return json.dumps(finite, indent=2).encode(), text.getvalue().encode()


def test_the_views_are_exactly_every_row_rendered_afresh(tmp_path):
    """The views keep each row's text and join it with the new rows' at a rewrite: the files
    are byte for byte what rendering every row anew writes, also when a later row brings a new
    column and when a value is not finite."""
    views = results.MetricsViews(tmp_path)
    views.write([])
    assert (tmp_path / "metrics.json").read_bytes() == b"[]"
    rows = []
    for r in range(1, 9):
        row = {"round": r, "train-loss": 1.0 / r, "seconds": 0.25}
        if r >= 5:
            row["accuracy-spread"] = 0.01 * r  # a column no earlier row has
        if r == 6:
            row["train-loss"] = float("nan")
        rows.append(row)
        if r in (1, 3, 5, 6, 8):  # one row, several at once, the new column, a NaN
            views.write(rows)
            expected_json, expected_csv = rendered_afresh(rows)
            assert (tmp_path / "metrics.json").read_bytes() == expected_json
            assert (tmp_path / "metrics.csv").read_bytes() == expected_csv
            assert views.rows == r


def test_a_views_rewrite_renders_only_the_rows_that_are_new(tmp_path, monkeypatch):
    """Each row is rendered once (its CSV line again only when a new column appears), so a run
    that rewrites its views every round does work linear in its rows, not quadratic."""
    json_rows, csv_rows = [], []
    real_json, real_csv = results._json_text, results._csv_lines
    monkeypatch.setattr(results, "_json_text", lambda v: json_rows.append(v) or real_json(v))

    def counting_csv(fields, rows, *, header):
        rows = list(rows)
        csv_rows.extend(rows)
        return real_csv(fields, rows, header=header)

    monkeypatch.setattr(results, "_csv_lines", counting_csv)
    views, rows, rounds, new_column_at = results.MetricsViews(tmp_path), [], 300, 200
    for r in range(1, rounds + 1):
        rows.append({"round": r, "seconds": 0.1, **({"extra": 1.0} if r >= new_column_at else {})})
        views.write(rows)
    assert len(json_rows) == rounds
    assert len(csv_rows) == rounds + new_column_at - 1  # the rows before it, once more
    assert [(p.name, p.read_bytes()) for p in sorted(tmp_path.iterdir())] == list(
        zip(["metrics.csv", "metrics.json"], reversed(rendered_afresh(rows)), strict=True)
    )


def record_round(recorder: RunRecorder, server_round: int) -> None:
    result = Result(arrays=ArrayRecord({"weight": torch.full((3,), float(server_round))}))
    result.train_metrics_clientapp[server_round] = MetricRecord({"train-loss": 1.0})
    recorder.record(server_round, result, {"seconds": 0.0})


def test_a_rounds_files_are_written_while_the_next_round_runs_one_round_at_a_time(
    tmp_path, monkeypatch
):
    """The disk's flushes are not the clients' to wait for: ``record`` hands the writes to a
    thread and returns; the next ``record`` waits until they are done, so rounds reach the
    disk in order."""
    out = tmp_path / "out"
    recorder = RunRecorder(RunConfig.from_flower({**BASE, "output-dir": str(out)}))
    real_write, may_write, writing = results.atomic_write, threading.Event(), threading.Event()

    def slow_model_write(path, data):
        if Path(path).name == "model.pt":
            writing.set()
            assert may_write.wait(timeout=10), "the test never let the write finish"
        real_write(path, data)

    monkeypatch.setattr(results, "atomic_write", slow_model_write)
    record_round(recorder, 1)  # returns although round 1's model is not written yet
    assert writing.wait(timeout=60)
    assert not (out / "model.pt").exists()

    second = threading.Thread(target=record_round, args=(recorder, 2))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "round 2 was recorded before round 1 was on disk"
    may_write.set()
    second.join(timeout=60)
    assert not second.is_alive()
    recorder.flush()
    assert read_checkpoint(out)["round"] == 2
    assert [row["round"] for row in results.read_metrics_log(out / "metrics.jsonl")] == [1, 2]
    recorder.finish("completed")
    assert summary(out)["status"] == "completed"
    assert_consistent(out, settled=True)


def test_an_interrupt_waits_for_the_round_being_written_and_then_ends_the_run(
    tmp_path, monkeypatch
):
    """What a ServerApp that Flower stops does in its exit handler (``RunRecorder.interrupt``):
    the summary says "interrupted" only once the round in flight is on disk (a write still
    going when the wait runs out leaves it "running": a later write would contradict it), and
    the exception the stop then raises in the ServerApp changes nothing."""
    out = tmp_path / "out"
    recorder = RunRecorder(RunConfig.from_flower({**BASE, "output-dir": str(out)}))
    real_write, may_write = results.atomic_write, threading.Event()

    def slow_model_write(path, data):
        if Path(path).name == "model.pt":
            assert may_write.wait(timeout=10), "the test never let the write finish"
        real_write(path, data)

    monkeypatch.setattr(results, "atomic_write", slow_model_write)
    record_round(recorder, 1)

    recorder.interrupt("stopped", timeout=0.2)
    assert summary(out)["status"] == "running"
    may_write.set()
    recorder.interrupt("stopped")
    ended = summary(out)
    assert (ended["status"], ended["reason"], ended["rounds_completed"]) == (
        "interrupted",
        "stopped",
        1,
    )
    recorder.finish("failed", "SystemExit: 1")  # run_fedtan's handler, as the stop unwinds it
    assert summary(out) == ended
    assert_consistent(out, settled=True)


def recorder_whose_disk_fills_at_round_2(out: Path, monkeypatch) -> RunRecorder:
    """A recorder into ``out`` whose append of round 2's metrics row fails: a full disk."""
    recorder = RunRecorder(RunConfig.from_flower({**BASE, "output-dir": str(out)}))
    real_append = results.append_durably

    def full_disk(path, line):
        if b'"round": 2' in line:
            raise OSError(28, "No space left on device")
        real_append(path, line)

    monkeypatch.setattr(results, "append_durably", full_disk)
    return recorder


def test_a_write_that_fails_is_raised_at_the_next_round_and_the_run_says_it_failed(
    tmp_path, monkeypatch
):
    out = tmp_path / "out"
    recorder = recorder_whose_disk_fills_at_round_2(out, monkeypatch)
    record_round(recorder, 1)
    record_round(recorder, 2)  # its write fails in the background ...
    with pytest.raises(OSError, match="No space left"):
        record_round(recorder, 3)  # ... and stops the run at the next round
    recorder.finish("failed", "OSError: No space left on device")
    assert summary(out)["status"] == "failed"
    assert [row["round"] for row in results.read_metrics_log(out / "metrics.jsonl")] == [1]
    assert_consistent(out)


def test_an_interrupt_after_a_write_that_failed_says_the_run_failed_and_why(tmp_path, monkeypatch):
    out = tmp_path / "out"
    recorder = recorder_whose_disk_fills_at_round_2(out, monkeypatch)
    record_round(recorder, 1)
    record_round(recorder, 2)  # its write fails in the background

    with pytest.raises(OSError, match="No space left"):
        recorder.interrupt("stopped")

    ended = summary(out)
    assert ended["status"] == "failed"
    assert "round 2" in ended["reason"] and "No space left" in ended["reason"]
    assert ended["rounds_completed"] == 1
    assert_consistent(out)


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_last_round_whose_write_fails_makes_finish_tell_and_raise_it(
    tmp_path, monkeypatch, status
):
    out = tmp_path / "out"
    recorder = recorder_whose_disk_fills_at_round_2(out, monkeypatch)
    record_round(recorder, 1)
    record_round(recorder, 2)
    with pytest.raises(OSError, match="No space left"):
        recorder.finish(status, "a client vanished" if status == "failed" else None)
    ended = summary(out)
    assert ended["status"] == "failed"
    assert "round 2" in ended["reason"] and "No space left" in ended["reason"]
    if status == "failed":  # the run's own reason comes first
        assert ended["reason"].startswith("a client vanished; then writing")
    assert_consistent(out)


def test_a_torn_last_line_of_the_log_is_dropped_at_the_next_start(tmp_path):
    out = tmp_path / "out"
    run(out, **{"num-rounds": 2})
    log = out / "metrics.jsonl"
    # As if killed while appending round 2's row: the model of round 2 is saved already.
    whole = log.read_bytes()
    log.write_bytes(whole[: whole.index(b"\n") + 1] + b'{"round": 2, "train-lo')
    result, _ = run(out, resume=True, **{"num-rounds": 3})
    assert summary(out)["status"] == "completed"
    assert_consistent(out, settled=True)
    logged = results.read_metrics_log(log)
    assert logged[:2] == [json.loads(line) for line in whole.splitlines()]  # round 2 restored
    assert [row["round"] for row in logged] == [1, 2, 3]


def test_a_write_interrupted_before_its_rename_leaves_the_old_files_and_is_cleaned(
    tmp_path, monkeypatch
):
    out = tmp_path / "out"
    run(out, **{"num-rounds": 1})
    before = folder_bytes(out)
    real_replace, renamed = os.replace, []

    def fail_to_rename_the_metrics(src, dst):
        if Path(dst).name == "metrics.json" and "model.pt" in renamed:  # round 2's
            raise OSError("the rename never happened")
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", fail_to_rename_the_metrics)
    with pytest.raises(OSError, match="the rename never happened"):
        run(out, resume=True, **{"num-rounds": 2})
    monkeypatch.setattr(results.os, "replace", real_replace)

    assert (out / "metrics.json.partial").exists()
    assert read_checkpoint(out)["round"] == 2  # the model came first ...
    for name in ("metrics.json", "metrics.csv"):  # ... its metrics are still the old ones
        assert (out / name).read_bytes() == before[name]
    assert summary(out)["status"] == "failed"
    assert_consistent(out)

    result, _ = run(out, resume=True, **{"num-rounds": 2})
    assert not list(out.rglob("*.partial"))
    assert summary(out)["status"] == "completed"
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [1, 2]


def assert_consistent(out: Path, *, settled: bool = False) -> None:
    """Every file whole and of this run; written in the order model, metrics log (whose last
    line alone may be torn), summary, each may lag the one before by a round; metrics.json and
    metrics.csv hold a prefix of the log's rows, and all of them once ``settled`` (a new start
    has rewritten them)."""
    config = json.loads((out / "config.json").read_text())
    logged = [row["round"] for row in results.read_metrics_log(out / "metrics.jsonl")]
    view = [row["round"] for row in json.loads((out / "metrics.json").read_text())]
    with open(out / "metrics.csv", newline="") as f:
        csv_rounds = [int(row["round"]) for row in csv.DictReader(f)]
    ended = json.loads((out / "summary.json").read_text())
    checkpoint = read_checkpoint(out)
    assert logged == list(range(1, len(logged) + 1))
    assert view == logged[: len(view)]
    assert csv_rounds in (view, view[:-1])
    assert checkpoint["run_config"] == config
    assert len(logged) in (checkpoint["round"], checkpoint["round"] - 1)
    assert ended["rounds_completed"] in (checkpoint["round"], checkpoint["round"] - 1)
    if settled:
        assert csv_rounds == view == logged == list(range(1, checkpoint["round"] + 1))
        assert (out / "metrics.jsonl").read_bytes().endswith(b"\n")


KILLS = 4
WRITER = """
import sys
from tests.test_results import write_rounds_forever
write_rounds_forever(sys.argv[1])
"""


def write_rounds_forever(out: str) -> None:
    """A run that never ends: records a round after round (a large model: long writes)."""
    cfg = RunConfig.from_flower({**BASE, "output-dir": out, "resume": True, "num-rounds": 10**6})
    recorder = RunRecorder(cfg)
    server_round = recorder.rounds_completed
    while True:
        server_round += 1
        state = {"weight": torch.full((2_000_000,), float(server_round))}
        result = Result(arrays=ArrayRecord(state))
        result.train_metrics_clientapp[server_round] = MetricRecord({"train-loss": 1.0})
        recorder.record(server_round, result, {"seconds": 0.0})
        print(server_round, flush=True)


@pytest.mark.slow
def test_a_kill_at_any_moment_of_writing_leaves_a_consistent_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = RunConfig.from_flower({**BASE, "output-dir": str(out), "num-rounds": 10**6})
    (out / "config.json").write_bytes(results._json(results.run_description(cfg)))
    leftovers = 0
    for kill in range(KILLS):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        try:
            for _ in range(2 + kill % 3):  # a few rounds, then a kill at some point of a write
                assert writer.stdout.readline(), "the writer died"
            time.sleep(0.05 * kill)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
            writer.stdout.close()
        assert_consistent(out)
        assert json.loads((out / "summary.json").read_text())["status"] == "running"
        leftovers += bool(list(out.rglob("*.partial")))
        # Who stopped it closes the summary at the model's round; the next start resumes there.
        closed = results.close_abandoned_run(out, "interrupted", "stopped by SIGKILL")
        done = read_checkpoint(out)["round"]
        assert (closed["status"], closed["rounds_completed"]) == ("interrupted", done)
        assert closed["final"]["round"] == done and summary(out) == closed
    print(f"{leftovers} of {KILLS} kills left a partial write behind")
    RunRecorder(RunConfig.from_flower({**cfg.to_flower(), "resume": True}))
    assert not list(out.rglob("*.partial"))
    assert_consistent(out, settled=True)


STOPPED_SERVER_APP = """
import sys, time
from flwr.supercore.exit import add_exit_handler, register_signal_handlers
from flwr.supercore.telemetry import EventType
from client.app import app as client_app
from server.local_run import run_locally
from tests.test_results import BASE

# As flwr-serverapp: Flower's signal handlers, and an exit handler of Flower's own that outlasts
# its force-exit timer (a stopped run's ServerApp cannot push its output), so the process ends
# by os._exit before any exception reaches the app.
register_signal_handlers(EventType.FLWR_SERVERAPP_RUN_LEAVE, "Task stopped by user.",
                         exit_handlers=[lambda: time.sleep(60)])
run_locally(client_app, {**BASE, "num-rounds": 10**6, "output-dir": sys.argv[1]})
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_server_app_that_flower_stops_says_interrupted_at_its_last_written_round(tmp_path, sig):
    out = tmp_path / "out"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    server_app = subprocess.Popen(
        [sys.executable, "-c", STOPPED_SERVER_APP, str(out)], cwd=REPO, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "summary.json").exists() or summary(out)["rounds_completed"] < 2:
            assert server_app.poll() is None, "the ServerApp died"
            assert time.monotonic() < deadline, "no round 2 within 120 s"
            time.sleep(0.05)
        # What ``flwr stop`` does to a deployed ServerApp: Flower's client sends it SIGINT.
        server_app.send_signal(sig)
        server_app.wait(timeout=60)
    finally:
        server_app.kill()
        server_app.wait()

    ended, done = summary(out), read_checkpoint(out)["round"]
    assert (ended["status"], ended["reason"]) == ("interrupted", STOPPED_BY_FLOWER)
    assert ended["rounds_completed"] == done >= 2
    assert ended["final"]["round"] == done
    assert_consistent(out, settled=True)
    # ``fedtan run``, which knows who stopped it, may name the signal; nothing else changes.
    closed = results.close_abandoned_run(
        out, "interrupted", "stopped by SIGINT", replacing=("running", "interrupted")
    )
    assert closed == {**ended, "reason": "stopped by SIGINT"}
    run(out, resume=True, **{"num-rounds": done + 1})
    assert summary(out)["status"] == "completed"
    assert [row["round"] for row in results.read_metrics_log(out / "metrics.jsonl")] == list(
        range(1, done + 2)
    )
