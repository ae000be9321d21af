"""The batched engine (common/fedtan/batched.py) computes exactly FedTAN's round.

It is held to the same specifications as the threaded engine: one round with one local step is
one centralized SGD step on the union batch, several local steps equal the threaded engine and
an independent reference, running statistics included; and where it cannot run a round
(unequal batches, BN momentum None, a forward vmap refuses), ``synced_round`` gives the threaded
engine's model instead of a wrong one.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from common.fedtan import synced_round
from common.fedtan.batched import CPU_BATCHED_MAX_SAMPLES, BatchedClients, batching_obstacle
from common.fedtan.engine import ClientReplicas
from tests.devices import device_params
from tests.float_noise import assert_within_rounding_noise, relative_error
from tests.test_fedtan import (
    F64_REL_TOL,
    MODELS,
    NUM_CLASSES,
    centralized_step,
    fedtan_round_reference,
    make_batches,
    make_model,
    mlp,
    to_float64,
)

SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def bn3d() -> nn.Module:
    """BatchNorm3d and BatchNorm1d layers (test_fedtan's seq3d has a momentum=None layer, which
    the batched engine leaves to the threads)."""
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Conv3d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm3d(6, momentum=0.3),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, NUM_CLASSES),
    )


class ReadsAValue(nn.Module):
    """A forward that reads a value (``.item()``): vmap cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MODELS["small_cnn"][0]()

    def forward(self, x):
        scale = 2.0 if x.abs().max().item() > 100 else 1.0
        return self.net(x * scale)


class TiedWeights(nn.Module):
    """Two convolutions that share one weight: one tensor under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2.weight = self.conv1.weight
        self.head = nn.Linear(3, NUM_CLASSES)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(x.mean((2, 3)))


# Models batched here, with the models of test_fedtan.py (and its input shapes).
EXTRA_MODELS = {
    "bn3d": (bn3d, (2, 4, 4, 4)),
    "reads-a-value": (ReadsAValue, (3, 8, 8)),
    "tied-weights": (TiedWeights, (3, 5, 5)),
}


@pytest.fixture(autouse=True)
def _extra_models(monkeypatch):
    for name, entry in EXTRA_MODELS.items():
        monkeypatch.setitem(MODELS, name, entry)


def batched_round(model, batches, **sgd):
    """The batched engine itself, without synced_round's fallback."""
    assert batching_obstacle(model, batches) is None
    return BatchedClients(model).round(batches, nn.CrossEntropyLoss(), **sgd)


def threaded_round(model, batches, **sgd):
    return synced_round(model, batches, nn.CrossEntropyLoss(), batched=False, **sgd)


# --- Exactly FedTAN -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "bn3d"])
def test_one_round_equals_one_centralized_step_and_the_threaded_round(name):
    model = make_model(name, torch.float64)
    batches = make_batches(name, (4, 4, 4, 4), torch.float64)

    got = batched_round(model, batches, **SGD)

    start = model.state_dict()
    assert relative_error(got, centralized_step(model, batches, **SGD), start) <= F64_REL_TOL
    assert relative_error(got, threaded_round(model, batches, **SGD), start) <= F64_REL_TOL


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "bn3d"])
def test_rounds_with_three_local_steps_in_a_row_equal_the_threaded_engine(name):
    """3 chained rounds of E = 3 (each new global state loaded), the clients' models reused
    through ClientReplicas as a run does: the same states, running statistics and
    num_batches_tracked included."""
    batched = make_model(name, torch.float64)
    threaded = copy.deepcopy(batched)
    replicas = ClientReplicas(batched)
    for round_ in range(3):
        batches = make_batches(name, (3, 3, 3), torch.float64, steps=3, seed=10 + round_)
        start = {k: v.clone() for k, v in threaded.state_dict().items()}
        got = synced_round(
            batched, batches, nn.CrossEntropyLoss(), replicas=replicas, batched=True, **SGD
        )
        batched.load_state_dict(got)
        threaded.load_state_dict(threaded_round(threaded, batches, **SGD))
        assert relative_error(batched.state_dict(), threaded.state_dict(), start) <= F64_REL_TOL
    assert all(
        m.num_batches_tracked.item() == 4 + 3 * 3
        for m in batched.modules()
        if hasattr(m, "num_batches_tracked")
    )


