"""Run config ``device``, ``precision`` and ``channels-last``: where and how the app computes.

* ``device`` is explicit: a CUDA device asked for but absent fails at start, naming the key.
* ``precision = "bf16"``: the clients' forward pass and loss run under bfloat16 autocast, and
  FedTAN with E = 1 stays centralized SGD under the same autocast, to bfloat16's own noise.
* ``channels-last``: images and conv weights in channels-last order give the default's model to
  float32's own noise, and the model travels in the standard layout.
"""

from __future__ import annotations

import pytest
import torch

from client.app import app as client_app
from common.experiment import device as placement
from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.methods import union_batches
from common.fedtan import train_client
from server.app import run_fedtan
from server.local_run import LocalGrid, flower_in_this_process, run_locally
from tests.devices import device_params
from tests.float_noise import NOISE_FACTOR, assert_within_rounding_noise, relative_error

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "partition": "sorted",
    "num-clients": 3,
    "batch-size": 12,
    "num-rounds": 1,
    "local-steps": 1,
    "lr": 0.5,
    "device": "cpu",
}


def app_model(tmp_path, **overrides) -> dict[str, torch.Tensor]:
    run_config = {**BASE, "output-dir": str(tmp_path / "out"), **overrides}
    result, _ = run_locally(client_app, run_config)
    assert len(result.train_metrics_clientapp) == RunConfig.from_flower(run_config).num_rounds
    return result.arrays.to_torch_state_dict()


def centralized_model(
    cfg: RunConfig, dtype: torch.dtype, autocast_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Round 1 as one SGD step on the union of the clients' batches, in ``dtype``."""
    model = task.build_global_model(cfg).to(dtype)
    batches = [
        (x.to(dtype), y)
        for x, y in union_batches(task.every_client_batches(cfg, cfg.num_clients, 1))
    ]
    train_client(model, batches, task.loss_fn, lr=cfg.lr, autocast_dtype=autocast_dtype)
    return model.state_dict()


# --- device --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("device", "gpu", "run config 'device'"),
        ("device", "cuda:x", "run config 'device'"),
        ("precision", "fp8", "run config 'precision'"),
        ("channels-last", 1, "run config 'channels-last': expected true or false, got 1"),
    ],
)
def test_a_wrong_device_precision_or_layout_fails_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_flower({key: value})


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_asked_for_on_a_machine_without_it_fails_at_start_naming_the_key(
    tmp_path, monkeypatch, spec
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="run config 'device' is 'cuda"):
        placement.resolve_device(spec)
    with pytest.raises(RuntimeError, match="run config 'device'"):
        run_locally(client_app, {**BASE, "device": spec, "output-dir": str(tmp_path / "out")})
    assert not (tmp_path / "out" / "model.pt").exists()  # no round ran


def test_a_cuda_index_beyond_the_machines_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placement.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match="'cuda:2' but this machine has 2 CUDA device"):
        placement.resolve_device("cuda:2")


def test_auto_is_the_local_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement.resolve_device("auto") == torch.device("cuda")


