"""The ``fedtan`` command, run as a user runs it: the installed console script, exit codes asserted.

* Mistakes are found before Flower starts: an unknown key is named with the closest valid one,
  a wrong value in one line, exit code 2, nothing created.
* A config file and ``--set`` overrides merge over the app's defaults.
* A run folder belongs to one run: another run into it is refused unless ``--overwrite``.
* A completed run exits 0, its last line names the folder and the final accuracy; a failed run
  exits non-zero with a one-line reason; SIGINT (Ctrl-C) and SIGTERM in the middle of a round
  (or of a block of rounds) exit 128 + N, with the run folder's summary "interrupted" at its
  last completed round, which the last line names. In every case nothing the command started
  is left running (its whole process family, followed through ``/proc`` while it runs,
  including the detached local SuperLink and Ray's processes) and the local SuperLink's ports
  are closed. On a federation, Ctrl-C stops the run there, and its ServerApp says
  "interrupted" in its folder itself.
* A federation with fewer SuperNodes than clients fails after ``min-nodes-timeout``, saying how
  many connected and what to do.

Ray simulations cost 30-120 s each here, so the Flower runs are few and each checks several
things. Budget per command: ``FEDTAN_CLI_TEST_TIMEOUT_S`` (default 600 s).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.app import app as client_app
from common.experiment.config import RunConfig
from common.transports.base import FailureKind, RoundFailure
from server.app import STOPPED_BY_FLOWER
from server.checkpoint import read_checkpoint
from server.cli.launch import FlowerRun
from server.cli.progress import Progress
from server.cli.run import verdict
from server.local_run import run_locally
from server.processes import (
    Deadline,
    ManagedProcess,
    flower_env,
    port_open,
    process_table,
    start_local_deployment,
    stop_processes,
)
from server.strategy import RoundStrategy

FEDTAN = Path(sys.executable).parent / "fedtan"
APP_DIR = Path(__file__).resolve().parents[1]
TIMEOUT_S = float(os.environ.get("FEDTAN_CLI_TEST_TIMEOUT_S", 600))
GONE_WITHIN_S = 10.0  # after the command exits, a process it started may take this to vanish
USAGE_ERROR = 2

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc"
)

# A small, quick experiment: 3 clients on the digits.
SMALL = 'dataset = "digits"\nmodel = "small_cnn"\nnum-clients = 3\nbatch-size = 16\nlr = 0.05\n'


@dataclass
class Finished:
    returncode: int
    stdout: list[str]
    stderr: str
    left_running: list[str]  # processes of the command's family still alive after it exited
    ports_open: list[int]  # ports of the local SuperLink it started, still accepting
    seconds_after_signal: float | None = None
    seen: list[str] = field(default_factory=list)  # command lines of its family, for messages


def fedtan(
    *args: str | Path,
    cwd: Path,
    signal_when: str | None = None,
    sig: int = signal.SIGINT,
    env: dict[str, str] | None = None,
) -> Finished:
    """Run the installed command; with ``signal_when``, send ``sig`` to its process group (as a
    terminal's Ctrl-C does) once a line of its output starts with that text."""
    proc = subprocess.Popen(
        [str(FEDTAN), *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    family = ManagedProcess("fedtan", proc.pid, proc)
    stdout: list[str] = []
    stderr: list[str] = []
    readers = [
        threading.Thread(target=lambda: stdout.extend(line.rstrip("\n") for line in proc.stdout)),
        threading.Thread(target=lambda: stderr.append(proc.stderr.read())),
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    signalled_at = None
    seen: set[str] = set()  # every command line a member had when looked at
    try:
        while proc.poll() is None:
            table = process_table()
            seen.update(table[pid].cmdline for pid in family.refresh(table))
            if signal_when and signalled_at is None:
                if any(line.startswith(signal_when) for line in stdout):
                    os.killpg(proc.pid, sig)
                    signalled_at = time.monotonic()
            if time.monotonic() > deadline:
                pytest.fail(f"fedtan {' '.join(map(str, args))}: not done in {TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        exited_at = time.monotonic()
        alive = family.refresh()
        while alive and time.monotonic() < exited_at + GONE_WITHIN_S:
            time.sleep(0.2)
            alive = family.refresh()
        table = process_table()
        left = [f"{pid} {table[pid].cmdline[:150]}" for pid in sorted(alive) if pid in table]
    finally:
        stop_processes([family])  # whatever a failing test left behind
        for reader in readers:
            reader.join(timeout=10)
    ports = [port for cmdline in seen for port in _superlink_ports(cmdline)]
    return Finished(
        returncode=proc.returncode,
        stdout=stdout,
        stderr="".join(stderr),
        left_running=left,
        ports_open=[port for port in ports if port_open(port)],
        seconds_after_signal=None if signalled_at is None else exited_at - signalled_at,
        seen=sorted(seen),
    )


def _superlink_ports(cmdline: str) -> list[int]:
    if "flower-superlink" not in cmdline:
        return []
    found = re.findall(r"--port (\d+)|--control-api-address \S*:(\d+)", cmdline)
    return [int(port) for pair in found for port in pair if port]


@contextmanager
def local_federation(tmp_path: Path, name: str, supernodes: int) -> Iterator[dict[str, str]]:
    """A SuperLink and ``supernodes`` SuperNodes on 127.0.0.1, as federation ``name`` of the
    Flower environment it yields (``fedtan run --federation name`` with ``env=``); all of them
    stopped on the way out."""
    env = flower_env(tmp_path / "flwr-home")
    procs: list[ManagedProcess] = []
    try:
        start_local_deployment(
            supernodes,
            env=env,
            log_dir=tmp_path / "logs",
            cwd=APP_DIR,
            deadline=Deadline(TIMEOUT_S),
            procs=procs,
            federation=name,
        )
        yield env
    finally:
        stop_processes(procs)


def assert_nothing_left(done: Finished) -> None:
    assert not done.left_running, f"still running after fedtan exited: {done.left_running}"
    assert not done.ports_open, f"local SuperLink ports still open: {done.ports_open}"


def saved_config(run_dir: Path) -> dict[str, object]:
    """The run folder's config by Flower's key names (older folders used field names)."""
    saved = json.loads((run_dir / "config.json").read_text())
    return {key.replace("_", "-"): value for key, value in saved.items()}


# --- mistakes found before Flower starts -------------------------------------------------------


def test_an_unknown_key_is_named_with_the_closest_valid_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(SMALL + "local-step = 2\n")
    out = tmp_path / "out"

    in_file = fedtan("run", config, "--out", out, cwd=tmp_path)
    as_override = fedtan("run", "--set", "num-round=3", "--out", out, cwd=tmp_path)

    assert in_file.returncode == USAGE_ERROR
    assert in_file.stderr.strip().splitlines() == [
        f"fedtan run: error: unknown run config key 'local-step' ({config}); "
        "did you mean 'local-steps'?"
    ]
    assert as_override.returncode == USAGE_ERROR
    assert "'num-round' (--set); did you mean 'num-rounds'?" in as_override.stderr
    assert not out.exists()
    assert_nothing_left(in_file)


def test_a_wrong_value_is_named_in_one_line(tmp_path):
    negative = fedtan("run", "--set", "lr=-0.1", cwd=tmp_path)
    not_a_number = fedtan("run", "--set", "num-rounds=many", cwd=tmp_path)

    assert negative.returncode == USAGE_ERROR
    assert negative.stderr.strip().splitlines() == [
        "fedtan run: error: run config 'lr' must be > 0, got -0.1"
    ]
    assert not_a_number.returncode == USAGE_ERROR
    assert not_a_number.stderr.strip().splitlines() == [
        "fedtan run: error: run config 'num-rounds': expected int, got 'many'"
    ]
    assert "Traceback" not in negative.stderr + not_a_number.stderr


def test_the_file_and_the_overrides_are_checked_together(tmp_path):
    # Each is valid alone; together 4 clients per round exceed 3 clients.
    config = tmp_path / "run.toml"
    config.write_text("clients-per-round = 4\n")

    alone = fedtan("run", config, "--set", "num-clients=3", cwd=tmp_path)

    assert alone.returncode == USAGE_ERROR
    assert "'clients-per-round' (4) exceeds 'num-clients' (3)" in alone.stderr


# --- evaluate ----------------------------------------------------------------------------------


def test_evaluate_prints_the_test_loss_and_accuracy_of_a_run_folder(tmp_path):
    out = tmp_path / "run"
    run_locally(
        client_app,
        {"num-clients": 3, "num-rounds": 1, "batch-size": 16, "output-dir": str(out)},
    )
    final = json.loads((out / "summary.json").read_text())["final"]

    done = fedtan("evaluate", out, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout[-1] == (
        f"{out}: test loss {final['test-loss']:.4f}, test accuracy {final['test-accuracy']:.4f}"
    )


def test_evaluate_names_a_missing_run_folder(tmp_path):
    done = fedtan("evaluate", tmp_path / "nowhere", cwd=tmp_path)

    assert done.returncode == USAGE_ERROR
    assert done.stderr.strip() == f"fedtan evaluate: error: {tmp_path / 'nowhere'} is not a folder"


# --- runs through Flower ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_completes_owns_its_folder_and_a_failed_run_exits_non_zero(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(SMALL + "num-rounds = 5\n")
    out = tmp_path / "out"

    done = fedtan("run", config, "--set", "num-rounds=2", "--out", out, cwd=tmp_path)

    assert done.returncode == 0, "\n".join(done.stdout) + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    accuracy = summary["final"]["test-accuracy"]
    assert done.stdout[-1] == (
        f"fedtan: completed 2 rounds; results in {out}; final test accuracy {accuracy:.4f}"
    )
    rounds = [line for line in done.stdout if line.startswith("round ")]
    assert [line.split()[1] for line in rounds] == ["1/2", "2/2"], done.stdout
    assert not any("evaluation will be skipped" in line for line in done.stdout)
    merged = saved_config(out)
    assert (merged["num-rounds"], merged["num-clients"], merged["lr"]) == (2, 3, 0.05)
    assert_nothing_left(done)

    model = (out / "model.pt").stat()
    again = fedtan("run", config, "--set", "num-rounds=2", "--out", out, cwd=tmp_path)

    assert again.returncode == USAGE_ERROR
    assert f"output folder {out} is not empty" in again.stderr
    assert "--overwrite" in again.stderr
    assert (out / "model.pt").stat().st_mtime_ns == model.st_mtime_ns

    # --resume continues the run in its folder, here extended to a third round.
    resumed = fedtan("run", "--resume", out, "--set", "num-rounds=3", cwd=tmp_path)

    assert resumed.returncode == 0, "\n".join(resumed.stdout) + resumed.stderr
    rounds = [line for line in resumed.stdout if line.startswith("round ")]
    assert [line.split()[1] for line in rounds] == ["3/3"], resumed.stdout
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert_nothing_left(resumed)

    # CIFAR-10 is not on this machine and cannot be downloaded: the ServerApp fails at start.
    failed = fedtan(
        "run",
        config,
        "--overwrite",
        "--out",
        out,
        "--set",
        'dataset="cifar10"',
        "--set",
        f'data-dir="{tmp_path / "no-data"}"',
        cwd=tmp_path,
    )

    assert failed.returncode == 1, "\n".join(failed.stdout)
    assert failed.stdout[-1].startswith("fedtan: FAILED: "), failed.stdout
    assert not (out / "model.pt").exists(), "--overwrite left the previous run's model"
    assert_nothing_left(failed)


BLOCKS = 'transport = "grpc"\nrounds-per-message = 50\n'


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, extra, rounds",
    [(signal.SIGINT, "", 200), (signal.SIGTERM, BLOCKS, 2000)],
    ids=["SIGINT", "SIGTERM-in-a-block-of-rounds"],
)
def test_a_signal_in_the_middle_of_a_run_stops_every_process_it_started(
    tmp_path, sig, extra, rounds
):
    config = tmp_path / "run.toml"
    config.write_text(SMALL + extra + f"num-rounds = {rounds}\n")
    out = tmp_path / "out"

    stopped = fedtan("run", config, "--out", out, cwd=tmp_path, signal_when="round 1/", sig=sig)

    name = signal.Signals(sig).name
    assert stopped.returncode == 128 + sig, "\n".join(stopped.stdout) + stopped.stderr
    started = "\n".join(cmd[:120] for cmd in stopped.seen)
    assert any("flower-superlink" in cmd for cmd in stopped.seen), "no SuperLink:\n" + started
    assert any(cmd.startswith("ray::") for cmd in stopped.seen), "no Ray actor:\n" + started
    assert_nothing_left(stopped)
    # Stopped, not killed: inside a block the ServerApp trains on without its SuperLink, and
    # gets a SIGTERM, which it obeys, before the SIGKILL that would be named here (a Ray
    # worker on a loaded machine may still need one: it has nothing to write).
    killed = [line for line in stopped.stdout if ": killed " in line]
    assert not [line for line in killed if "flwr-simulation" in line], killed
    assert stopped.seconds_after_signal < 60, stopped.seconds_after_signal
    # The folder tells how far the run got, and so does the last line (the log runs behind).
    ended = json.loads((out / "summary.json").read_text())
    done = read_checkpoint(out)["round"]
    assert (ended["status"], ended["reason"]) == ("interrupted", f"stopped by {name}")
    assert ended["rounds_completed"] == done >= 1
    assert stopped.stdout[-1].startswith(f"fedtan: stopped by {name} after {done} of {rounds} ")


@pytest.mark.slow
def test_ctrl_c_of_a_run_on_a_federation_stops_it_there_and_its_folder_says_interrupted(tmp_path):
    """On a federation the command cannot close the folder (it may be on another machine): it
    stops the run through Flower (``flwr stop``), whose ServerApp writes "interrupted" itself
    before Flower ends its process. Here the SuperLink runs on this machine, so the folder is
    readable; in a block of rounds the ServerApp does not wait on the SuperLink at all."""
    config = tmp_path / "run.toml"
    config.write_text(SMALL + BLOCKS + "num-rounds = 2000\n")
    out = tmp_path / "out"
    with local_federation(tmp_path, "here", supernodes=3) as env:
        stopped = fedtan(
            "run",
            config,
            "--federation",
            "here",
            "--out",
            out,
            cwd=tmp_path,
            env=env,
            signal_when="round 1/",
        )
        deadline = Deadline(60)  # Flower's stop reaches the ServerApp with its next heartbeat
        while json.loads((out / "summary.json").read_text())["status"] == "running":
            assert deadline.remaining() > 0, "the stopped run's summary still says running"
            time.sleep(0.2)

    assert stopped.returncode == 128 + signal.SIGINT, "\n".join(stopped.stdout) + stopped.stderr
    last = stopped.stdout[-1]
    assert last.startswith("fedtan: stopped by SIGINT after "), stopped.stdout
    assert re.search(r"; run \d+ stopped on federation 'here'; ", last), last
    assert_nothing_left(stopped)
    ended = json.loads((out / "summary.json").read_text())
    done = read_checkpoint(out)["round"]
    assert (ended["status"], ended["reason"]) == ("interrupted", STOPPED_BY_FLOWER)
    assert ended["rounds_completed"] == done >= 1
    assert ended["final"]["round"] == done


def test_ctrl_c_before_a_run_was_submitted_to_a_federation_says_so(tmp_path):
    flower = FlowerRun(
        project_dir=APP_DIR,
        federation="far",
        run_config=tmp_path / "run.toml",
        federation_config={},
        env=flower_env(tmp_path / "flwr-home"),
        log_dir=tmp_path,  # no log yet: flwr run has printed no run id
        flwr_home=None,
    )
    assert flower.cancel_remote() == "no run was submitted to federation 'far'"
    flower.log_path.write_text("🎊 Successfully started run 1234\n")
    assert flower.cancel_remote(timeout=0.01).startswith("`flwr stop 1234 far` ")


class KilledServerAppRun:
    """What ``verdict`` reads of a local run whose ServerApp was killed: ``flwr run`` exited 0,
    Flower calls the run failed, every process is stopped."""

    flwr_home = Path("flwr-home")
    log_path = Path("flwr-run.log")

    def returncode(self) -> int:
        return 0


def test_a_run_whose_server_app_died_without_a_word_fails_and_its_folder_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    started = time.time()
    run_locally(client_app, {**tomllib.loads(SMALL), "num-rounds": 2, "output-dir": str(out)})
    # Killed while writing round 2: the model is round 2's, the summary still "running".
    ended = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**ended, "status": "running"}))
    cfg = RunConfig.from_flower({**tomllib.loads(SMALL), "num-rounds": 4})

    code = verdict(KilledServerAppRun(), cfg, out, tmp_path, Progress(), "finished:failed", started)

    reason = "Flower reports the run as finished:failed"
    assert code == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"fedtan: FAILED: {reason}; 2 of 4 rounds completed (Flower's log: flwr-run.log)"
    )
    assert json.loads((out / "summary.json").read_text()) == {
        **ended,
        "status": "failed",
        "reason": reason,
    }


def test_a_folder_it_cannot_close_is_named_and_the_verdict_still_comes_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"status": "running", "rounds_completed": 3}))
    (out / "model.pt").write_bytes(b"not a checkpoint")
    cfg = RunConfig.from_flower({**tomllib.loads(SMALL), "num-rounds": 4})

    code = verdict(
        KilledServerAppRun(), cfg, out, tmp_path, Progress(), "finished:failed", time.time()
    )

    shown = capsys.readouterr().out.splitlines()
    assert code == 1
    assert shown[0].startswith(f"fedtan: warning: could not close {out / 'summary.json'}: ")
    assert shown[-1] == (
        "fedtan: FAILED: Flower reports the run as finished:failed; 3 of 4 rounds completed "
        "(Flower's log: flwr-run.log)"
    )


