"""How ``stop_processes`` stops a family of processes (``server/processes.py``).

SIGINT goes to the root, as it stops a SuperLink or SuperNode cleanly. What outlives the root
by ``term_after`` seconds (a ServerApp in a block of rounds does: it no longer talks to its
SuperLink) gets SIGTERM, which Flower's processes handle by exiting through their own
handlers. Only what is still there after ``grace`` seconds is SIGKILLed, and named.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.processes import ManagedProcess, process_table, stop_processes, wait_for_file

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc"
)

# A root that starts a child in a session of its own (as Flower's SuperExec starts a ServerApp)
# and exits on SIGINT; the child notes each signal it gets, and stops on SIGTERM unless told
# to ignore it.
ROOT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
while True:
    time.sleep(1)
"""
CHILD = """
import os, signal, sys, time
from pathlib import Path
notes, ignore_term = Path(sys.argv[1]), sys.argv[2] == "ignore-term"
def note(signum, frame):
    with open(notes, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if signum == signal.SIGTERM and not ignore_term:
        sys.exit(0)
signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
notes.write_text("")
while True:
    time.sleep(0.1)
"""


def start_family(tmp_path: Path, child_mode: str) -> tuple[ManagedProcess, Path]:
    notes = tmp_path / "child-signals"
    root = subprocess.Popen(
        [sys.executable, "-c", ROOT, CHILD, str(notes), child_mode], start_new_session=True
    )
    wait_for_file(notes, timeout=30)  # the child's handlers are in place
    return ManagedProcess("root", root.pid, root), notes


def gone(pid: int) -> bool:
    """Exited (a zombie that init has yet to reap counts: it runs nothing)."""
    info = process_table().get(pid)
    return info is None or info.state == "Z"


def test_a_child_that_outlives_its_root_gets_sigterm_and_is_not_killed(tmp_path):
    family, notes = start_family(tmp_path, "stop-on-term")
    (child,) = family.refresh() - {family.pid}

    killed = stop_processes([family], grace=30.0, term_after=0.5)

    assert killed == []
    assert notes.read_text().split() == ["SIGTERM"]  # never SIGINT: that went to the root
    assert gone(child) and family.returncode() is not None


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period_and_named(tmp_path):
    family, notes = start_family(tmp_path, "ignore-term")
    (child,) = family.refresh() - {family.pid}
    started = time.monotonic()

    killed = stop_processes([family], grace=2.0, term_after=0.5)

    assert time.monotonic() - started >= 2.0
    assert [line.split()[:3] for line in killed] == [["root:", "killed", str(child)]]
    assert notes.read_text().split() == ["SIGTERM"]
    assert gone(child)
