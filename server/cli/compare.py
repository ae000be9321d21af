"""``fedtan compare``: FedTAN and its baselines on one base config; a markdown table, plots.

    fedtan compare configs/compare-digits.toml --out docs/results/digits-e1 \\
        [--methods centralized,fedtan,...] [--set local-steps=5 --set num-rounds=100] \\
        [--runs outputs/compare/digits-e1] [--target 0.9]

Each method runs in this process: the real ServerApp code drives the real ClientApp through the
in-memory Grid (``server.local_run.run_locally``), one context per node, every message
deep-copied as if it crossed a network, one node at a time (``concurrency=1``: handlers in
concurrent threads have hit a CPython 3.11 bug, "AST constructor recursion depth mismatch",
which fails a client and so changes the experiment).
That is the server and client logic ``flwr run`` executes, without a SuperLink, Ray actors and
protobuf serialization per message, which on a small CPU machine would cost more than the
training. The byte counts are those of the messages' arrays, as over Flower. For a real Flower
simulation of one method: ``fedtan run CONFIG --set method=...``.

Resumable: a method whose run folder holds a completed ``summary.json`` for the same config,
every round trained by all its clients, is not run again. Output: ``table.md`` (with the
command), ``metrics.csv`` (all methods' rounds), ``accuracy.png`` and ``loss.png`` (vs round
and vs cumulative training traffic).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import time
from pathlib import Path

from client.app import app as client_app
from common.experiment.config import RunConfig
from common.experiment.methods import METHODS, check_method_names
from server.checkpoint import run_description
from server.cli.settings import (
    PROJECT_DIR,
    ConfigError,
    app_defaults,
    merge,
    parse_override,
    read_toml,
    validate,
)
from server.local_run import run_locally

DEFAULT_METHODS = ",".join(METHODS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="base run config (TOML), on top of pyproject's defaults")
    parser.add_argument("--out", required=True, help="folder for table.md, metrics.csv, PNGs")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run config override"
    )
    parser.add_argument("--runs", help="folder for the runs (default outputs/compare/<out name>)")
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy to reach")
    parser.add_argument("--quiet", action="store_true", help="only the progress lines")


def compare(args: argparse.Namespace) -> int:
    """The ``compare`` subcommand: every method in turn, then the table and plots."""
    if args.quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        check_method_names(methods)
    except ValueError as error:
        raise ConfigError(f"--methods: {error}") from None
    base = base_config(args.config, args.set)
    for method in methods:  # every method's config is checked before the first one runs
        validate(method_config(base, method, Path("-")))
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else PROJECT_DIR / "outputs" / "compare" / out.name
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for i, method in enumerate(methods, start=1):
        run_config = method_config(base, method, runs / method)
        cfg = RunConfig.from_flower(run_config)
        if completed(cfg):
            print(f"[{i}/{len(methods)}] {method}: done before, skipped ({cfg.output_dir})")
            continue
        print(f"[{i}/{len(methods)}] {method}: {cfg.num_rounds} rounds ...", flush=True)
        t0 = time.monotonic()
        # No method needs its nodes at once; a folder with an unfinished or other run of the
        # method is replaced.
        run_locally(client_app, {**run_config, "overwrite": True}, concurrency=1)
        print(
            f"[{i}/{len(methods)}] {method}: finished in {time.monotonic() - t0:.0f} s "
            f"(suite so far {time.monotonic() - started:.0f} s)",
            flush=True,
        )
    rows = {m: load_rows(runs / m) for m in methods}
    write_metrics(out / "metrics.csv", rows)
    command = "fedtan compare " + shlex.join(_command_args(args))
    (out / "table.md").write_text(table(rows, base, args.target, command))
    plot(rows, out)
    print(f"Wrote {out / 'table.md'}, {out / 'metrics.csv'}, accuracy.png, loss.png")
    return 0


def _command_args(args: argparse.Namespace) -> list[str]:
    """The arguments that reproduce this comparison, for the table."""
    words = [args.config, "--out", args.out]
    if args.methods != DEFAULT_METHODS:
        words += ["--methods", args.methods]
    for item in args.set:
        words += ["--set", item]
    if args.runs:
        words += ["--runs", args.runs]
    if args.target != 0.9:
        words += ["--target", str(args.target)]
    return words


def base_config(path: str, overrides: list[str]) -> dict:
    """The app's defaults, the file, the overrides; unknown keys are named (ConfigError)."""
    layers = [(path, read_toml(path)), ("--set", dict(parse_override(o) for o in overrides))]
    return merge(app_defaults(), layers)


def method_config(base: dict, method: str, output_dir: Path) -> dict:
    config = {**base, "method": method, "output-dir": str(output_dir)}
    if (norm := METHODS[method].norm) is not None:  # FedAvg + GN: the network with GroupNorm
        config["norm"] = norm
    return config


def completed(cfg: RunConfig) -> bool:
    """A finished run of exactly this config is in its output folder."""
    folder = cfg.output_path
    try:
        summary = json.loads((folder / "summary.json").read_text())
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = json.loads(json.dumps(run_description(cfg)))
    if summary.get("status") != "completed" or saved != wanted:
        return False
    if short := degraded(load_rows(folder), cfg):
        print(f"{cfg.method}: rounds {short} lacked clients (a failure); running it again")
        return False
    return True