def test_several_local_steps_equal_the_independent_reference():
    """test_fedtan's reference for E > 1, computed without any synchronization machinery."""
    torch.manual_seed(0)
    model = mlp().double()
    g = torch.Generator().manual_seed(2)
    batches = [
        [
            (
                torch.randn(4, 5, generator=g, dtype=torch.float64) * (1 + k) + k,
                torch.randint(0, 3, (4,), generator=g),
            )
            for _ in range(3)
        ]
        for k in range(3)
    ]
    sgd = {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-2}
    got = batched_round(model, batches, **sgd)
    expected = fedtan_round_reference(model, batches, **sgd)
    assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL


# test_fedtan's special cases that the batched engine runs itself.
SPECIAL_CASES = [
    "no-affine",
    "2d-input",
    "no-running-stats",
    "bn-called-twice",
    "bn-on-input",
    "frozen-parameters",
    "subclass-and-syncbn",
]


@device_params
@pytest.mark.parametrize("name", SPECIAL_CASES)
def test_special_cases_equal_the_threaded_engine_over_two_local_steps(name, device):
    model = make_model(name, torch.float64).to(device)
    batches = [
        [(x.to(device), y.to(device)) for x, y in client]
        for client in make_batches(name, (3, 3, 3), torch.float64, steps=2)
    ]
    got = batched_round(model, batches, **SGD)
    expected = threaded_round(model, batches, **SGD)
    assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL


def test_a_tied_weight_is_one_tensor_for_each_client():
    model = make_model("tied-weights", torch.float64)
    batches = make_batches("tied-weights", (3, 3, 3), torch.float64, steps=2)
    got = batched_round(model, batches, **SGD)
    assert torch.equal(got["conv1.weight"], got["conv2.weight"])
    expected = threaded_round(model, batches, **SGD)
    assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL


def test_one_engine_runs_rounds_of_different_numbers_of_clients():
    """The clients' stacked tensors are kept between rounds, and made again when K changes."""
    model = make_model("small_cnn", torch.float64)
    engine = BatchedClients(model)
    for sizes in [(3, 3, 3), (4, 4), (4, 4), (2, 2, 2, 2)]:
        batches = make_batches("small_cnn", sizes, torch.float64, steps=2, seed=len(sizes))
        got = engine.round(batches, nn.CrossEntropyLoss(), **SGD)
        expected = threaded_round(model, batches, **SGD)
        assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL
        model.load_state_dict(got)


def test_a_tensor_of_the_model_replaced_between_rounds_is_the_one_trained():
    model = make_model("small_cnn", torch.float64)
    engine = BatchedClients(model)
    batches = make_batches("small_cnn", (3, 3), torch.float64, steps=2)
    engine.round(batches, nn.CrossEntropyLoss(), **SGD)
    layer = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    layer.weight = nn.Parameter(torch.rand_like(layer.weight) + 0.5)
    layer.running_var = torch.rand_like(layer.running_var) + 0.5
    got = engine.round(batches, nn.CrossEntropyLoss(), **SGD)
    expected = threaded_round(model, batches, **SGD)
    assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL


def test_float32_round_is_within_float32_noise_of_centralized_sgd():
    model = make_model("resnet20", torch.float32)
    batches = make_batches("resnet20", (3, 3, 3, 3, 3), torch.float32)
    got = batched_round(model, batches, **SGD)
    exact = centralized_step(*to_float64(model, batches), **SGD)
    plain = centralized_step(model, batches, **SGD)
    assert_within_rounding_noise(got, plain, exact, model.state_dict())


