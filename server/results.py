"""A run's output folder: the global model, per-round metrics (CSV, JSON, TensorBoard), a summary.

A folder belongs to one run. ``config.json`` names it; a run refuses a folder that holds
another run's config or any results, unless run config ``overwrite`` (clear it first) or
``resume`` (continue it from its last completed round) says otherwise.

Durable: every file is written to a temporary name, flushed to disk and renamed over the old
one, so a kill at any moment leaves each file whole, old or new; the leftovers of an
interrupted write are removed at the next start. After every good round the model
(``model.pt``, a self-describing checkpoint: ``server/checkpoint.py``) is written before the
metrics that announce it, then ``summary.json``, whose ``status`` is "running" until the run
ends "completed", "stopped" (a round failed for good), "failed" (an exception) or
"interrupted" (Flower stopped the ServerApp: ``flwr stop``, or a signal to its process; it says so
itself in Flower's exit handlers, ``RunRecorder.interrupt``). A ServerApp killed cannot say so;
whoever stopped it and saw its processes gone closes the summary for it
(``close_abandoned_run``: "interrupted" or "failed").

The metrics of every round are appended to ``metrics.jsonl`` (one JSON row per line, flushed to
disk): the record a resume reads, written in time proportional to a row, whatever the run's
length; a line torn by a kill is dropped at the next start. ``metrics.json`` and
``metrics.csv`` are whole-file views of it that grow with the run (at 10,000 rounds a rewrite
takes about 0.4 s, longer than a GPU round), so they are rewritten only once the run has
grown by ``VIEW_GROWTH`` since their last rewrite (every round for the first 100, then every
1 % of the rounds so far) and always at its end: their total cost stays linear in the run.
``checkpoint-interval`` = N also keeps ``checkpoints/round-<N k>.pt``, the last
``checkpoint-keep`` of them. TensorBoard event files are written next to ``metrics.csv`` when
``tensorboard`` is installed (``pip install fedtan[tensorboard]``).

A round's files are written while the next round trains (``WriteBehind``): the disk's flushes
(about 9 ms a round here) are not the clients' to wait for. One round is in flight at most, so
the rounds reach the disk in order, a kill loses at most the round being written (a resumed run
computes it again, to the same model), and a write that fails raises at the next round, in
``flush`` or in ``finish``, which then tells that the run failed.

Every method writes the same per-round ``COLUMNS`` (then any extra ones, e.g. the spread of the
clients' accuracies when they evaluate): train loss (of each client's first step, weighted by
samples; the union batch's for FedTAN and centralized), test loss and accuracy (of the global
model; the clients' mean for FedBN and SiloBN; blank between ``eval-interval`` rounds), wall
seconds (from the previous round's end: training, evaluation and the bookkeeping between
rounds, so that they add up to the run's time), sequential round trips, bytes of the model
(down and up together) and of the extra BN statistics (down, up) of training, and round trips
and bytes of client-side evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import textwrap
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common import log
from flwr.serverapp.strategy import Result
from torch import Tensor

from common.experiment.config import RunConfig
from common.state_records import record_to_state
from server.checkpoint import MODEL_FILE, make_checkpoint, read_checkpoint, run_description

COLUMNS = (
    "round",
    "train-loss",
    "num-examples",
    "clients",
    "test-loss",
    "test-accuracy",
    "seconds",
    "round_trips",
    "model_bytes",
    "bn_bytes_down",
    "bn_bytes_up",
    "eval_round_trips",
    "eval_bytes",
)

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_LOG = "metrics.jsonl"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
VIEW_GROWTH = 0.01  # metrics.json/csv are rewritten once the run has grown by this share
CHECKPOINT_DIR = "checkpoints"
EVENTS_GLOB = "events.out.tfevents.*"
INTERRUPT_WAIT_S = 5.0  # how long a stopped ServerApp waits for the round being written
PARTIAL = ".partial"  # suffix of a file being written; removed at the next start
RESULT_FILES = (MODEL_FILE, METRICS_LOG, METRICS_JSON, METRICS_CSV, SUMMARY_FILE)

# Run config keys a resumed run may change: none of them changes the model of a round.
RESUMABLE_CHANGES = frozenset(
    {
        "num-rounds",
        "resume",
        "overwrite",
        "output-dir",
        "transport",
        "reply-timeout",
        "eval-interval",
        "on-failure",
        "max-retries",
        "checkpoint-interval",
        "checkpoint-keep",
        "bn-sync-host",
        "bn-sync-port",
        "bn-sync-address",
        "bn-sync-timeout",
        "bn-sync-certfile",
        "bn-sync-keyfile",
        "bn-sync-ca-certfile",
        "bn-sync-protocol",
    }
)


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (it holds another one)."""


