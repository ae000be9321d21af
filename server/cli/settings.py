"""A run's config as ``fedtan run`` builds it: the app's defaults, a TOML file, ``--set``
overrides, checked before Flower starts.

Flower itself only says ``Invalid run configuration`` for a wrong key and names a wrong value at
the end of a traceback in the SuperLink's log; here both are named in one line.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from common.experiment.config import RunConfig

# The project folder: what ``flwr run`` bundles, with the app's defaults in its pyproject.toml.
PROJECT_DIR = Path(__file__).resolve().parents[2]

Config = dict[str, object]


class ConfigError(Exception):
    """A usage or config mistake: reported in one line, exit code 2, before Flower starts."""


def app_defaults(project_dir: Path = PROJECT_DIR) -> Config:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml: every valid key and its default."""
    pyproject = project_dir / "pyproject.toml"
    try:
        return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(
            f"cannot read the app's run config defaults from {pyproject}: {error} "
            "(install the project with `pip install -e .` from its folder)"
        ) from None


def read_toml(path: str | Path) -> Config:
    """A run config file (TOML, top-level keys only)."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def read_run_folder_config(run_dir: str | Path) -> Config:
    """The config a run folder was made with (``config.json``), for ``--resume``."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except OSError:
        raise ConfigError(f"--resume {run_dir}: no {path.name} there (not a run folder)") from None
    except ValueError as error:
        raise ConfigError(f"--resume {run_dir}: {path} is not valid JSON: {error}") from None
    # Older run folders wrote the dataclass's field names (dirichlet_alpha), not Flower's keys.
    return {key.replace("_", "-"): value for key, value in saved.items() if key != "milestones"}


def parse_override(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a TOML literal (``0.1``, ``true``, ``"x"``) or a bare string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    try:
        return key, tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key, text.strip()


def merge(
    defaults: Mapping[str, object],
    layers: Iterable[tuple[str, Mapping[str, object]]],
) -> Config:
    """``defaults`` updated by each named layer in turn; a key the app lacks is an error that
    names the layer and the closest valid key."""
    config = dict(defaults)
    for source, layer in layers:
        for key, value in layer.items():
            if key not in defaults:
                hint = _hint(key, defaults)
                raise ConfigError(f"unknown run config key {key!r} ({source}){hint}")
            config[key] = value
    return config


def validate(config: Mapping[str, object]) -> RunConfig:
    """The typed config, or a ConfigError naming the wrong value in one line."""
    try:
        return RunConfig.from_flower(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _hint(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; the valid keys are in pyproject.toml's [tool.flwr.app.config]"