def test_input_model_is_left_unchanged():
    model = make_model("small_cnn", torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    batched_round(model, make_batches("small_cnn", (4, 4), torch.float32, steps=2), lr=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


# --- When synced_round runs it, and what it does where it cannot ------------------------------


def count_batched_rounds(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = BatchedClients.round

    def counted(self, client_batches, *args, **kwargs):
        calls.append(len(client_batches))
        return original(self, client_batches, *args, **kwargs)

    monkeypatch.setattr(BatchedClients, "round", counted)
    return calls


def test_synced_round_runs_equal_batches_batched_by_default(monkeypatch):
    calls = count_batched_rounds(monkeypatch)
    model = make_model("small_cnn", torch.float64)
    batches = make_batches("small_cnn", (4, 4, 4), torch.float64)
    got = synced_round(model, batches, nn.CrossEntropyLoss(), **SGD)
    assert calls == [3]
    assert relative_error(got, threaded_round(model, batches, **SGD), model.state_dict()) <= (
        F64_REL_TOL
    )


def test_on_the_cpu_large_batches_run_as_threads_by_default(monkeypatch):
    """Where the threads are the faster engine (batched.py: CPU_BATCHED_MAX_SAMPLES)."""
    calls = count_batched_rounds(monkeypatch)
    model = make_model("2d-input", torch.float64)
    for size in (CPU_BATCHED_MAX_SAMPLES, CPU_BATCHED_MAX_SAMPLES + 1):
        batches = make_batches("2d-input", (size, size), torch.float64)
        synced_round(model, batches, nn.CrossEntropyLoss(), **SGD)
        synced_round(model, batches, nn.CrossEntropyLoss(), batched=True, **SGD)
    assert calls == [2, 2, 2]


# model, client batch sizes, local steps, what the obstacle names
OBSTACLES = [
    ("small_cnn", (2, 5, 3), 1, "batch sizes differ"),
    ("momentum-none", (3, 3, 3), 2, "momentum=None"),
    ("seq3d", (2, 2), 1, "momentum=None"),
]


@pytest.mark.parametrize("name, sizes, steps, reason", OBSTACLES)
def test_a_round_it_cannot_batch_runs_as_threads(monkeypatch, name, sizes, steps, reason):
    calls = count_batched_rounds(monkeypatch)
    model = make_model(name, torch.float64)
    batches = make_batches(name, sizes, torch.float64, steps=steps)
    assert reason in batching_obstacle(model, batches)

    got = synced_round(model, batches, nn.CrossEntropyLoss(), **SGD)

    assert calls == []
    assert relative_error(got, threaded_round(model, batches, **SGD), model.state_dict()) == 0
    if steps == 1:
        start = model.state_dict()
        assert relative_error(got, centralized_step(model, batches, **SGD), start) <= F64_REL_TOL
    with pytest.raises(ValueError, match=f"cannot run batched: .*{reason}"):
        synced_round(model, batches, nn.CrossEntropyLoss(), batched=True, **SGD)


def test_clients_with_different_numbers_of_steps_are_not_batched():
    batches = make_batches("small_cnn", (3, 3), torch.float64, steps=2)
    batches[1] = batches[1][:1]
    assert "different numbers of local steps" in batching_obstacle(
        make_model("small_cnn", torch.float64), batches
    )


def test_half_precision_and_autocast_are_not_batched():
    batches = make_batches("small_cnn", (3, 3), torch.float32)
    model = make_model("small_cnn", torch.float32)
    assert "half-precision" in batching_obstacle(copy.deepcopy(model).half(), batches)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in batching_obstacle(model, batches)


def test_a_forward_vmap_refuses_falls_back_to_threads_with_a_warning():
    model = make_model("reads-a-value", torch.float64)
    batches = make_batches("reads-a-value", (3, 3, 3), torch.float64)
    assert batching_obstacle(model, batches) is None

    with pytest.warns(UserWarning, match="batched engine failed.*running the clients as threads"):
        got = synced_round(model, batches, nn.CrossEntropyLoss(), **SGD)

    assert relative_error(got, threaded_round(model, batches, **SGD), model.state_dict()) == 0
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        synced_round(model, batches, nn.CrossEntropyLoss(), batched=True, **SGD)


def test_non_finite_values_are_left_to_the_threaded_engine_which_names_client_and_layer():
    from common.fedtan.bn_channel import BNSyncError

    batches = make_batches("small_cnn", (3, 3, 3), torch.float32)
    batches[1][0][0][2, 0, 3, 3] = float("nan")
    model = make_model("small_cnn", torch.float32)
    with pytest.raises(BNSyncError, match=r"client 1, layer 'bn1'.*non-finite"):
        synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.1)