@dataclass
class ResumePoint:
    """Where a resumed run continues: after ``rounds_done``, from ``state``."""

    rounds_done: int = 0
    state: dict[str, Tensor] | None = None
    excluded_partitions: set[int] = field(default_factory=set)
    rows: list[dict[str, float]] = field(default_factory=list)


class RunRecorder:
    """Writes what a run produced into ``cfg.output_dir``, round by round.

    Opening it claims the folder (see the module doc) and reads ``resume_point`` from it.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.output_path
        self.resume_point = claim_run_folder(cfg)
        self.rows = list(self.resume_point.rows)
        self.rounds_completed = self.resume_point.rounds_done
        self.started = time.monotonic()
        self.first_round = self.rounds_completed + 1  # of this process (for the ETA)
        atomic_write(self.dir / CONFIG_FILE, _json(run_description(cfg)))
        self.views = MetricsViews(self.dir)
        if self.rows:  # a resumed run: the log may lack the last round's row, or be torn
            atomic_write(self.dir / METRICS_LOG, b"".join(_log_line(row) for row in self.rows))
            self.views.write(self.rows)
        self._write_summary("running", reason=None)
        self.events = _event_writer(self.dir, purge_step=self.first_round)
        self._writes = WriteBehind()
        self._round_in_flight = 0
        self.ended = False  # the summary says how the run ended; nothing more is written

    def record(
        self,
        server_round: int,
        result: Result,
        cost: Mapping[str, float],
        excluded_partitions: Iterable[int] = (),
    ) -> None:
        """Round ``server_round`` is complete: its model, then its metrics, then the summary are
        written in the background (the previous round's are on disk first; if they could not
        be written, that error is raised here)."""
        self._writes.wait()
        row: dict[str, float] = {"round": server_round}
        row.update(result.train_metrics_clientapp.get(server_round, {}))
        row.update(result.evaluate_metrics_serverapp.get(server_round, {}))
        row.update(result.evaluate_metrics_clientapp.get(server_round, {}))
        row.update(cost)
        self._log(row)
        # The strategy replaces ``result.arrays`` each round, never changes it: safe to read
        # while the next round runs.
        arrays, excluded = result.arrays, frozenset(excluded_partitions)
        self._writes.start(lambda: self._write_round(server_round, row, arrays, excluded))
        self._round_in_flight = server_round

    def flush(self) -> None:
        """Wait until every round recorded so far is on disk; a write that failed raises."""
        self._writes.wait()

    def _write_round(
        self,
        server_round: int,
        row: dict[str, float],
        arrays: ArrayRecord,
        excluded: frozenset[int],
    ) -> None:
        buffer = io.BytesIO()
        torch.save(
            make_checkpoint(
                self.cfg,
                server_round,
                record_to_state(arrays),
                excluded_partitions=excluded,
                row=row,
            ),
            buffer,
        )
        atomic_write(self.dir / MODEL_FILE, buffer.getvalue())
        if self.cfg.checkpoint_interval and server_round % self.cfg.checkpoint_interval == 0:
            self._keep_checkpoint(server_round, buffer.getvalue())
        append_durably(self.dir / METRICS_LOG, _log_line(row))
        self.rows.append(row)  # only now: the views and the summary never run ahead of the log
        self.rounds_completed = server_round
        if len(self.rows) - self.views.rows >= VIEW_GROWTH * self.views.rows:
            self.views.write(self.rows)
        self._write_summary("running", reason=None)
        if self.events is not None:
            for key, value in row.items():
                if key != "round" and isinstance(value, int | float):
                    self.events.add_scalar(key, value, server_round)
            self.events.flush()

    def finish(self, status: str, reason: str | None = None) -> None:
        """How the run ended: "completed", "stopped", "failed" or "interrupted", and why. If the
        last round's files could not be written, the run failed: that is written down (after the
        reason given, if any) and raised. Once the run has ended, later calls change nothing."""
        if self.ended:
            return
        self.ended = True
        write_error: BaseException | None = None
        try:
            self._writes.wait()
        except Exception as error:  # noqa: BLE001 - re-raised below, once the summary is written
            write_error = error
            failure = (
                f"writing the results of round {self._round_in_flight}: "
                f"{type(error).__name__}: {error}"
            )
            # A run failing already keeps its own reason first.
            reason = f"{reason}; then {failure}" if status == "failed" and reason else failure
            status = "failed"
        try:
            if self.views.rows != len(self.rows):
                self.views.write(self.rows)
        finally:  # how the run ended is told even when the views cannot be written
            self._write_summary(status, reason)
        if self.events is not None:
            self.events.close()
            self.events = None
        if write_error is not None:
            raise write_error

    def interrupt(self, reason: str, timeout: float = INTERRUPT_WAIT_S) -> None:
        """The process is being stopped in the middle of the run: once the round being written
        is on disk, the summary says "interrupted" at the last round written, and nothing more
        is written. For Flower's exit handlers, which run on the main thread wherever the stop
        found it, before Flower ends the process; a write still going after ``timeout``
        seconds leaves the summary "running" (``close_abandoned_run`` is for that)."""
        if self.ended:
            return
        if not self._writes.join(timeout):
            log(
                WARNING,
                "Round %d still being written %g s after the stop; summary.json left running",
                self._round_in_flight,
                timeout,
            )
            return
        self.finish("interrupted", reason)  # a write that failed makes it "failed", and why

    def _write_summary(self, status: str, reason: str | None) -> None:
        summary = {
            "method": self.cfg.method,
            "status": status,
            "rounds_completed": self.rounds_completed,
            "num_rounds": self.cfg.num_rounds,
            "reason": reason,
            "final": self.rows[-1] if self.rows else None,
        }
        atomic_write(self.dir / SUMMARY_FILE, _json(summary))

    def _keep_checkpoint(self, server_round: int, data: bytes) -> None:
        folder = self.dir / CHECKPOINT_DIR
        folder.mkdir(exist_ok=True)
        atomic_write(folder / f"round-{server_round:06d}.pt", data)
        kept = sorted(folder.glob("round-*.pt"))
        for old in kept[: max(0, len(kept) - self.cfg.checkpoint_keep)]:
            old.unlink()

    def _log(self, row: Mapping[str, float]) -> None:
        server_round = int(row["round"])
        elapsed = time.monotonic() - self.started
        eta = elapsed / (server_round - self.first_round + 1) * (self.cfg.num_rounds - server_round)
        accuracy = row.get("test-accuracy")
        log(
            INFO,
            "[%s round %d/%d] train-loss %.4f | test-accuracy %s | %.1f s | eta %.0f s",
            self.cfg.method,
            server_round,
            self.cfg.num_rounds,
            row.get("train-loss", float("nan")),
            "-" if accuracy is None else f"{accuracy:.4f}",
            row["seconds"],
            eta,
        )


class MetricsViews:
    """``metrics.json`` and ``metrics.csv`` of a run folder: every row so far, as whole files.

    Each row is rendered once and its text kept, so that a rewrite joins the rows rendered
    before with the new ones (the CSV's rows again only when a new column appears). Rendered
    afresh at every rewrite, the views cost 2-3 ms of the ServerApp's CPU a round at any
    run length (a rewrite every 1 % of growth costs all the rows), where rounds take tens of
    ms. The files are exactly what ``json.dumps(rows, indent=2)`` and ``csv.DictWriter`` write.
    """

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._json_rows: list[str] = []  # each row's text inside metrics.json's list
        self._fields: dict[str, None] = dict.fromkeys(COLUMNS)  # the CSV's columns, in order
        self._csv_rows: list[str] = []  # each batch of rows' CSV lines, with those columns
        self.rows = 0  # rows in the files

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite both files with ``rows``, of which the first ``self.rows`` are unchanged."""
        new = rows[self.rows :]
        self._json_rows += [textwrap.indent(_json_text(row), "  ") for row in new]
        listed = ",\n".join(self._json_rows)
        atomic_write(self._folder / METRICS_JSON, f"[\n{listed}\n]".encode() if rows else b"[]")
        columns = len(self._fields)
        self._fields.update((key, None) for row in new for key in row)
        if len(self._fields) != columns:  # a new column: every row's line changes
            self._csv_rows, new = [], rows
        self._csv_rows.append(_csv_lines(list(self._fields), new, header=False))
        header = _csv_lines(list(self._fields), (), header=True)
        atomic_write(self._folder / METRICS_CSV, "".join([header, *self._csv_rows]).encode())
        self.rows = len(rows)


def _csv_lines(fields: list[str], rows: Iterable[Mapping[str, Any]], *, header: bool) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


class WriteBehind:
    """Runs one job at a time in a thread of its own: ``start`` hands over a job (after
    ``wait``), ``wait`` joins the job in flight and raises what it raised."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, job: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="fedtan-results")
        self._thread.start()

    def wait(self) -> None:
        self.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def join(self, timeout: float | None = None) -> bool:
        """Whether the job in flight, if any, is done within ``timeout`` seconds; an error it
        raised stays for ``wait``."""
        # A signal handler may find ``start`` between creating the thread and starting it: that
        # job never runs (the handler ends the process).
        if self._thread is None or self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as error:  # noqa: BLE001 - handed to the thread that waits
            self._error = error


# --- the folder belongs to one run -----------------------------------------------------------


def claim_run_folder(cfg: RunConfig) -> ResumePoint:
    """Make ``cfg.output_dir`` this run's, or raise ``RunFolderError`` having touched nothing.

    A fresh run takes a missing or empty folder, or one with the same config and no results;
    ``overwrite`` clears this app's files from it first; ``resume`` continues the run in it
    (same config but for ``RESUMABLE_CHANGES``) from its last completed round.
    """
    folder = cfg.output_path
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run config 'output-dir': {folder} is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    saved = _saved_config(folder)
    if cfg.overwrite:
        clear_run_folder(folder)
        return ResumePoint()
    if cfg.resume:
        if saved is None:
            raise RunFolderError(f"cannot resume: {folder} holds no run ({CONFIG_FILE} missing)")
        changed = _differences(saved, run_description(cfg), ignore=RESUMABLE_CHANGES)
        if changed:
            raise RunFolderError(
                f"cannot resume the run in {folder}: run config {changed} differs from its "
                f"{CONFIG_FILE}; only {sorted(RESUMABLE_CHANGES)} may change"
            )
        if cfg.method == "fixbn" and RunConfig.from_flower(saved).fixbn_switch != cfg.fixbn_switch:
            raise RunFolderError(
                f"cannot resume the run in {folder}: FixBN's switch round would move; "
                "set 'fixbn-switch-round' to keep it"
            )
        remove_partial_writes(folder)
        return _resume_point(folder)
    holds = [name for name in RESULT_FILES if (folder / name).exists()]
    holds += [p.name for p in folder.glob(EVENTS_GLOB)]
    if (folder / CHECKPOINT_DIR).exists():
        holds.append(CHECKPOINT_DIR)
    other = saved is not None and _differences(saved, run_description(cfg), ignore={"output-dir"})
    if holds or other:
        what = f"the results of a run ({', '.join(sorted(holds))})" if holds else "another run"
        raise RunFolderError(
            f"run config 'output-dir': {folder} holds {what}; set 'resume = true' to continue "
            "it, 'overwrite = true' to replace it, or choose another 'output-dir'"
        )
    remove_partial_writes(folder)
    return ResumePoint()


def clear_run_folder(folder: Path) -> None:
    """Remove this app's files from ``folder`` (nothing else in it)."""
    for name in (CONFIG_FILE, *RESULT_FILES):
        (folder / name).unlink(missing_ok=True)
    for events in folder.glob(EVENTS_GLOB):
        events.unlink()
    shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
    remove_partial_writes(folder)


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete what an interrupted ``atomic_write`` left behind; return what was deleted."""
    leftovers = [*folder.glob(f"*{PARTIAL}"), *(folder / CHECKPOINT_DIR).glob(f"*{PARTIAL}")]
    for path in leftovers:
        path.unlink()
    return leftovers


def close_abandoned_run(
    folder: Path, status: str, reason: str, replacing: Collection[str] = ("running",)
) -> dict[str, Any] | None:
    """Say how the run in ``folder`` ended when its ServerApp could not: killed, its summary
    still says "running". Only for a caller that knows the ServerApp's processes are gone
    (nothing else writes the folder any more).

    A summary whose status is one of ``replacing`` becomes ``status`` with ``reason`` (a caller
    that stopped the run itself knows why better than the ServerApp's "interrupted"); its
    rounds completed and final row are the model's, the round a resume continues from (a kill
    may have cut the summary short of it). Returns the summary as it now stands, or None when
    ``folder`` holds none.
    """
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    if summary.get("status") not in replacing:
        return summary
    last = _last_completed_round(folder)
    summary.update(
        status=status,
        reason=reason,
        rounds_completed=last.rounds_done,
        final=last.rows[-1] if last.rows else None,
    )
    atomic_write(folder / SUMMARY_FILE, _json(summary))
    return summary


def _resume_point(folder: Path) -> ResumePoint:
    point = _last_completed_round(folder)
    if point.state is not None:
        log(INFO, "Resuming the run in %s after round %d", folder, point.rounds_done)
    return point


def _last_completed_round(folder: Path) -> ResumePoint:
    if not (folder / MODEL_FILE).exists():  # stopped before its first round completed
        return ResumePoint()
    checkpoint = read_checkpoint(folder)
    done = int(checkpoint["round"])
    rows = read_metrics_log(folder / METRICS_LOG)
    # The model is written before the metrics: they may lack its round's row, never more.
    rows = [row for row in rows if row["round"] < done]
    if checkpoint["metrics"]:
        rows.append(checkpoint["metrics"])
    return ResumePoint(done, checkpoint["state_dict"], set(checkpoint["excluded_partitions"]), rows)


def _saved_config(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise RunFolderError(f"{path} is not a run's config ({error})") from None
    if not isinstance(saved, dict):
        raise RunFolderError(f"{path} is not a run's config")
    return saved


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any], ignore: Iterable[str]):
    ignore = set(ignore)
    keys = (set(saved) | set(wanted)) - ignore
    return sorted(k for k in keys if saved.get(k) != wanted.get(k))


# --- durable writes --------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new file, whole."""
    partial = path.with_name(path.name + PARTIAL)
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    _fsync_folder(path.parent)  # the rename itself must reach the disk


def append_durably(path: Path, line: bytes) -> None:
    """Append ``line`` to ``path`` and flush it to disk; a crash may tear only this line."""
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics log, without a last line that a kill tore (or none: no log)."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if any(lines[number:]):  # only the last line may be torn
                raise ValueError(f"{path}: line {number} is not a JSON row") from None
    return rows


def _log_line(row: Mapping[str, Any]) -> bytes:
    return json.dumps(_finite_or_none(dict(row))).encode() + b"\n"


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(value: object) -> bytes:
    return _json_text(value).encode()


def _json_text(value: object) -> str:
    # NaN/inf become null: JSON has no such numbers, and a reader must not choke on them.
    return json.dumps(_finite_or_none(value), indent=2)


def _finite_or_none(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _event_writer(folder: Path, purge_step: int):
    """TensorBoard's writer into ``folder``, or None when tensorboard is not installed.

    ``purge_step``: events of that round and later from an earlier process are dropped, so a
    resumed run's curves do not double back."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: no event files without it
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)
