"""Start, watch and stop Flower's processes in tests (Linux: it reads ``/proc``).

    env = flower_env(tmp_path / "flwr-home")            # FLWR_HOME, offline, loopback only
    port = free_port()
    link = start_process([*flower_bin("flower-superlink"), "--insecure", ...], name="superlink",
                         log_dir=tmp_path, env=env)
    try:
        wait_for_port(port, timeout=30, procs=[link])
        ...
    finally:
        stop_processes([link])        # SIGINT, then SIGTERM below the root, then SIGKILL

What a Flower process starts does not always stay below it: a SuperLink starts its SuperExec in
a new session, ``flwr run`` starts the local simulation SuperLink detached, and when a parent
exits, Ray's workers and a SuperNode's SuperExec are left to init. So a ``ManagedProcess`` is a
family: its root, every process below it, and every process of a session that a member of the
family started. ``stop_processes`` stops the whole family.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent  # the venv's console scripts: flwr, flower-superlink, ...


def flower_bin(name: str) -> list[str]:
    """The command for one of Flower's console scripts, from the running interpreter's venv."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install flwr in {BIN.parent}")
    return [str(path)]


# --- ports, environment, config.toml ---------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports (all sockets are held until every port is picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for every Flower process of a test.

    ``FLWR_HOME`` isolates config.toml, installed apps and the local SuperLink's state; runs use
    the installed packages (no ``uv sync``), Flower phones nowhere, and Ray keeps to 127.0.0.1.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            # Ray binds its node to the loopback address instead of the machine's IP.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Console scripts started by name (the local SuperLink, SuperExec) come from this venv.
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def local_superlink_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """``flower_env`` plus free ports for the SuperLink that ``flwr run`` starts for ``:local:``.

    Without them it would take 127.0.0.1:39091, or silently reuse whatever SuperLink another
    session already runs there.
    """
    http_port, control_port = free_ports(2)
    return flower_env(
        flwr_home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        **extra,
    )


def write_flower_config(
    flwr_home: Path, federations: Mapping[str, Mapping[str, object]], default: str | None = None
) -> Path:
    """Write ``$FLWR_HOME/config.toml``: ``{"local": {"address": ":local:"}, "dep": {...}}``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    default = default or next(iter(federations))
    lines = ["[superlink]", f"default = {_toml(default)}", ""]
    for name, settings in federations.items():
        lines.append(f"[superlink.{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
        lines.append("")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines))
    return path


def write_run_config(path: Path, run_config: Mapping[str, object]) -> Path:
    """A run config TOML file for ``flwr run --run-config FILE``."""
    path.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in run_config.items()))
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    raise TypeError(f"no TOML scalar for {value!r}")


# --- the process table -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    state: str  # "R", "S", "Z", ...
    cmdline: str
    cpu_seconds: float  # user and system, all its threads (the exited ones too)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, ProcInfo]:
    """Every process visible in /proc (zombies included, state "Z")."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = _read_proc_file(f"/proc/{entry}/stat").decode(errors="replace")
            raw = _read_proc_file(f"/proc/{entry}/cmdline")
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        table[int(entry)] = ProcInfo(
            int(entry), int(fields[1]), int(fields[3]), fields[0], cmdline, cpu
        )
    return table


def _read_proc_file(path: str) -> bytes:
    # A run's launcher reads the table every 0.3 s, while the run competes for the same cores:
    # bare os calls cost a third of pathlib's.
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def find_processes(
    predicate: Callable[[ProcInfo], bool], table: Mapping[int, ProcInfo] | None = None
) -> list[ProcInfo]:
    """Live (non-zombie) processes for which ``predicate`` holds (in ``table``, if given)."""
    table = process_table() if table is None else table
    return [p for p in table.values() if p.state != "Z" and predicate(p)]


def local_superlink_pids(flwr_home: Path, table: Mapping[int, ProcInfo] | None = None) -> list[int]:
    """The detached SuperLink that ``flwr run`` started for ``:local:`` with this FLWR_HOME.

    Its command line names its log file, ``$FLWR_HOME/local-superlink/superlink.log``.
    """
    marker = str(Path(flwr_home) / "local-superlink")
    return [
        p.pid
        for p in find_processes(
            lambda p: "flower-superlink" in p.cmdline and marker in p.cmdline, table
        )
    ]


# --- managed processes -----------------------------------------------------------------------


