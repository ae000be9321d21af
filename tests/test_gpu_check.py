"""scripts/gpu_check.sh, the GPU check, runs on the CPU too: only the device is missing.

Its quick mode (in-process rows only, few rounds, small batches) runs here; the full CPU mode
adds the CUDA-marked tests' CPU parameters and the Ray simulation, and is run by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # No CUDA device visible, whatever the machine has: the CPU mode is what is checked here.
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.mark.slow
def test_the_quick_cpu_mode_prints_every_row_the_gpu_check_prints():
    run = gpu_check("--quick", "--rounds", "3", "--batch", "2", "--clients", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "1. versions and TF32 (cpu mode)" in out and "TF32: matmul" in out
    for local_steps in (1, 5):
        assert f"ResNet-20, 2 x 2 generated CIFAR-shaped images, E = {local_steps}, 3 rounds" in out
    # For each E: the row, its CPU per round and its projection.
    assert out.count("in-process engine (cpu)") == 6
    assert out.count("CPU per round, ms") == 2
    assert out.count("projected wall time of 10000 rounds") == 2
    assert "done in" in out


def test_a_failing_step_fails_the_check():
    run = gpu_check("--quick", "--rounds", "2", "--batch", "2")  # bench_flower needs >= 3
    assert run.returncode != 0
    assert "--rounds must be >= 3" in run.stderr
    assert "done in" not in run.stdout


def test_asking_for_a_gpu_that_is_not_there_fails_naming_it():
    run = gpu_check("--gpu", "--quick")
    assert run.returncode == 1
    assert "--gpu asked for, but torch sees no CUDA device" in run.stderr


def test_an_unknown_option_is_refused():
    run = gpu_check("--fast")
    assert run.returncode == 2
    assert "unknown option --fast" in run.stderr
