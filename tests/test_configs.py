"""Every ready-made experiment in configs/ is a valid run config on top of the app's defaults."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from common.experiment.config import RunConfig
from common.experiment.methods import METHODS
from common.experiment.models import NORMS

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_defaults_are_a_valid_config():
    RunConfig.from_flower(DEFAULTS)


def test_run_config_defaults_are_the_apps_defaults():
    """RunConfig() and a Flower run without overrides are the same experiment."""
    declared = {
        f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig) if f.init
    }
    assert declared == DEFAULTS


def test_each_method_names_a_normalization_the_models_have():
    for method in METHODS.values():
        assert method.norm is None or method.norm in NORMS, method.name


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_each_config_file_is_valid(path):
    RunConfig.from_flower({**DEFAULTS, **tomllib.loads(path.read_text())})


def test_the_reference_schedule_drops_lr_tenfold_at_round_6000():
    cfg = RunConfig.from_flower(
        {**DEFAULTS, **tomllib.loads((ROOT / "configs/cifar10-noniid-e5.toml").read_text())}
    )
    assert cfg.lr_at(5999) == 0.5 and cfg.lr_at(6000) == pytest.approx(0.05)


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.keep != "none"])
def test_resume_is_refused_for_methods_whose_bn_layers_stay_on_the_clients(method):
    # A new run starts the clients' Flower contexts empty: their own BN layers would silently
    # restart from the initial model, and the "resumed" run would not be the run.
    norm = METHODS[method].norm or "batch"
    RunConfig.from_flower({"method": method, "norm": norm})  # a fresh run is fine
    with pytest.raises(ValueError, match=f"'resume'.*{method!r} keeps BN layers on the clients"):
        RunConfig.from_flower({"method": method, "norm": norm, "resume": True})


def test_resume_is_allowed_for_methods_that_keep_nothing_on_the_clients():
    for method, spec in METHODS.items():
        if spec.keep == "none":
            norm = spec.norm or "batch"
            assert RunConfig.from_flower({"method": method, "norm": norm, "resume": True}).resume
