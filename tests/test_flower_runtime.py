"""The Flower app under Flower's own runtimes: the model must be the in-process engine's.

* Simulation: ``flwr run . local`` (a ``:local:`` federation: the CLI starts a detached
  simulation SuperLink) with 3 simulated SuperNodes on a pool of 2 Ray actors, so messages of one
  node land on different actor processes.
* Deployment: ``flower-superlink`` + two ``flower-supernode`` processes on 127.0.0.1, the run
  submitted with ``flwr run`` to a federation in ``$FLWR_HOME/config.toml``; every message runs in
  a fresh ClientApp process. One round: with the "messages" transport that is 8 Flower exchanges,
  each a fresh ClientApp process per client (a torch import: 2-6 s), about 100 s on a slow 2-core
  machine. A deployed run resumed and extended is tested over grpc (tests/test_multihost.py).

Each test has a hard time budget (every wait is bounded by it) and stops every process it
started, including the detached local SuperLink and Ray's workers (``server/processes.py``).
Traffic stays on 127.0.0.1 (free ports; Ray is told to bind the loopback address).
Budgets: ``FEDTAN_SIMULATION_TEST_TIMEOUT_S`` (default 300), ``FEDTAN_DEPLOYMENT_TEST_TIMEOUT_S``
(default 360).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from common.experiment.config import RunConfig
from server.checkpoint import load_state_dict
from server.processes import (
    Deadline,
    ManagedProcess,
    adopt_local_superlinks,
    flower_env,
    local_superlink_env,
    logs,
    process_table,
    start_flwr_run,
    start_local_deployment,
    stop_processes,
    wait_for_file,
    write_flower_config,
    write_run_config,
)
from tests.test_flower_app import assert_is_the_in_process_model

APP_DIR = Path(__file__).resolve().parents[1]
SIMULATION_TIMEOUT_S = float(os.environ.get("FEDTAN_SIMULATION_TEST_TIMEOUT_S", 300))
DEPLOYMENT_TIMEOUT_S = float(os.environ.get("FEDTAN_DEPLOYMENT_TEST_TIMEOUT_S", 360))

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc"
)

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "batch-size": 12,
    "local-steps": 2,
    "momentum": 0.9,
}


def reference_config(run_config: dict) -> RunConfig:
    """What the ServerApp sees: pyproject's run config defaults, overridden by ``run_config``."""
    with open(APP_DIR / "pyproject.toml", "rb") as f:
        defaults = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    return RunConfig.from_flower({**defaults, **run_config})


def assert_same_model(path: Path, cfg: RunConfig, num_clients: int) -> None:
    """The saved model is the in-process engine's, to float32's own noise (other processes
    may use other thread counts, so the float32 arithmetic may differ in order)."""
    assert_is_the_in_process_model(load_state_dict(path), cfg, num_clients)


def read_summary(out: Path, procs, deadline: Deadline) -> dict:
    """The run's summary.json: written by the ServerApp when its last round is done."""
    summary = wait_for_file(
        out / "summary.json", timeout=deadline.remaining(at_most=60), procs=procs
    )
    return json.loads(summary.read_text())


def wait_for_cli(flwr: ManagedProcess, deadline: Deadline, others=()) -> None:
    """Wait for ``flwr run --stream`` to return (it streams the run's logs until the run ends)."""
    try:
        flwr.popen.wait(timeout=deadline.remaining())
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"flwr run did not finish within the test's {deadline.seconds:.0f} s\n"
            + logs([flwr, *others])
        )
    if flwr.returncode() != 0:
        pytest.fail(f"flwr run exited with {flwr.returncode()}\n" + logs([flwr, *others]))


def started_run_id(flwr: ManagedProcess) -> str | None:
    match = re.search(r"Successfully started run (\d+)", flwr.log_path.read_text(errors="replace"))
    return match.group(1) if match else None


