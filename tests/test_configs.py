"""Every ready-made experiment in configs/ is a valid run config on top of the app's defaults."""

import tomllib
from pathlib import Path

import pytest

from common.experiment.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_defaults_are_a_valid_config():
    RunConfig.from_flower(DEFAULTS)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_each_config_file_is_valid(path):
    RunConfig.from_flower({**DEFAULTS, **tomllib.loads(path.read_text())})


def test_the_reference_schedule_drops_lr_tenfold_at_round_6000():
    cfg = RunConfig.from_flower(
        {**DEFAULTS, **tomllib.loads((ROOT / "configs/cifar10-noniid-e5.toml").read_text())}
    )
    assert cfg.lr_at(5999) == 0.5 and cfg.lr_at(6000) == pytest.approx(0.05)
