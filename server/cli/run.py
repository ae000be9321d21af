"""``fedtan run``: one experiment through Flower, from config to a verdict and an exit code.

Order matters: the whole config is built and checked, and the output folder claimed, before
Flower starts; success is read from what the ServerApp wrote (``summary.json``) and from Flower
(``flwr ls``), because ``flwr run --stream`` exits 0 for a failed run too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import tomllib
from pathlib import Path

from common.experiment.config import RunConfig
from server.cli.launch import (
    LOCAL,
    STOP_GRACE_S,
    FlowerRun,
    Interrupted,
    LaunchError,
    parse_federation_config,
    signals_ignored,
    signals_interrupt,
    simulation_settings,
)
from server.cli.progress import Progress
from server.cli.settings import (
    PROJECT_DIR,
    Config,
    ConfigError,
    app_defaults,
    merge,
    parse_override,
    read_run_folder_config,
    read_toml,
    validate,
)
from server.processes import flower_env, local_superlink_env, write_flower_config, write_run_config
from server.results import close_abandoned_run

# Per-run working files (the run config Flower gets, its log, a local SuperLink's FLWR_HOME).
WORK_DIR = PROJECT_DIR / ".flwr" / "runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run config file (TOML) over the app's defaults")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run config override, e.g. --set num-rounds=50 (repeatable; last wins)",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (run config output-dir)")
    parser.add_argument(
        "--federation",
        metavar="NAME",
        help="a federation of $FLWR_HOME/config.toml (a remote SuperLink); "
        "default: a Ray simulation on a SuperLink this command starts and stops",
    )
    parser.add_argument(
        "--federation-config",
        default="",
        metavar='"KEY=VALUE ..."',
        help="Flower federation settings over the ones picked for the run, e.g. "
        '"client-resources-num-gpus=0.5"',
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="clear an existing run folder first"
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    parser.add_argument("-v", "--verbose", action="store_true", help="print Flower's whole log")


def run(args: argparse.Namespace) -> int:
    """The ``run`` subcommand; ConfigError for a mistake found before Flower starts."""
    defaults = app_defaults()
    config = build_config(args, defaults)
    cfg = validate(config)
    out = Path(cfg.output_dir)
    federation = args.federation or LOCAL
    try:
        extra = parse_federation_config(args.federation_config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if federation != LOCAL:
        _check_federation(federation, _user_flwr_home())
    # Last, once nothing else can refuse the run: --overwrite clears the folder here.
    claim_output(out, overwrite=args.overwrite, resume=args.resume is not None)
    work = WORK_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    work.mkdir(parents=True)
    if federation == LOCAL:
        home = work / "flwr-home"
        env = local_superlink_env(home)
        write_flower_config(home, {LOCAL: {"address": ":local:"}})
        settings = {**simulation_settings(cfg.num_clients, cfg.transport, _cuda()), **extra}
    else:
        home = None
        env = flower_env(_user_flwr_home())
        settings = extra
    flower = FlowerRun(
        project_dir=PROJECT_DIR,
        federation=federation,
        run_config=write_run_config(work / "run-config.toml", config),
        federation_config=settings,
        env=env,
        log_dir=work,
        flwr_home=home,
    )
    where = "Ray simulation" if home is not None else f"federation {federation!r}"
    print(
        f"fedtan: {cfg.method}, {cfg.num_clients} clients, {cfg.num_rounds} rounds, "
        f"{where}; Flower's log: {flower.log_path}",
        flush=True,
    )
    return follow(flower, cfg, out, work, Progress(verbose=args.verbose))


def build_config(args: argparse.Namespace, defaults: Config) -> Config:
    """Defaults, then the file (or the run folder's config for --resume), then --set, --out."""
    layers = []
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("give either a CONFIG file or --resume RUN_DIR, not both")
        if args.overwrite:
            raise ConfigError("--overwrite and --resume exclude each other")
        if "resume" not in defaults:
            raise ConfigError("this version of the app has no run config key 'resume'")
        layers.append((f"{args.resume}/config.json", read_run_folder_config(args.resume)))
    elif args.config is not None:
        layers.append((args.config, read_toml(args.config)))
    layers.append(("--set", dict(parse_override(item) for item in args.set)))
    if args.out is not None:
        layers.append(("--out", {"output-dir": args.out}))
    config = merge(defaults, layers)
    if args.resume is not None:
        config["output-dir"] = args.resume
        config["resume"] = True
    if args.overwrite and "overwrite" in defaults:
        config["overwrite"] = True
    # Absolute: Flower's processes do not run in the user's folder.
    config["output-dir"] = str(Path(str(config["output-dir"])).expanduser().resolve())
    return config


def claim_output(out: Path, *, overwrite: bool, resume: bool) -> None:
    """A run folder belongs to one run: refuse another run's folder unless told otherwise."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file")
    if resume or not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"output folder {out} is not empty (another run's?): pass --overwrite to replace "
            f"it, --resume {out} to continue it, or --out another folder"
        )
    if not any((out / name).exists() for name in ("config.json", "summary.json")):
        raise ConfigError(
            f"--overwrite: {out} is not a run folder (no config.json or summary.json); "
            "not clearing it"
        )
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def follow(flower: FlowerRun, cfg: RunConfig, out: Path, work: Path, progress: Progress) -> int:
    """Run Flower to its end (or a signal), stop everything it started, return the exit code."""
    started = time.time()
    status = None
    killed: list[str] = []
    try:
        with signals_interrupt():
            try:
                try:
                    flower.start()
                except LaunchError as error:
                    print(f"fedtan: FAILED: {error}", flush=True)
                    return 1
                while True:
                    done = not flower.running()
                    flower.watch()
                    for line in flower.lines():
                        if (shown := progress.show(line)) is not None:
                            print(shown, flush=True)
                    if done:
                        break
                    time.sleep(0.3)
                status = flower.flower_status()  # while a local SuperLink still answers
            finally:
                with signals_ignored():
                    killed += flower.stop()
    except Interrupted as interrupt:
        with signals_ignored():
            remote = flower.cancel_remote()
            killed += flower.stop()  # again: the signal may have cut the first stop short
        _report_killed(killed)
        # The log runs behind the rounds (Flower uploads and streams it every 0.2 and 0.5 s):
        # the folder says how far the run got.
        # The ServerApp may have said "interrupted" itself, not knowing by whom: it was us.
        summary = _close_summary(
            flower,
            out,
            _read_summary(out, started),
            "interrupted",
            f"stopped by {interrupt}",
            replacing=("running", "interrupted"),
        )
        done = summary["rounds_completed"] if summary else progress.rounds_done
        stopped = remote or "Flower's processes are stopped"
        print(
            f"fedtan: stopped by {interrupt} after {done} of {cfg.num_rounds} "
            f"rounds; {stopped}; results so far in {out}",
            flush=True,
        )
        return 128 + interrupt.signum
    _report_killed(killed)
    return verdict(flower, cfg, out, work, progress, status, started)


def verdict(
    flower: FlowerRun,
    cfg: RunConfig,
    out: Path,
    work: Path,
    progress: Progress,
    status: str | None,
    started: float,
) -> int:
    """0 when every round completed (the last line says where and how accurate), else 1 with
    a one-line reason."""
    summary = _read_summary(out, since=started)
    reason = None
    if flower.returncode() not in (0, None):
        reason = f"flwr run exited with code {flower.returncode()}"
    elif status is not None and status != "finished:completed":
        reason = f"Flower reports the run as {status}"
        if progress.failure:
            reason += f": {progress.failure}"
    elif summary is not None and summary.get("status") != "completed":
        done = summary.get("rounds_completed", progress.rounds_done)
        why = summary.get("reason") or "see the warnings above"
        reason = f"run {summary.get('status')} after {done} of {cfg.num_rounds} rounds: {why}"
    elif summary is None and flower.flwr_home is not None:
        reason = f"the ServerApp wrote no summary.json in {out}: it failed before round 1"
        if progress.failure:
            reason += f" ({progress.failure})"
    elif summary is None and progress.rounds_done < cfg.num_rounds:
        reason = f"{progress.rounds_done} of {cfg.num_rounds} rounds reported"
    if reason is not None:
        if summary is not None and summary.get("status") == "running":
            # The ServerApp died without a word (killed, out of memory): its folder says so now.
            summary = _close_summary(flower, out, summary, "failed", reason)
            reason += f"; {summary.get('rounds_completed')} of {cfg.num_rounds} rounds completed"
        print(f"fedtan: FAILED: {reason} (Flower's log: {flower.log_path})", flush=True)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    final = (summary or {}).get("final") or {}
    accuracy = final.get("test-accuracy", progress.accuracy)
    score = "not evaluated" if accuracy is None else f"{accuracy:.4f}"
    where = out if summary is not None else f"{out} on the SuperLink's machine"
    print(
        f"fedtan: completed {cfg.num_rounds} rounds; results in {where}; "
        f"final test accuracy {score}",
        flush=True,
    )
    return 0


def _close_summary(
    flower: FlowerRun,
    out: Path,
    summary: dict | None,
    status: str,
    reason: str,
    replacing: tuple[str, ...] = ("running",),
) -> dict | None:
    """``summary``, this run's as read once Flower's processes are stopped, closed with
    ``status`` and ``reason`` if the ServerApp left it with a status of ``replacing`` and ran
    here (a Ray simulation). Elsewhere the ServerApp may still be writing: its summary is only
    read."""
    if summary is None or summary.get("status") not in replacing or flower.flwr_home is None:
        return summary
    try:
        return close_abandoned_run(out, status, reason, replacing) or summary
    except Exception as error:  # noqa: BLE001 - the verdict and exit code must come out
        print(f"fedtan: warning: could not close {out / 'summary.json'}: {error}", flush=True)
        return summary


def _report_killed(killed: list[str]) -> None:
    """Name what had to be SIGKILLed (it cleaned nothing up). On a loaded machine a Ray worker
    can take that long to leave; the ServerApp, which writes the results, never should."""
    for line in killed:
        print(f"fedtan: {line}: still running {STOP_GRACE_S:.0f} s after SIGINT", flush=True)


def _read_summary(out: Path, since: float) -> dict | None:
    """This run's summary.json (not one an earlier run left, when resuming), or None."""
    path = out / "summary.json"
    try:
        if path.stat().st_mtime < since - 1:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _user_flwr_home() -> Path:
    """Where Flower's own CLI looks for federations: $FLWR_HOME, else ~/.flwr."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def _check_federation(name: str, flwr_home: Path) -> None:
    path = flwr_home / "config.toml"
    try:
        known = tomllib.loads(path.read_text()).get("superlink", {})
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"--federation {name}: cannot read {path}: {error}") from None
    if name not in known or not isinstance(known[name], dict):
        names = ", ".join(k for k, v in known.items() if isinstance(v, dict)) or "none"
        raise ConfigError(f"--federation {name}: not in {path} (federations there: {names})")