# Ray actors per transport: "messages" must work with fewer actors than clients (any actor
# answers any message); "grpc" needs every client of a round running at once.
ACTORS = {"messages": 2, "grpc": 3}


@pytest.mark.slow
@pytest.mark.parametrize("transport", sorted(ACTORS))
def test_simulation_on_ray_actors_gives_the_in_process_engine_model(tmp_path, transport):
    deadline = Deadline(SIMULATION_TIMEOUT_S)
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    env = local_superlink_env(home)
    write_flower_config(home, {"local": {"address": ":local:"}})
    run_config = {
        **BASE,
        "num-clients": 3,
        "num-rounds": 2,
        "output-dir": str(out),
        "transport": transport,
    }
    run_toml = write_run_config(tmp_path / "run-config.toml", run_config)
    # Ray gets that many CPUs whatever the machine has, and each ClientApp 1: a pool of actors.
    federation_config = (
        f"num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus={ACTORS[transport]}"
    )

    procs: list[ManagedProcess] = []
    actors: set[int] = set()
    try:
        flwr = start_flwr_run(
            "local",
            run_toml,
            env=env,
            log_dir=tmp_path / "logs",
            app_dir=APP_DIR,
            federation_config=federation_config,
        )
        procs.append(flwr)
        link = None
        while flwr.running() and deadline.remaining() > 0:
            if link is None and (found := adopt_local_superlinks(home)):
                link = found[0]
                procs.append(link)
            if link is not None:
                table = process_table()
                actors |= {
                    pid
                    for pid in link.refresh(table)
                    if table[pid].cmdline.startswith("ray::ClientAppActor")
                }
            time.sleep(0.5)
        wait_for_cli(flwr, deadline, procs[1:])
        assert link is not None, "flwr run never started a local SuperLink\n" + logs(procs)
        summary = read_summary(out, [link], deadline)
        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == 2, summary
    finally:
        # The local SuperLink is detached from flwr run: also stop one this loop did not adopt.
        procs += adopt_local_superlinks(home, procs)
        run_s = deadline.elapsed()
        killed = stop_processes(procs)
        print(f"run {run_s:.0f} s, teardown {deadline.elapsed() - run_s:.0f} s", *killed, sep="\n")

    assert len(actors) >= 2, f"expected a pool of Ray actors, saw {sorted(actors)}"
    assert_same_model(out / "model.pt", reference_config(run_config), 3)
    print(f"total {deadline.elapsed():.0f} s; Ray actor pids {sorted(actors)}")


@pytest.mark.slow
def test_deployment_superlink_and_two_supernodes_give_the_in_process_engine_model(tmp_path):
    deadline = Deadline(DEPLOYMENT_TIMEOUT_S)
    home, out, log_dir = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "logs"
    env = flower_env(home)
    run_config = {**BASE, "num-clients": 2, "num-rounds": 1, "output-dir": str(out)}
    run_toml = write_run_config(tmp_path / "run-config.toml", run_config)

    procs: list[ManagedProcess] = []
    try:
        link, nodes = start_local_deployment(
            2, env=env, log_dir=log_dir, cwd=tmp_path, deadline=deadline, procs=procs
        )

        flwr = start_flwr_run("deployment", run_toml, env=env, log_dir=log_dir, app_dir=APP_DIR)
        procs.append(flwr)
        wait_for_cli(flwr, deadline, [link, *nodes])
        assert started_run_id(flwr), logs([flwr])
        summary = read_summary(out, [link, *nodes], deadline)
        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == 1, summary
        assert all(node.running() for node in nodes), logs(nodes)
    finally:
        run_s = deadline.elapsed()
        killed = stop_processes(procs)
        print(f"run {run_s:.0f} s, teardown {deadline.elapsed() - run_s:.0f} s", *killed, sep="\n")

    assert_same_model(out / "model.pt", reference_config(run_config), 2)
    print(f"total {deadline.elapsed():.0f} s")
