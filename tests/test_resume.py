"""Resume: a run continues from its last completed round and ends with exactly the model of a
run that was never interrupted (``torch.equal``, in process), and under Flower's Ray
simulation with the ServerApp process SIGKILLed mid-run.

Under the simulation, too, the resumed run's model is the uninterrupted simulation's bit for
bit, although Flower draws new node ids for the restarted simulation: the server samples and
adds the clients in partition order (before, two simulations of one config differed in float32's
last bits), and excludes failed clients by partition.

What a resumed run must restore: the model, the round number, the learning rate of the round
(``lr-milestones`` crossed after the restart), the seeded sampler (``clients-per-round`` < all),
the nodes excluded by earlier failures, and the metrics so far.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from client.app import app as client_app
from common.experiment import task
from common.protocol import CONFIG_RECORD, SERVER_ROUND, TRAIN_FEDTAN
from server.checkpoint import load_state_dict, read_checkpoint
from server.local_run import run_locally
from server.processes import (
    Deadline,
    ManagedProcess,
    adopt_local_superlinks,
    local_superlink_env,
    logs,
    process_table,
    start_flwr_run,
    stop_processes,
    write_flower_config,
    write_run_config,
)
from server.results import RunFolderError
from tests.test_flower_app import assert_is_the_in_process_model, vanish_at_train_reply
from tests.test_flower_runtime import SIMULATION_TIMEOUT_S, reference_config, wait_for_cli

APP_DIR = Path(__file__).resolve().parents[1]

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "num-clients": 3,
    "clients-per-round": 2,
    "batch-size": 12,
    "local-steps": 2,
    "lr": 0.1,
    "lr-milestones": "3",
    "momentum": 0.9,
    "max-retries": 1,
    "num-rounds": 4,
    "reply-timeout": 5.0,  # how long a vanished client's reply is waited for
}


def run(out: Path, faults=None, **overrides):
    result, grid = run_locally(
        client_app, {**BASE, "output-dir": str(out), **overrides}, faults=faults
    )
    return result, grid


def rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """The same final model, bit for bit, and the same per-round losses and accuracies."""
    expected, actual = load_state_dict(uninterrupted), load_state_dict(resumed)
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    learned = ("round", "train-loss", "test-loss", "test-accuracy", "clients")
    assert [{k: r.get(k) for k in learned} for r in rows(resumed)] == [
        {k: r.get(k) for k in learned} for r in rows(uninterrupted)
    ]
    assert summary(resumed)["status"] == "completed"
    assert summary(resumed)["rounds_completed"] == BASE["num-rounds"]


# --- in process -------------------------------------------------------------------------------


def test_a_finished_run_extended_to_more_rounds_is_the_longer_run(tmp_path):
    run(tmp_path / "whole")
    run(tmp_path / "parts", **{"num-rounds": 2})
    assert summary(tmp_path / "parts")["status"] == "completed"
    run(tmp_path / "parts", resume=True)  # rounds 3-4, lr divided at round 3
    assert_same_run(tmp_path / "parts", tmp_path / "whole")


def test_a_run_resumed_over_the_other_carrier_of_the_bn_sync_calls_is_the_same_run(tmp_path):
    """What carries the BN sync service's calls changes no model: a resume may switch it."""
    grpc = {"transport": "grpc", "bn-sync-timeout": 10.0}
    run(tmp_path / "whole", **grpc)
    run(tmp_path / "parts", **grpc, **{"num-rounds": 2})
    run(tmp_path / "parts", resume=True, **grpc, **{"bn-sync-protocol": "socket"})
    assert_same_run(tmp_path / "parts", tmp_path / "whole")