# --- a federation with too few SuperNodes -------------------------------------------------------


@pytest.mark.slow
def test_a_federation_with_too_few_supernodes_fails_after_the_wait_with_a_hint(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(SMALL + "num-rounds = 2\nmin-nodes-timeout = 5.0\n")
    with local_federation(tmp_path, "small", supernodes=2) as env:
        done = fedtan(
            "run", config, "--federation", "small", "--out", tmp_path / "out", cwd=tmp_path, env=env
        )

    assert done.returncode == 1, "\n".join(done.stdout) + done.stderr
    assert done.stdout[-1].startswith("fedtan: FAILED: "), done.stdout
    shown = "\n".join(done.stdout)
    assert "only 2 of 3 clients (SuperNodes) connected within 5 s" in shown
    assert "start 1 more SuperNode(s)" in shown and "min-nodes-timeout" in shown
    assert_nothing_left(done)


class FewNodesGrid:
    """Just what the wait needs of a Grid: 3 nodes connected, for good."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


def test_too_few_supernodes_fail_after_the_wait_with_a_hint():
    strategy = RoundStrategy(num_clients=5, min_nodes_timeout=0.5)
    started = time.monotonic()

    with pytest.raises(RoundFailure) as failure:
        strategy.sample_nodes(FewNodesGrid(), 1, timeout=60.0)

    took = time.monotonic() - started
    assert failure.value.kind is FailureKind.NO_CLIENTS
    message = str(failure.value)
    assert "only 3 of 5 clients (SuperNodes) connected within 0.5 s" in message
    assert "start 2 more SuperNode(s)" in message
    assert "min-nodes-timeout" in message
    assert 0.5 <= took < 60.0, took  # the run's key bounds the wait, not the exchange timeout
