"""FBN and HybridBN, held to their definitions: the layers, the server's pooled statistics, and
the Flower app over the in-memory Grid.

* FBN trains with the global statistics exactly (as in eval), and the server's next global
  statistics are the mean and variance of the union of what the clients' layers normalized.
* HybridBN blends them per channel with a = sigmoid(d): d -> -inf is FBN, d -> +inf is BN with
  batch statistics (plain local BN); d is a parameter like the others.

Exact properties are checked in float64 (to 1e-10); the app's float32 runs against a float64
computation of the definition, bounded by float32's own noise measured in the same test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import Array, Message
from torch import nn

from common.experiment import task
from common.experiment.bn_baselines import (
    FBNBatchNorm1d,
    FBNBatchNorm2d,
    HybridBatchNorm2d,
    convert_fbn,
    convert_hybridbn,
    global_stats_layers,
    pooled_statistics,
)
from common.experiment.config import RunConfig
from common.experiment.methods import train_local
from common.fedtan.aggregation import average_states
from common.protocol import MODEL_RECORD, TRAIN_LOCAL
from tests.float_noise import assert_within_rounding_noise
from tests.test_baselines import BASE, K, recording, run, sent_and_replied

EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64: rounding alone is ~1e-15


def small_net() -> nn.Module:
    """BN after a convolution (2-D) and after a linear layer (1-D)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )


def with_global_statistics(layer: nn.Module, seed: int = 0) -> nn.Module:
    """A layer whose global statistics and affine parameters are far from torch's defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n = layer.num_features
        layer.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
        layer.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
    return layer


def forward_backward(layer: nn.Module, x: torch.Tensor, seed: int = 1):
    """The output, and the gradients of a random linear function of it."""
    x = x.clone().requires_grad_(True)
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * g).sum().backward()
    params = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, params


def inputs(*shape: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1


def union_moments(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of all values of ``xs`` ((N, C, ...) each)."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.size(1), -1) for x in xs], dim=1)
    var, mean = torch.var_mean(flat.double(), dim=1, correction=0)
    return mean, var, flat.size(1)


# --- FBN ----------------------------------------------------------------------------------------


def test_fbn_trains_with_the_global_statistics_exactly():
    layer = with_global_statistics(FBNBatchNorm2d(4).double()).train()
    x = inputs(6, 4, 5, 5)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("running")}
    out, grad_x, grads = forward_backward(layer, x)
    # Exactly the eval-mode computation: the batch's own statistics play no part ...
    assert torch.equal(out, layer.eval()(x))
    mean, var = (before[k].view(1, -1, 1, 1) for k in ("running_mean", "running_var"))
    w, b = layer.weight.detach().view(1, -1, 1, 1), layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + layer.eps) * w + b, **EXACT)
    # ... nor in the backward pass (no gradient through batch statistics) ...
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    torch.testing.assert_close(grad_x, g * w / torch.sqrt(var + layer.eps), **EXACT)
    # ... and the global statistics do not move in training.
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key
    # Torch's BN with batch statistics is a different computation on this input.
    torch_bn = with_global_statistics(nn.BatchNorm2d(4).double()).train()
    assert (torch_bn(x) - out).abs().max() > 0.1


def test_fbn_records_the_moments_of_every_input_it_normalizes_since_the_reset():
    layer = FBNBatchNorm1d(3).double().train()
    first, second, third = inputs(5, 3, seed=3), inputs(8, 3, seed=4), inputs(2, 3, seed=5)
    layer(first)
    layer.reset_round_moments()
    layer(second)
    layer(third)
    layer.eval()(first)  # evaluation records nothing
    mean, var, count = union_moments([second, third])
    recorded = layer.round_moments()
    assert recorded.count == count == 10
    torch.testing.assert_close(recorded.mean, mean, **EXACT)
    torch.testing.assert_close(recorded.var, var, **EXACT)


@pytest.mark.parametrize("convert", [convert_fbn, convert_hybridbn])
@pytest.mark.parametrize("batch_sizes", [(8, 8, 8), (3, 8, 13)], ids=["equal", "unequal"])
def test_pooled_statistics_are_those_of_the_union_of_the_clients_samples(convert, batch_sizes):
    """The server's next global statistics, from the clients' states after E = 3 local steps:
    the mean and variance of everything every client's layer normalized in the round."""
    torch.manual_seed(0)
    global_model = convert(small_net()).double()
    for layer in global_model.modules():
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with_global_statistics(layer)
    layers = global_stats_layers(global_model)
    assert layers == ["1", "5"]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    states = []
    for k, size in enumerate(batch_sizes):
        client = copy.deepcopy(global_model)
        for name in layers:
            client.get_submodule(name).register_forward_pre_hook(
                lambda m, args, into=seen[name]: into.append(args[0].detach().clone())
            )
        batches = [
            (inputs(size, 3, 8, 8, seed=10 * k + s), torch.arange(size) % 3) for s in range(3)
        ]
        train_local(client, batches, nn.CrossEntropyLoss(), lr=0.1, momentum=0.9)
        states.append(client.state_dict())
    pooled = pooled_statistics(states, layers)
    for name in layers:
        assert len(seen[name]) == 3 * len(batch_sizes)
        mean, var, count = union_moments(seen[name])
        torch.testing.assert_close(pooled[f"{name}.running_mean"], mean, **EXACT)
        torch.testing.assert_close(pooled[f"{name}.running_var"], var, **EXACT)
        assert int(pooled[f"{name}.round_count"]) == count
    # Not the clients' average of their own statistics: the spread of their means counts.
    naive = sum(s["1.round_m2"] / s["1.round_count"] for s in states) / len(states)
    assert (pooled["1.running_var"] - naive).abs().max() > 1e-3