class ManagedProcess:
    """A process a test started (or adopted) and everything it started; see the module doc."""

    def __init__(
        self,
        name: str,
        pid: int,
        popen: subprocess.Popen | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.pid = pid
        self.popen = popen
        self.log_path = log_path
        self.members: set[int] = {pid}  # every pid ever seen in the family
        self.sessions: set[int] = set()  # sessions started by members of the family
        self.refresh()

    def refresh(self, table: Mapping[int, ProcInfo] | None = None) -> set[int]:
        """Find new members; return the live ones (zombies do not count)."""
        table = process_table() if table is None else table
        own_session = os.getsid(0)
        protected = {os.getpid(), os.getppid()}
        changed = True
        while changed:
            changed = False
            for info in table.values():
                if info.pid in protected:
                    continue
                if info.pid in self.members and info.sid == info.pid and info.sid != own_session:
                    if info.sid not in self.sessions:
                        self.sessions.add(info.sid)
                        changed = True
                if info.pid not in self.members and (
                    info.ppid in self.members or info.sid in self.sessions
                ):
                    self.members.add(info.pid)
                    changed = True
        return {
            pid
            for pid in self.members
            if pid in table and table[pid].state != "Z" and pid not in protected
        }

    def running(self) -> bool:
        """Whether the root process still runs."""
        if self.popen is not None:
            return self.popen.poll() is None
        info = process_table().get(self.pid)
        return info is not None and info.state != "Z"

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return f"[{self.name}: no log]"
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} ({self.log_path}), last {len(text)} lines ---\n" + "\n".join(text)

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid})"


def start_process(
    cmd: Sequence[str],
    *,
    name: str,
    log_dir: Path,
    env: Mapping[str, str],
    cwd: Path | str | None = None,
) -> ManagedProcess:
    """Start ``cmd`` in its own session, stdout and stderr to ``log_dir/<name>.log``.

    Its own session keeps a SIGINT meant for the test runner away from it (and the other way
    round), and lets ``stop_processes`` find its orphans.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name, popen.pid, popen, log_path)


def adopt_process(pid: int, *, name: str, log_path: Path | None = None) -> ManagedProcess:
    """Manage a process this test did not start itself (the detached local SuperLink)."""
    return ManagedProcess(name, pid, None, log_path)


def adopt_local_superlinks(
    flwr_home: Path,
    known: Iterable[ManagedProcess] = (),
    table: Mapping[int, ProcInfo] | None = None,
) -> list[ManagedProcess]:
    """The detached local SuperLinks of ``flwr_home`` not among ``known``, adopted: ``flwr run``
    starts one for ``:local:`` that outlives it, so whoever ran it must stop it too. ``table``:
    a ``process_table`` just read, if the caller has one."""
    pids = {p.pid for p in known}
    log_path = Path(flwr_home) / "local-superlink" / "superlink.log"
    return [
        adopt_process(pid, name="local-superlink", log_path=log_path)
        for pid in local_superlink_pids(flwr_home, table)
        if pid not in pids
    ]


def stop_processes(
    procs: Iterable[ManagedProcess | None],
    grace: float = 15.0,
    kill_wait: float = 5.0,
    term_after: float = 3.0,
) -> list[str]:
    """SIGINT every root; SIGTERM what is left below the roots after ``term_after`` s (at most
    half of ``grace``); SIGKILL what is left after ``grace`` s. Returns a line per process that
    had to be killed. Never raises for a process that already exited.

    SIGINT is what stops a SuperLink or SuperNode cleanly (SIGTERM skips their shutdown); their
    SuperExec, ServerApp/ClientApp and Ray processes usually follow within seconds. Not always:
    a ServerApp inside a block of rounds talks only to its BN sync service, and trains on with
    its SuperLink gone until it next asks Flower for something. Flower's processes exit through
    their own handlers on SIGTERM, so they get one before the SIGKILL that would cut them off.
    """
    procs = [p for p in procs if p is not None]
    for proc in procs:
        proc.refresh()
        if proc.running():
            _signal(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    survivors = _wait_families_gone(procs, min(term_after, grace / 2))  # SIGTERM gets time too
    for proc, pids in survivors.items():
        for pid in pids - {proc.pid}:
            _signal(pid, signal.SIGTERM)
    if survivors:
        survivors = _wait_families_gone(procs, max(0.0, deadline - time.monotonic()))
    killed = []
    if survivors:
        table = process_table()
        for proc, pids in survivors.items():
            for pid in sorted(pids):
                info = table.get(pid)
                if info is not None and info.state != "Z":
                    killed.append(f"{proc.name}: killed {pid} {info.cmdline[:120]}")
                    _signal(pid, signal.SIGKILL)
        _wait_families_gone(procs, kill_wait)
    for proc in procs:
        if proc.popen is not None:
            try:
                proc.popen.wait(timeout=kill_wait)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
                pass
    return killed


def _wait_families_gone(
    procs: Sequence[ManagedProcess], timeout: float
) -> dict[ManagedProcess, set[int]]:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.popen is not None:
                proc.popen.poll()  # reap the root, or it stays a zombie
        table = process_table()
        alive = {proc: proc.refresh(table) for proc in procs}
        alive = {proc: pids for proc, pids in alive.items() if pids}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- bounded waits ---------------------------------------------------------------------------


class Deadline:
    """A hard time budget shared by the steps of one test."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.end = self.start + seconds

    def remaining(self, at_most: float | None = None) -> float:
        left = max(0.0, self.end - time.monotonic())
        return left if at_most is None else min(left, at_most)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class PhaseTimer:
    """Consecutive named phases of a test: ``mark("superlink up")`` ends one; ``report()``."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def mark(self, name: str) -> float:
        now = time.monotonic()
        took, self.last = now - self.last, now
        self.phases.append((name, took))
        return took

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def report(self, title: str = "phases") -> str:
        width = max([len(name) for name, _ in self.phases] + [5])
        rows = [f"  {name:<{width}} {took:6.1f} s" for name, took in self.phases]
        total = f"  {'total':<{width}} {self.elapsed():6.1f} s"
        return "\n".join([f"{title}:", *rows, total])


class WaitTimeout(AssertionError):
    pass


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    what: str,
    procs: Sequence[ManagedProcess] = (),
    interval: float = 0.2,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds,
    or as soon as one of ``procs`` (started processes that must keep running) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        dead = [p for p in procs if not p.running()]
        if dead:
            raise WaitTimeout(
                f"while waiting for {what}: {', '.join(p.name for p in dead)} exited "
                f"(code {[p.returncode() for p in dead]})\n" + logs(procs)
            )
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{what}: not within {timeout:.0f} s\n" + logs(procs))
        time.sleep(interval)


def wait_for_file(
    path: Path, *, timeout: float, procs: Sequence[ManagedProcess] = (), interval: float = 0.5
) -> Path:
    return wait_for(
        lambda: path if path.exists() else None,
        timeout=timeout,
        what=f"file {path}",
        procs=procs,
        interval=interval,
    )


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(
    port: int, *, timeout: float, procs: Sequence[ManagedProcess] = (), host: str = LOOPBACK
) -> None:
    wait_for(lambda: port_open(port, host), timeout=timeout, what=f"{host}:{port}", procs=procs)


def wait_for_log(
    proc: ManagedProcess, text: str, *, timeout: float, procs: Sequence[ManagedProcess] = ()
) -> None:
    """Wait until ``text`` appears in ``proc``'s log."""

    def found() -> bool:
        return proc.log_path is not None and text in proc.log_path.read_text(errors="replace")

    wait_for(found, timeout=timeout, what=f"{text!r} in {proc.name}'s log", procs=[proc, *procs])


