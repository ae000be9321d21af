"""The ServerApp: config -> model and strategy -> rounds -> results in the output folder.

Run config ``method`` picks FedTAN or one of its baselines (``common/experiment/methods.py``),
``transport`` how FedTAN's BN statistics travel (``common/transports/``).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.methods import METHODS
from common.fedtan.bn_sync import trace_sync_points
from common.protocol import TrainSettings
from common.state_records import record_to_state, state_to_record
from common.transports.base import Transport
from common.transports.grpc.server import GrpcTransport, trace_sync_shape
from common.transports.grpc.service import SyncShape
from common.transports.grpc.wire import StateSpec, state_spec
from common.transports.inprocess import InProcessTransport
from common.transports.messages.server import MessagesTransport, SyncPoints
from server.baselines import baseline_strategy
from server.results import RunRecorder
from server.strategy import FedTAN, RoundStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)  # a wrong key or value stops here
    run_fedtan(grid, cfg)


def run_fedtan(grid: Grid, cfg: RunConfig) -> Result:
    """A whole run of ``cfg.method`` (FedTAN or a baseline) on ``grid``; results go to
    ``cfg.output_dir`` round by round (``server/results.py``). ``summary.json`` says how it
    ended, also when it raises (Flower then marks the run failed)."""
    recorder = RunRecorder(cfg)  # refuses a folder of another run, before anything is written
    _interrupt_on_flower_exit(recorder)
    try:
        result, stop_reason = _run(grid, cfg, recorder)
        recorder.flush()  # the last round's files are written (a failure to: the run failed)
    except BaseException as error:
        recorder.finish("failed", f"{type(error).__name__}: {error}")
        raise
    done = recorder.rounds_completed
    if done == cfg.num_rounds:
        recorder.finish("completed")
    else:
        recorder.finish("stopped", stop_reason or "a round failed")
    log(INFO, "Results in %s (%d of %d rounds)", cfg.output_path.resolve(), done, cfg.num_rounds)
    return result


STOPPED_BY_FLOWER = "stopped by Flower (flwr stop, or a signal to the ServerApp's process)"


def _interrupt_on_flower_exit(recorder: RunRecorder) -> None:
    """Flower ends a stopped run's ServerApp (``flwr stop``, SIGINT, SIGTERM) inside its exit
    handlers, and with ``os._exit`` if they take over 5 s: the app may never see an exception.
    So the summary is closed in a handler of its own, run before that timer starts. The hook is
    Flower's internal API (flwr 1.42, pinned); without it a stopped run's summary stays
    "running" until ``fedtan run`` or a resume reads the folder."""
    try:
        from flwr.supercore.exit import add_exit_handler
    except ImportError:  # pragma: no cover - another Flower version
        log(WARNING, "No Flower exit hook: a stopped run's summary.json will say 'running'")
        return
    # Also called when a finished run's process exits: then the run has ended and it is a no-op.
    add_exit_handler(lambda: recorder.interrupt(STOPPED_BY_FLOWER), run_before_force_exit=True)


def _run(grid: Grid, cfg: RunConfig, recorder: RunRecorder) -> tuple[Result, str | None]:
    """The rounds still to run, from where ``recorder``'s folder left off; the result and
    why the run stopped early (None: it did not)."""
    task.pick_device(cfg.device)  # a CUDA device asked for but absent stops the run here
    model = task.build_global_model(cfg)  # a dataset that cannot load fails the run here
    resume = recorder.resume_point
    if resume.state is not None:
        model.load_state_dict(resume.state)
    loop = {
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "seed": cfg.seed,
        "on_failure": cfg.on_failure,
        "max_retries": cfg.max_retries,
        "lr_schedule": cfg.lr_at,
        "evaluate_on_clients": METHODS[cfg.method].evaluate_on_clients,
        "eval_interval": cfg.eval_interval,
        "min_nodes_timeout": cfg.min_nodes_timeout,
    }
    transport = None
    if cfg.method == "fedtan":
        inputs, targets = task.example_batch(cfg)
        sync_points = trace_sync_points(model, inputs, targets, task.loss_fn)
        transport = make_transport(
            cfg,
            sync_points,
            lambda: trace_sync_shape(model, inputs, targets, task.loss_fn),
            state_spec(model.state_dict()),
        )
        strategy: RoundStrategy = FedTAN(sync_points=sync_points, transport=transport, **loop)
    else:
        strategy = baseline_strategy(cfg, model, **loop)
    strategy.on_round = lambda server_round, result, cost: recorder.record(
        server_round, result, cost, excluded_partitions=strategy.excluded_partitions
    )
    strategy.resume_from(resume.rounds_done, resume.excluded_partitions)
    settings = TrainSettings(
        batch_size=cfg.batch_size,
        local_steps=cfg.local_steps,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round % cfg.eval_interval and server_round != cfg.num_rounds:
            return None
        model.load_state_dict(record_to_state(arrays))
        return MetricRecord(task.evaluate(model, cfg))

    try:
        if transport is not None:
            nodes = strategy.sample_nodes(grid, 1, timeout=cfg.reply_timeout)
            transport.check(grid, nodes, cfg.reply_timeout)
        result = strategy.start(
            grid,
            state_to_record(model.state_dict()),
            num_rounds=cfg.num_rounds,
            timeout=cfg.reply_timeout,
            train_config=ConfigRecord(settings.to_config()),
            # no single global model: the clients evaluate (configure_evaluate)
            evaluate_fn=None if strategy.evaluate_on_clients else evaluate,
        )
    finally:
        if transport is not None:
            transport.close()
    return result, strategy.stop_reason


def make_transport(
    cfg: RunConfig,
    sync_points: SyncPoints,
    sync_shape: Callable[[], SyncShape],
    model_state: StateSpec = (),
) -> Transport:
    """The transport run config ``transport`` names (its choices: ``common.transports.NAMES``).

    ``sync_shape``: traces the step's exchanges with their shapes, for a transport that checks
    the clients' numbers against them (grpc); ``model_state``: the global model's entries, what
    the clients of a block of rounds upload (grpc, ``rounds-per-message`` > 1)."""
    if cfg.transport == "grpc":
        return GrpcTransport(
            cfg,
            shape=sync_shape(),
            max_clients=cfg.num_clients,
            max_retries=cfg.max_retries,
            state=model_state,
        )
    if cfg.transport == "messages":
        return MessagesTransport(sync_points)
    if cfg.transport == "inprocess":
        return InProcessTransport()
    raise ValueError(f"run config 'transport': no transport named {cfg.transport!r}")
