"""The ServerApp: config -> model and strategy -> rounds -> results in the output folder.

Run config ``method`` picks FedTAN or one of its baselines (``common/methods.py``).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.methods import METHODS
from common.fedtan.bn_sync import trace_sync_points
from common.transports.grpc.server import GrpcSync
from server.baselines import baseline_strategy
from server.results import RunRecorder
from server.strategy import FedTAN

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)  # a wrong key or value stops here
    run_fedtan(grid, cfg)


def run_fedtan(grid: Grid, cfg: RunConfig) -> Result:
    """A whole run of ``cfg.method`` (FedTAN or a baseline) on ``grid``; results go to
    ``cfg.output_dir`` round by round."""
    model = task.build_global_model(cfg)
    recorder = RunRecorder(cfg)
    loop = {
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "seed": cfg.seed,
        "reply_timeout": cfg.reply_timeout,
        "on_failure": cfg.on_failure,
        "max_retries": cfg.max_retries,
        "lr_schedule": cfg.lr_at,
        "on_round": recorder,
    }
    grpc_sync = None
    if cfg.method == "fedtan":
        inputs, targets = task.example_batch(cfg)
        sync_points = trace_sync_points(model, inputs, targets, task.loss_fn)
        grpc_sync = GrpcSync(cfg, max_clients=cfg.num_clients) if cfg.transport == "grpc" else None
        strategy = FedTAN(sync_points=sync_points, grpc_sync=grpc_sync, **loop)
    else:
        strategy = baseline_strategy(cfg, model, **loop)
    train_config = ConfigRecord(
        {
            "batch-size": cfg.batch_size,
            "local-steps": cfg.local_steps,
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "weight-decay": cfg.weight_decay,
        }
    )

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round % cfg.eval_interval and server_round != cfg.num_rounds:
            return None
        if METHODS[cfg.method].evaluate_on_clients:  # no global model: each client its own BN
            return strategy.evaluate_on_clients(grid, server_round, arrays)
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(task.evaluate(model, cfg))

    try:
        if grpc_sync is not None:
            grpc_sync.preflight(grid, strategy.sample_nodes(grid, 1), cfg.reply_timeout)
        result = strategy.start(
            grid,
            ArrayRecord(model.state_dict()),
            num_rounds=cfg.num_rounds,
            train_config=train_config,
            evaluate_fn=evaluate,
        )
    finally:
        if grpc_sync is not None:
            grpc_sync.stop()
    done = len(result.train_metrics_clientapp)
    recorder.finish("completed" if done == cfg.num_rounds else "stopped", done)
    log(INFO, "Results in %s (%d of %d rounds)", cfg.output_path.resolve(), done, cfg.num_rounds)
    return result
