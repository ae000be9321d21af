"""``fedtan``: the user's front door to the app, built on Flower's own commands.

    fedtan run [CONFIG.toml] [--set KEY=VALUE ...] [--out DIR] [--federation NAME] ...
    fedtan compare BASE.toml --out DIR [--methods ...] [--set KEY=VALUE ...]
    fedtan evaluate RUN_DIR

Exit codes: 0 success; 1 a run or evaluation failed; 2 a usage or config mistake (found before
anything starts); 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.cli import compare, run
from server.cli.settings import ConfigError

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except ConfigError as error:
        print(f"fedtan {args.name}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def evaluate(args: argparse.Namespace) -> int:
    """Test loss and accuracy of a run folder's model (``server.checkpoint.evaluate_run``)."""
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder")
    from server.checkpoint import evaluate_run  # torch and the data: only when needed

    try:
        metrics = evaluate_run(run_dir)
    except (OSError, ValueError, KeyError) as error:
        print(f"fedtan evaluate: {run_dir}: {error}", file=sys.stderr)
        return 1
    print(
        f"{run_dir}: test loss {metrics['test-loss']:.4f}, "
        f"test accuracy {metrics['test-accuracy']:.4f}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtan", description="FedTAN on Flower: run, compare and evaluate experiments."
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    summary = "run an experiment through Flower (Ray simulation, or a federation)"
    sub = commands.add_parser("run", help=summary, description=summary)
    run.add_arguments(sub)
    sub.set_defaults(command=run.run, name="run")

    summary = "run FedTAN and its baselines on one config in this process; table and plots"
    sub = commands.add_parser("compare", help=summary, description=summary)
    compare.add_arguments(sub)
    sub.set_defaults(command=compare.compare, name="compare")

    summary = "print the test loss and accuracy of a run folder's model"
    sub = commands.add_parser("evaluate", help=summary, description=summary)
    sub.add_argument("run_dir", metavar="RUN_DIR")
    sub.set_defaults(command=evaluate, name="evaluate")
    return parser