# --- HybridBN -----------------------------------------------------------------------------------


def hybrid_with_d(d: float) -> HybridBatchNorm2d:
    layer = with_global_statistics(HybridBatchNorm2d(4).double()).train()
    with torch.no_grad():
        layer.mix_logit.fill_(d)
    return layer


def test_hybridbn_with_d_to_minus_infinity_is_fbn():
    x = inputs(6, 4, 5, 5)
    hybrid = hybrid_with_d(-1e3)
    assert torch.equal(torch.sigmoid(hybrid.mix_logit), torch.zeros(4, dtype=torch.float64))
    fbn = with_global_statistics(FBNBatchNorm2d(4).double()).train()
    out, grad_x, grads = forward_backward(hybrid, x)
    fbn_out, fbn_grad_x, fbn_grads = forward_backward(fbn, x)
    torch.testing.assert_close(out, fbn_out, **EXACT)
    torch.testing.assert_close(grad_x, fbn_grad_x, **EXACT)
    for name in ("weight", "bias"):
        torch.testing.assert_close(grads[name], fbn_grads[name], **EXACT)
    assert torch.equal(grads["mix_logit"], torch.zeros(4, dtype=torch.float64))
    for key in ("running_mean", "running_var", "round_count", "round_mean", "round_m2"):
        torch.testing.assert_close(hybrid.state_dict()[key], fbn.state_dict()[key], **EXACT)


def test_hybridbn_with_d_to_plus_infinity_is_local_bn():
    x = inputs(6, 4, 5, 5)
    hybrid = hybrid_with_d(1e3)
    assert torch.equal(torch.sigmoid(hybrid.mix_logit), torch.ones(4, dtype=torch.float64))
    local = with_global_statistics(nn.BatchNorm2d(4).double()).train()  # batch statistics
    out, grad_x, grads = forward_backward(hybrid, x)
    local_out, local_grad_x, local_grads = forward_backward(local, x)
    torch.testing.assert_close(out, local_out, **EXACT)
    torch.testing.assert_close(grad_x, local_grad_x, **EXACT)
    for name in ("weight", "bias"):
        torch.testing.assert_close(grads[name], local_grads[name], **EXACT)
    assert torch.equal(grads["mix_logit"], torch.zeros(4, dtype=torch.float64))


def test_hybridbn_in_between_blends_the_statistics_and_learns_d():
    x = inputs(6, 4, 5, 5)
    d = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    hybrid = hybrid_with_d(0.0)
    with torch.no_grad():
        hybrid.mix_logit.copy_(d)
    out, _, grads = forward_backward(hybrid, x)
    a = torch.sigmoid(d)
    batch_var, batch_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    mean = (1 - a) * hybrid.running_mean + a * batch_mean
    var = (1 - a) * hybrid.running_var + a * batch_var
    per_channel = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    expected = (x - per_channel(mean)) / torch.sqrt(per_channel(var) + hybrid.eps)
    expected = expected * per_channel(hybrid.weight.detach()) + per_channel(hybrid.bias.detach())
    torch.testing.assert_close(out, expected, **EXACT)
    assert (grads["mix_logit"].abs() > 1e-6).all()  # d is learned
    # Evaluation uses the global statistics alone, whatever d.
    torch_eval = with_global_statistics(nn.BatchNorm2d(4).double()).eval()
    torch.testing.assert_close(hybrid.eval()(x), torch_eval(x), **EXACT)


# --- conversion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("convert", "extra"),
    [(convert_fbn, set()), (convert_hybridbn, {"mix_logit"})],
)
def test_conversion_keeps_the_values_and_adds_the_round_moments(convert, extra):
    torch.manual_seed(0)
    model = small_net()
    for layer in (model[1], model[5]):
        with_global_statistics(layer)
    before = model.state_dict()
    converted = convert(copy.deepcopy(model))
    assert [type(m).__name__ for m in (converted[1], converted[5])] == [
        f"{'FBN' if convert is convert_fbn else 'Hybrid'}BatchNorm{d}d" for d in (2, 1)
    ]
    state = converted.state_dict()
    new = {"round_count", "round_mean", "round_m2"} | extra
    assert set(state) == set(before) | {f"{i}.{k}" for i in (1, 5) for k in new}
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    x = inputs(4, 3, 8, 8).float()
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))  # eval: torch's BN