@pytest.fixture
def strict_float32(monkeypatch):
    """TF32 off and deterministic cuDNN, so that float32 on CUDA means float32; restored after."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(matmul)


@device_params
def test_the_grpc_transport_with_clients_on_the_device_gives_the_in_process_model(
    tmp_path, strict_float32, device
):
    """Clients on ``device`` (run config ``device``) over the BN sync service give the
    in-process engine's model on the same device, to float32's own noise there."""
    overrides = {"num-rounds": 2, "local-steps": 2, "transport": "grpc", "momentum": 0.9}
    got = app_model(tmp_path, **overrides, device=device)
    cfg = RunConfig.from_flower({**BASE, **overrides})
    start = task.build_global_model(cfg).state_dict()
    assert_within_rounding_noise(
        got,
        _engine_model(cfg, torch.float32, device),
        _engine_model(cfg, torch.float64, device),
        start,
    )


def test_the_start_up_hint_names_the_gpu_share(tmp_path):
    """Clients that cannot join together (here one at a time, as with too few Ray actors or
    too large a GPU share): the error says to give each at most 1/K of a GPU."""
    run_config = {**BASE, "output-dir": str(tmp_path / "out"), "transport": "grpc"}
    run_config["bn-sync-timeout"] = 1.0
    grid = LocalGrid(client_app, 3, run_config, concurrency=1)
    with pytest.raises(RuntimeError, match=r"at most 1/K of a GPU per client"):
        with flower_in_this_process():
            run_fedtan(grid, RunConfig.from_flower(run_config))


# --- precision -----------------------------------------------------------------------------


def test_bf16_fedtan_with_one_local_step_is_centralized_sgd_under_bf16(tmp_path):
    """bf16 rounding is 2^16 times float32's, so the bound is bf16's own: the app's model (over
    either transport) is no farther from the exact (float64) step than NOISE_FACTOR times the
    centralized step computed under the same bf16 autocast. bf16 must have been used: the model
    is farther from the exact step than float32 computation would be. And the transports agree
    to float32's noise: the replayed step ("messages") computes what the live one ("grpc")
    does, autocast included."""
    cfg = RunConfig.from_flower(BASE)
    start = task.build_global_model(cfg).state_dict()
    exact = centralized_model(cfg, torch.float64)
    plain_bf16 = centralized_model(cfg, torch.float32, autocast_dtype=torch.bfloat16)
    fp32_noise = relative_error(centralized_model(cfg, torch.float32), exact, start)
    models = {}
    for transport in ("messages", "grpc"):
        got = app_model(tmp_path / transport, precision="bf16", transport=transport)
        assert_within_rounding_noise(got, plain_bf16, exact, start)
        assert relative_error(got, exact, start) > NOISE_FACTOR * fp32_noise, "bf16 unused"
        assert all(got[k].dtype == v.dtype for k, v in start.items())  # parameters stay fp32
        models[transport] = got
    between = relative_error(models["messages"], models["grpc"], start)
    assert between <= NOISE_FACTOR * fp32_noise, f"transports differ by {between:.3g}"


def test_bf16_server_evaluation_runs_under_autocast(tmp_path):
    cfg = RunConfig.from_flower({**BASE, "precision": "bf16"})
    model = task.build_global_model(cfg)
    under_bf16 = task.evaluate(model, cfg)
    plain = task.evaluate(model, RunConfig.from_flower(BASE))
    assert under_bf16["test-loss"] != plain["test-loss"]
    assert abs(under_bf16["test-loss"] - plain["test-loss"]) < 0.05 * plain["test-loss"]


# --- channels-last -------------------------------------------------------------------------


def test_channels_last_gives_the_default_model_within_float32_noise(tmp_path):
    overrides = {"num-rounds": 2, "local-steps": 2, "transport": "grpc", "momentum": 0.9}
    got = app_model(tmp_path / "cl", **overrides, **{"channels-last": True})
    default = app_model(tmp_path / "default", **overrides)
    cfg = RunConfig.from_flower({**BASE, **overrides})
    start = task.build_global_model(cfg).state_dict()
    # Float32 noise of the same rounds: the default layout against its float64 twin.
    exact = _engine_model(cfg, torch.float64)
    assert_within_rounding_noise(got, default, exact, start)
    assert all(v.is_contiguous() for v in got.values())  # the standard layout travels


def test_channels_last_is_used_for_images_and_4d_weights():
    model = placement.place_model(
        task.build_global_model(RunConfig.from_flower(BASE)), torch.device("cpu"), True
    )
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = placement.place_inputs(torch.randn(4, 3, 8, 8), torch.device("cpu"), True)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert placement.place_inputs(torch.randn(4, 3), torch.device("cpu"), True).is_contiguous()


def _engine_model(
    cfg: RunConfig, dtype: torch.dtype, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """``cfg``'s rounds by the in-process engine in ``dtype`` on ``device``; the state on the
    CPU in the parameters' original dtypes' place (``dtype``)."""
    model = task.build_global_model(cfg).to(device, dtype)
    for r in range(1, cfg.num_rounds + 1):
        batches = [
            [(x.to(device, dtype), y.to(device)) for x, y in client]
            for client in task.every_client_batches(cfg, cfg.num_clients, r)
        ]
        model.load_state_dict(task.engine_round(model, cfg, batches, r))
    return {key: value.cpu() for key, value in model.state_dict().items()}