def test_a_run_that_failed_after_round_2_resumes_from_there(tmp_path, monkeypatch):
    run(tmp_path / "whole")
    real, calls = task.evaluate, []

    def evaluate_then_crash(model, cfg, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # rounds 0, 1, 2 evaluate; round 3 dies
            raise MemoryError("the ServerApp died")
        return real(model, cfg, *args, **kwargs)

    monkeypatch.setattr(task, "evaluate", evaluate_then_crash)
    with pytest.raises(MemoryError):
        run(tmp_path / "parts")
    monkeypatch.setattr(task, "evaluate", real)
    assert summary(tmp_path / "parts")["status"] == "failed"
    assert read_checkpoint(tmp_path / "parts")["round"] == 2

    _, grid = run(tmp_path / "parts", resume=True)
    trained = [m for m in grid.sent if m.metadata.message_type == TRAIN_FEDTAN]
    assert {m.content.config_records[CONFIG_RECORD][SERVER_ROUND] for m in trained} == {3, 4}
    assert_same_run(tmp_path / "parts", tmp_path / "whole")


def test_clients_excluded_before_the_restart_stay_excluded(tmp_path):
    """Excluded are the failed clients' partitions: Flower's node ids change with a restart."""
    vanishing = 1001
    faults = {vanishing: vanish_at_train_reply(1)}  # fails its first round: then excluded
    run(tmp_path / "whole", faults=faults, **{"clients-per-round": 0})
    faults = {vanishing: vanish_at_train_reply(1)}
    run(tmp_path / "parts", faults=faults, **{"clients-per-round": 0, "num-rounds": 2})
    assert read_checkpoint(tmp_path / "parts")["excluded_partitions"] == [vanishing - 1000]

    _, grid = run(tmp_path / "parts", resume=True, **{"clients-per-round": 0})  # no faults now
    trained = [m for m in grid.sent if m.metadata.message_type == TRAIN_FEDTAN]
    assert trained and all(m.metadata.dst_node_id != vanishing for m in trained)
    assert_same_run(tmp_path / "parts", tmp_path / "whole")


def test_a_run_stopped_before_its_first_round_resumes_from_round_1(tmp_path):
    run(tmp_path / "whole")
    parts = tmp_path / "parts"
    run(parts, **{"num-rounds": 1})
    for name in ("model.pt", "metrics.json", "metrics.csv", "summary.json"):
        (parts / name).unlink()  # as if killed before round 1 completed: config.json alone
    run(parts, resume=True)
    assert_same_run(parts, tmp_path / "whole")


def test_resume_refuses_another_config_and_a_folder_without_a_run(tmp_path):
    out = tmp_path / "out"
    run(out, **{"num-rounds": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunFolderError, match=r"run config \['lr', 'seed'\] differs"):
        run(out, resume=True, lr=0.05, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(RunFolderError, match="holds no run"):
        run(tmp_path / "empty", resume=True)


# --- under Flower's Ray simulation, the ServerApp process SIGKILLed ---------------------------

SIMULATED = {
    "dataset": "digits",
    "model": "small_cnn",
    "num-clients": 3,
    "batch-size": 12,
    "local-steps": 2,
    "momentum": 0.9,
    "lr-milestones": "4",
    "num-rounds": 5,
}
KILL_AFTER = 2  # completed rounds


def rounds_completed(out: Path) -> int:
    try:
        return json.loads((out / "summary.json").read_text())["rounds_completed"]
    except (OSError, ValueError):  # not written yet
        return 0


def simulate(
    tmp_path: Path, name: str, run_config: dict, deadline: Deadline, kill_after=None, actors=2
):
    """``flwr run . local`` of ``run_config`` (3 SuperNodes, ``actors`` Ray actors); with
    ``kill_after``: SIGKILL the ServerApp process (``flwr-simulation``) once that many rounds
    are complete. Every process it started is stopped before it returns."""
    home = tmp_path / f"{name}-home"
    env = local_superlink_env(home)
    write_flower_config(home, {"local": {"address": ":local:"}})
    run_toml = write_run_config(tmp_path / f"{name}.toml", run_config)
    out = Path(run_config["output-dir"])
    procs: list[ManagedProcess] = []
    killed: list[str] = []
    try:
        flwr = start_flwr_run(
            "local",
            run_toml,
            env=env,
            log_dir=tmp_path / f"{name}-logs",
            app_dir=APP_DIR,
            federation_config=(
                f"num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus={actors}"
            ),
        )
        procs.append(flwr)
        link = None
        while flwr.running() and deadline.remaining() > 0 and not killed:
            if link is None and (found := adopt_local_superlinks(home)):
                link = found[0]
                procs.append(link)
            if link is not None:
                table = process_table()
                members = link.refresh(table)  # remembers Ray's processes for the teardown
                if kill_after is not None and rounds_completed(out) >= kill_after:
                    for pid in members:
                        if "flwr-simulation" in table[pid].cmdline:
                            os.kill(pid, signal.SIGKILL)
                            killed.append(table[pid].cmdline)
            time.sleep(0.05)
        if kill_after is None:
            wait_for_cli(flwr, deadline, procs[1:])
        else:
            assert killed, "the ServerApp was never killed\n" + logs(procs)
    finally:
        procs += adopt_local_superlinks(home, procs)
        print(name, *stop_processes(procs), sep="\n")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc")
def test_a_simulation_killed_after_round_k_and_resumed_is_the_uninterrupted_one(tmp_path):
    deadline = Deadline(3 * SIMULATION_TIMEOUT_S)
    whole = tmp_path / "whole"
    simulate(tmp_path, "whole", {**SIMULATED, "output-dir": str(whole)}, deadline)
    parts = tmp_path / "parts"
    config = {**SIMULATED, "output-dir": str(parts)}
    simulate(tmp_path, "killed", config, deadline, kill_after=KILL_AFTER)
    killed_at = summary(parts)
    assert killed_at["status"] == "running", killed_at  # it never got to say how it ended
    assert KILL_AFTER <= killed_at["rounds_completed"] < SIMULATED["num-rounds"], (
        "the run ended before the kill landed"
    )

    simulate(tmp_path, "resumed", {**config, "resume": True}, deadline)
    print(f"killed after round {killed_at['rounds_completed']}; total {deadline.elapsed():.0f} s")
    print([(row["round"], row["train-loss"], row["test-loss"]) for row in rows(parts)])
    assert_is_the_in_process_model(
        load_state_dict(parts), reference_config(SIMULATED), SIMULATED["num-clients"]
    )
    assert summary(parts)["status"] == "completed"
    assert [row["round"] for row in rows(parts)] == list(range(1, SIMULATED["num-rounds"] + 1))
    expected, actual = load_state_dict(whole), load_state_dict(parts)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    learned = ("round", "train-loss", "test-loss", "test-accuracy")
    assert [[r[k] for k in learned] for r in rows(parts)] == [
        [r[k] for k in learned] for r in rows(whole)
    ]