def test_conversion_refuses_layers_it_cannot_convert_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="layer '1' has track_running_stats=False"):
        convert_fbn(model)
    assert type(model[0]) is nn.BatchNorm2d
    with pytest.raises(TypeError, match="layer '0' is a SyncBatchNorm"):
        convert_hybridbn(nn.Sequential(nn.SyncBatchNorm(3)))


# --- the Flower app -----------------------------------------------------------------------------


def reference(cfg: RunConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The method by its definition, in one process: every client trains E local steps from the
    global model; the server averages the models, and the next global statistics of each BN
    layer are the mean and variance of the union of the inputs the clients' layers normalized."""
    model = task.build_global_model(cfg).to(dtype)
    layers = global_stats_layers(model)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for r in range(1, cfg.num_rounds + 1):
        states, weights, seen = [], [], {name: [] for name in layers}
        for k in range(K):
            client = task.build_global_model(cfg).to(dtype)
            client.load_state_dict(global_state)
            for name in layers:
                client.get_submodule(name).register_forward_pre_hook(
                    lambda m, args, into=seen[name]: into.append(args[0].detach().clone())
                )
            batches = [
                (x.to(dtype), y)
                for x, y in task.client_batches(
                    cfg, k, K, r, batch_size=cfg.batch_size, local_steps=cfg.local_steps
                )
            ]
            train_local(
                client,
                batches,
                task.loss_fn,
                lr=cfg.lr_at(r),
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
            )
            states.append(client.state_dict())
            weights.append(sum(len(y) for _, y in batches))
        global_state = average_states(states, weights)
        for name in layers:
            mean, var, count = union_moments(seen[name])
            global_state[f"{name}.running_mean"] = mean.to(dtype)
            global_state[f"{name}.running_var"] = var.to(dtype)
            global_state[f"{name}.round_count"] = torch.tensor(count)
            global_state[f"{name}.round_mean"] = mean.to(dtype)
            global_state[f"{name}.round_m2"] = (var * count).to(dtype)
    return global_state


@pytest.mark.parametrize("method", ["fbn", "hybridbn"])
def test_the_app_gives_the_method_computed_from_its_definition(tmp_path, method):
    overrides = {"num-rounds": 3}
    result, _ = run(tmp_path, method, **overrides)
    cfg = RunConfig.from_flower({**BASE, "method": method, **overrides})
    got = result.arrays.to_torch_state_dict()
    plain32, exact64 = reference(cfg, torch.float32), reference(cfg, torch.float64)
    assert list(got) == list(plain32)
    assert any(k.endswith("mix_logit") for k in got) == (method == "hybridbn")
    start = task.build_global_model(cfg).state_dict()
    assert_within_rounding_noise(got, plain32, exact64, start)
    # The server evaluated the global model, with the global statistics.
    assert set(result.evaluate_metrics_serverapp) == {0, 1, 2, 3}


@pytest.mark.parametrize("method", ["fbn", "hybridbn"])
def test_the_recorded_moments_travel_as_model_traffic(tmp_path, method):
    replies: list[Message] = []
    result, grid = run(tmp_path, method, faults=recording(replies), **{"num-rounds": 1})
    down, up = sent_and_replied(grid, replies, TRAIN_LOCAL)
    for msg in down + up:
        keys = set(msg.content.array_records[MODEL_RECORD])
        assert {"bn1.round_m2", "bn3.round_count", "bn2.running_var"} <= keys
    rows = (tmp_path / method / "metrics.csv").read_text().splitlines()
    row = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    state = result.arrays.to_torch_state_dict()
    whole = sum(v.numel() * v.element_size() for v in state.values())
    assert int(row["model_bytes"]) == 2 * K * whole
    assert int(row["round_trips"]) == 1
    assert int(row["bn_bytes_up"]) == int(row["bn_bytes_down"]) == 0


def test_a_client_with_unusable_moments_is_named_and_the_round_retried_without_it(tmp_path, caplog):
    def corrupts_its_moments(reply: Message) -> Message:
        if reply.metadata.message_type == TRAIN_LOCAL and not reply.has_error():
            model = reply.content.array_records[MODEL_RECORD]
            m2 = model["bn2.round_m2"].numpy().copy()
            m2[0] = float("nan")
            model["bn2.round_m2"] = Array(m2)
        return reply

    result, _ = run(tmp_path, "fbn", faults={1002: corrupts_its_moments})
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("node 1002" in f and "bn2" in f and "m2" in f for f in failures), failures
    assert all(m["clients"] == K - 1 for m in result.train_metrics_clientapp.values())
    state = result.arrays.to_torch_state_dict()
    assert all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())


def test_fbn_and_hybridbn_need_batchnorm():
    for method in ("fbn", "hybridbn"):
        with pytest.raises(ValueError, match=f"'{method}' needs 'norm' = 'batch'"):
            RunConfig.from_flower({**BASE, "method": method, "norm": "group"})
