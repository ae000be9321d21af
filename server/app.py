"""The FedTAN ServerApp: config -> model and strategy -> rounds -> results in the output folder."""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from common import task
from common.bn_sync import trace_sync_points
from common.config import RunConfig
from server.results import RunRecorder
from server.strategy import FedTAN

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)  # a wrong key or value stops here
    run_fedtan(grid, cfg)


def run_fedtan(grid: Grid, cfg: RunConfig) -> Result:
    """A whole FedTAN run on ``grid``; results go to ``cfg.output_dir`` round by round."""
    model = task.build_global_model(cfg)
    inputs, targets = task.example_batch(cfg)
    sync_points = trace_sync_points(model, inputs, targets, task.loss_fn)
    recorder = RunRecorder(cfg)
    strategy = FedTAN(
        sync_points=sync_points,
        num_clients=cfg.num_clients,
        clients_per_round=cfg.clients_per_round,
        seed=cfg.seed,
        reply_timeout=cfg.reply_timeout,
        on_failure=cfg.on_failure,
        max_retries=cfg.max_retries,
        lr_schedule=cfg.lr_at,
        on_round=recorder,
    )
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
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(task.evaluate(model, cfg))

    result = strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=cfg.num_rounds,
        train_config=train_config,
        evaluate_fn=evaluate,
    )
    done = len(result.train_metrics_clientapp)
    recorder.finish("completed" if done == cfg.num_rounds else "stopped", done)
    log(INFO, "Results in %s (%d of %d rounds)", cfg.output_path.resolve(), done, cfg.num_rounds)
    return result
