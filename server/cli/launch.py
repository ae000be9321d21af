"""``flwr run`` in the background, and everything it starts stopped again, whatever happens.

Flower's ``flwr run . local`` starts a SuperLink detached from itself, which starts
``flwr-simulation`` and its Ray cluster in sessions of their own: a Ctrl-C at the terminal
reaches none of them, and they outlive ``flwr run`` for minutes or for good. So ``flwr run``
runs in a session of its own, with its own ``FLWR_HOME`` and free ports for a local SuperLink
(started here, as Flower would start it, but given time to come up), and ``FlowerRun.stop``
stops its whole family (``server.processes``: children, and every session a member started) and
the local SuperLink of that ``FLWR_HOME``: SIGINT to the roots, SIGTERM to what is left below
them a few seconds later, SIGKILL to what is left after that.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from server.processes import (
    LOOPBACK,
    ManagedProcess,
    ProcInfo,
    adopt_local_superlinks,
    flower_bin,
    process_table,
    start_process,
    stop_processes,
)

LOCAL = "local"  # the federation name for a Ray simulation on a SuperLink this command starts
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# flwr run gives the local SuperLink it starts 15 s, too little on a loaded machine.
SUPERLINK_START_TIMEOUT_S = 180.0
# How long Flower's processes get to stop after the SIGINT (SIGTERM after 3 s) before SIGKILL.
STOP_GRACE_S = 15.0


class LaunchError(RuntimeError):
    """Flower could not be started; the message says what and where its log is."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run is stopped and the command exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``Interrupted`` (SIGTERM would otherwise skip cleanup)."""

    def interrupt(signum: int, _frame: object) -> None:
        # The cleanup that follows must run to its end: a second signal is ignored.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Let a cleanup finish: a second Ctrl-C must not leave half the processes running."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_federation_config(text: str) -> dict[str, str]:
    """``"num-supernodes=5 client-resources-num-cpus=1"`` as a dict (values kept as text)."""
    settings = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--federation-config {item!r}: expected KEY=VALUE")
        settings[key] = value
    return settings


def simulation_settings(num_clients: int, transport: str, cuda: bool) -> dict[str, str]:
    """The Ray simulation a run needs: a SuperNode per client, one CPU per ClientApp actor.

    ``grpc`` needs every client of a round running at once, so one actor per client (Ray gets
    that many CPUs whatever the machine has); on a GPU each client gets at most 1/K of it.
    """
    settings = {"num-supernodes": str(num_clients), "client-resources-num-cpus": "1"}
    if transport == "grpc":
        settings["init-args-num-cpus"] = str(num_clients)
    if cuda:
        share = int(10_000 / num_clients) / 10_000  # rounded down: K shares fit on one GPU
        settings["client-resources-num-gpus"] = f"{share:g}"
    return settings