def degraded(rows: list[dict], cfg: RunConfig) -> list[int]:
    """Rounds trained by fewer clients than the config asks for (a client failed)."""
    wanted = cfg.clients_per_round or cfg.num_clients
    return [r["round"] for r in rows if r["clients"] < wanted]


def load_rows(folder: Path) -> list[dict]:
    return json.loads((folder / "metrics.json").read_text())


def traffic(row: dict) -> int:
    """Training traffic of a round (model and BN statistics, both directions)."""
    return int(row["model_bytes"] + row["bn_bytes_down"] + row["bn_bytes_up"])


def write_metrics(path: Path, rows: dict[str, list[dict]]) -> None:
    fields = list(dict.fromkeys(k for rs in rows.values() for r in rs for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", *fields])
        writer.writeheader()
        for method, rs in rows.items():
            writer.writerows({"method": method, **r} for r in rs)


def table(rows: dict[str, list[dict]], base: dict, target: float, command: str) -> str:
    cfg = RunConfig.from_flower({**base, "output-dir": "-"})
    lines = [
        f"# {cfg.dataset}: FedTAN and baselines, E = {cfg.local_steps}",
        "",
        f"{cfg.num_clients} clients ({cfg.partition} split), {cfg.model}, batch {cfg.batch_size}"
        f" per client, E = {cfg.local_steps} local steps, lr {cfg.lr:g}"
        + (f" (x{cfg.lr_gamma:g} at rounds {cfg.lr_milestones})" if cfg.milestones else "")
        + f", momentum {cfg.momentum:g}, weight decay {cfg.weight_decay:g}, {cfg.num_rounds}"
        f" rounds, seed {cfg.seed}. Test accuracy of the global model after each round "
        "(FedBN, SiloBN: mean over the clients, each with its own BN layers).",
        "",
        "| method | final acc. | best acc. (round) | rounds to "
        f"{target:.0%} | s / round | model MB / round | BN stats kB / round | "
        "round trips / round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, rs in rows.items():
        evaluated = [r for r in rs if "test-accuracy" in r]
        final = evaluated[-1]["test-accuracy"] if evaluated else float("nan")
        best = max(evaluated, key=lambda r: r["test-accuracy"]) if evaluated else None
        reach = next((r["round"] for r in evaluated if r["test-accuracy"] >= target), None)
        n = len(rs)
        lines.append(
            f"| {METHODS[method].label} | {final:.4f} | "
            + (f"{best['test-accuracy']:.4f} ({best['round']})" if best else "-")
            + f" | {reach if reach is not None else 'not reached'}"
            f" | {sum(r['seconds'] for r in rs) / n:.2f}"
            f" | {sum(r['model_bytes'] for r in rs) / n / 1e6:.3f}"
            f" | {sum(r['bn_bytes_down'] + r['bn_bytes_up'] for r in rs) / n / 1e3:.1f}"
            f" | {sum(r['round_trips'] for r in rs) / n:g} |"
        )
    lines += [
        "",
        "Model MB: the model's arrays down and up, all clients together; BN stats: FedTAN's"
        " extra statistics (down + up). Client-side evaluation (FedBN, SiloBN) is not"
        " counted there: "
        + ", ".join(
            f"{METHODS[m].label} {sum(r.get('eval_bytes', 0) for r in rs) / len(rs) / 1e6:.3f} MB"
            for m, rs in rows.items()
            if any(r.get("eval_bytes") for r in rs)
        )
        + " per round. Seconds: wall time of a round on this machine, evaluation included.",
        "",
    ]
    cfgs = {m: RunConfig.from_flower(method_config(base, m, Path("-"))) for m in rows}
    failed = {m: degraded(rs, cfgs[m]) for m, rs in rows.items() if degraded(rs, cfgs[m])}
    lines += [f"**A client failed** in {m}, rounds {r} (fewer clients)." for m, r in failed.items()]
    lines += [
        "![accuracy](accuracy.png)",
        "",
        "![loss](loss.png)",
        "",
        "Reproduce (per-round data of every method: `metrics.csv`):",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, name, ylabel in (
        ("test-accuracy", "accuracy", "test accuracy"),
        ("test-loss", "loss", "test loss"),
    ):
        fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
        # The centralized reference last and dashed: FedTAN with E = 1 lies exactly under it.
        for method in sorted(rows, key=lambda m: m == "centralized"):
            rs = rows[method]
            cumulative, total = [], 0
            for r in rs:
                total += traffic(r)
                cumulative.append(total / 1e6)
            points = [
                (r["round"], c, r[metric])
                for r, c in zip(rs, cumulative, strict=True)
                if metric in r
            ]
            if not points:
                continue
            rounds, mbytes, values = zip(*points, strict=True)
            style = {"label": METHODS[method].label, "linewidth": 1.4}
            if method == "centralized":
                style.update(color="black", linestyle=(0, (4, 3)), zorder=5)
            by_round.plot(rounds, values, **style)
            if total > 0:  # the centralized reference sends nothing
                by_bytes.plot(mbytes, values, **style)
        by_round.set_xlabel("round")
        by_bytes.set_xlabel("cumulative training traffic (MB, model + BN statistics)")
        by_bytes.set_xscale("log")
        for ax in (by_round, by_bytes):
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if metric == "test-loss":
                ax.set_yscale("log")
        by_round.legend(fontsize=8)
        fig.suptitle(f"{ylabel} vs round and vs bytes (centralized: no traffic)")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