def logs(procs: Iterable[ManagedProcess], lines: int = 40) -> str:
    return "\n".join(p.log_tail(lines) for p in procs)


# --- a deployment on 127.0.0.1 ---------------------------------------------------------------


def start_flwr_run(
    federation: str,
    run_toml: Path,
    *,
    env: Mapping[str, str],
    log_dir: Path,
    app_dir: Path,
    federation_config: str | None = None,
) -> ManagedProcess:
    """``flwr run <app_dir> <federation> --run-config <run_toml> --stream`` in the background."""
    extra = ["--federation-config", federation_config] if federation_config else []
    return start_process(
        [
            *flower_bin("flwr"),
            "run",
            ".",
            federation,
            "--run-config",
            str(run_toml),
            *extra,
            "--stream",
        ],
        name="flwr-run",
        log_dir=log_dir,
        env=env,
        cwd=app_dir,
    )


def start_local_deployment(
    nodes: int,
    *,
    env: Mapping[str, str],
    log_dir: Path,
    cwd: Path,
    deadline: Deadline,
    procs: list[ManagedProcess],
    federation: str = "deployment",
) -> tuple[ManagedProcess, list[ManagedProcess]]:
    """A plaintext ``flower-superlink`` and ``nodes`` ``flower-supernode``s on 127.0.0.1.

    Writes federation ``federation`` (the SuperLink's address, insecure) into
    ``$FLWR_HOME/config.toml`` of ``env``, for ``flwr run . <federation>``; SuperNode k gets
    ``partition-id=k num-partitions=<nodes>``. Returns once the SuperLink listens and every
    SuperNode is connected (each wait at most 60 s and bounded by ``deadline``). Every process is
    appended to ``procs`` as soon as it starts: ``stop_processes(procs)`` in the caller's
    ``finally`` stops them, whatever failed.
    """
    link_port, *node_ports = free_ports(1 + nodes)
    write_flower_config(
        Path(env["FLWR_HOME"]),
        {federation: {"address": f"{LOOPBACK}:{link_port}", "insecure": True}},
    )
    # One port serves the Fleet, Control and Runtime (ServerApp) APIs in Flower 1.42.
    link = start_process(
        [
            *flower_bin("flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            LOOPBACK,
            "--port",
            str(link_port),
        ],
        name="superlink",
        log_dir=log_dir,
        env=env,
        cwd=cwd,
    )
    procs.append(link)
    wait_for_port(link_port, timeout=deadline.remaining(at_most=60), procs=[link])
    started = []
    for k, node_port in enumerate(node_ports):
        node = start_process(
            [
                *flower_bin("flower-supernode"),
                "--insecure",
                "--superlink",
                f"{LOOPBACK}:{link_port}",
                "--host",
                LOOPBACK,
                "--port",
                str(node_port),
                "--node-config",
                f"partition-id={k} num-partitions={nodes}",
            ],
            name=f"supernode-{k}",
            log_dir=log_dir,
            env=env,
            cwd=cwd,
        )
        procs.append(node)
        started.append(node)
    for node in started:  # connected to the SuperLink
        wait_for_log(node, "SuperNode ID", timeout=deadline.remaining(at_most=60), procs=[link])
    return link, started