class FlowerRun:
    """One ``flwr run <project> <federation> --run-config FILE --stream`` and its processes.

    ``flwr_home``: the ``FLWR_HOME`` of ``env`` when this run has its own (a local simulation);
    its SuperLink is stopped with the run. ``lines()`` yields the log's new lines.
    """

    def __init__(
        self,
        *,
        project_dir: Path,
        federation: str,
        run_config: Path,
        federation_config: Mapping[str, str],
        env: Mapping[str, str],
        log_dir: Path,
        flwr_home: Path | None,
    ) -> None:
        self.project_dir = project_dir
        self.federation = federation
        self.env = dict(env)
        self.flwr_home = flwr_home
        self.run_id: str | None = None
        command = [*flower_bin("flwr"), "run", str(project_dir), federation]
        command += ["--run-config", str(run_config), "--stream"]
        if federation_config:
            settings = " ".join(f"{k}={v}" for k, v in federation_config.items())
            command += ["--federation-config", settings]
        self.command = command
        self.log_dir = log_dir
        self.procs: list[ManagedProcess] = []  # everything to stop: flwr run, a local SuperLink
        self.flwr_run: ManagedProcess | None = None
        self._offset = 0
        self._partial = b""

    @property
    def log_path(self) -> Path:
        return self.log_dir / "flwr-run.log"

    def start(self) -> None:
        if self.flwr_home is not None:
            self._start_local_superlink()
        self.flwr_run = start_process(
            self.command,
            name="flwr-run",
            log_dir=self.log_dir,
            env=self.env,
            cwd=self.project_dir,
        )
        self.procs.append(self.flwr_run)

    def running(self) -> bool:
        """Whether ``flwr run`` still runs (a local SuperLink outlives it until ``stop``)."""
        return self.flwr_run is not None and self.flwr_run.running()

    def returncode(self) -> int | None:
        return None if self.flwr_run is None else self.flwr_run.returncode()

    def watch(self) -> None:
        """Note every process started so far (the SuperLink, Ray), while their parents live."""
        table = process_table()  # one read for all: this runs every 0.3 s beside the run
        self._adopt_local_superlink(table)
        for proc in self.procs:
            proc.refresh(table)

    def lines(self) -> list[str]:
        """The complete lines the run logged since the last call."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        text = [line.decode(errors="replace").rstrip("\r") for line in complete]
        if self.run_id is None:
            for line in text:
                if match := _RUN_ID.search(line):
                    self.run_id = match.group(1)
        return text

    def flower_status(self, timeout: float = 30.0) -> str | None:
        """Flower's status of the run (``finished:completed``, ``finished:failed``, ...), or
        None when the SuperLink cannot say."""
        if self.run_id is None:
            return None
        command = [*flower_bin("flwr"), "ls", self.federation, "--run-id", self.run_id]
        try:
            done = subprocess.run(
                [*command, "--format", "json"],
                capture_output=True,
                text=True,
                env=self.env,
                cwd=self.project_dir,
                timeout=timeout,
                start_new_session=True,
            )
            runs = json.loads(done.stdout)["runs"]
        except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            return None
        return runs[0].get("status") if runs else None

    def cancel_remote(self, timeout: float = 30.0) -> str | None:
        """Ask a remote SuperLink to stop the run (a local one is stopped with its processes);
        what came of it, in words (None: a local run)."""
        if self.flwr_home is not None:
            return None
        if self.run_id is None:
            self.lines()  # the line with the run id may have come since the last look
        if self.run_id is None:
            return f"no run was submitted to federation {self.federation!r}"
        stop = f"`flwr stop {self.run_id} {self.federation}`"
        try:
            done = subprocess.run(
                [*flower_bin("flwr"), "stop", self.run_id, self.federation],
                capture_output=True,
                text=True,
                env=self.env,
                cwd=self.project_dir,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return f"{stop} got no answer in {timeout:g} s"
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            return f"{stop} failed ({said[-1] if said else f'exit code {done.returncode}'})"
        return f"run {self.run_id} stopped on federation {self.federation!r}"

    def stop(self) -> list[str]:
        """Stop every process of the run; lines for the ones that had to be killed."""
        self._adopt_local_superlink()
        killed = stop_processes(self.procs, grace=STOP_GRACE_S)
        # A SuperLink that started after the last look (flwr ls restarts one when it is gone).
        self._adopt_local_superlink()
        return killed + stop_processes(self.procs, grace=STOP_GRACE_S)

    def _start_local_superlink(self) -> None:
        """The SuperLink ``flwr run`` would start for ``:local:`` (its command in
        ``flwr/cli/local_superlink.py``), started here with time to come up; ``flwr run`` finds
        it answering and uses it."""
        log = self.flwr_home / "local-superlink" / "superlink.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        port = self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
        control = f"{LOOPBACK}:{self.env['FLWR_LOCAL_CONTROL_API_PORT']}"
        link = start_process(
            [
                *flower_bin("flower-superlink"),
                *("--insecure", "--simulation", "--isolation", "subprocess"),
                *("--control-api-address", control, "--host", LOOPBACK, "--port", port),
                *("--log-file", str(log)),
            ],
            name="local-superlink",
            log_dir=self.log_dir,
            env=self.env,
            cwd=self.project_dir,
        )
        self.procs.append(link)
        deadline = time.monotonic() + SUPERLINK_START_TIMEOUT_S
        while not _healthy(f"http://{LOOPBACK}:{port}/health"):
            if not link.running():
                code = link.returncode()
                raise LaunchError(f"the local SuperLink exited (code {code}); see {log}")
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"the local SuperLink did not answer within {SUPERLINK_START_TIMEOUT_S:g} s; "
                    f"see {log}"
                )
            time.sleep(0.3)

    def _adopt_local_superlink(self, table: Mapping[int, ProcInfo] | None = None) -> None:
        if self.flwr_home is None:
            return
        self.procs += adopt_local_superlinks(self.flwr_home, self.procs, table)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
