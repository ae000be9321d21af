"""Specification of the FedTAN engine (common/fedtan.py).

The defining property: one FedTAN round in which every client takes one step on one batch equals
one step of ``torch.optim.SGD`` on the concatenation of the clients' batches, with the loss
averaged over all samples: every entry of the state_dict (weights, BN affine parameters, running
statistics, ``num_batches_tracked``), for any BN network, equal or unequal client batch sizes,
with or without momentum and weight decay.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.experiment.models import build_model
from common.fedtan import synced_round, train_client
from common.fedtan.bn_channel import BNSyncError
from common.fedtan.bn_sync import convert_federated_batchnorm, federated_batchnorm_layers
from common.fedtan.inprocess import InProcessHub
from tests.devices import device_params
from tests.float_noise import assert_within_rounding_noise, relative_error
from tests.recording_channel import RecordingChannel

NUM_CLASSES = 10
# Exactness is a float64 property: float64 results must equal centralized SGD to within this
# fraction of the update (float64 rounding is about 1e-16 of it).
F64_REL_TOL = 1e-9
# In float32 (and half) the bound is the dtype's own noise, measured in each test: the error of
# centralized SGD in that dtype against float64 (tests/float_noise.py).


def seq3d() -> nn.Module:
    """A plain nn.Sequential with BatchNorm3d layers (one with momentum=None) and BatchNorm1d."""
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Conv3d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm3d(6, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, 8),
        nn.BatchNorm1d(8, affine=False),
        nn.ReLU(),
        nn.Linear(8, NUM_CLASSES),
    )


class BatchNormTwice(nn.Module):
    """One BN layer called twice in one forward pass (after two different convolutions)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class ScaledBatchNorm1d(nn.BatchNorm1d):
    """A user's subclass that keeps torch's forward (it adds an attribute and a method)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, momentum=0.2)
        self.note = "mine"

    def describe(self) -> str:
        return f"{self.note}: {self.num_features}"


def conv_bn(norm: nn.Module, in_channels: int = 3) -> nn.Sequential:
    """conv -> ``norm`` (4 channels) -> ReLU -> pooled linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        norm,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, NUM_CLASSES),
    )


def frozen() -> nn.Module:
    """Frozen BN affine parameters and a frozen convolution: no gradient, no update."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), *conv_bn(nn.BatchNorm2d(4), 4)
    )
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    return model


def mlp_bn(*norms: nn.Module) -> nn.Sequential:
    """Linear -> BN on (N, C) input, once per norm layer given (6 features each)."""
    layers: list[nn.Module] = [nn.Linear(12, 6)]
    for norm in norms:
        layers += [norm, nn.ReLU(), nn.Linear(6, 6)]
    return nn.Sequential(*layers[:-1], nn.Linear(6, NUM_CLASSES))


# name: (model factory, shape of one input sample)
MODELS = {
    "resnet20": (
        lambda: build_model("resnet20", in_channels=3, num_classes=NUM_CLASSES),
        (3, 32, 32),
    ),
    "small_cnn": (
        lambda: build_model("small_cnn", in_channels=3, num_classes=NUM_CLASSES),
        (3, 8, 8),
    ),
    "seq3d": (seq3d, (2, 4, 4, 4)),
    # Models for the cases of PyTorch's own SyncBatchNorm tests, and more.
    "no-affine": (lambda: conv_bn(nn.BatchNorm2d(4, affine=False)), (3, 5, 5)),
    "2d-input": (lambda: mlp_bn(nn.BatchNorm1d(6), nn.BatchNorm1d(6, eps=1e-3)), (12,)),
    "momentum-none": (lambda: conv_bn(nn.BatchNorm2d(4, momentum=None)), (3, 4, 4)),
    "no-running-stats": (lambda: conv_bn(nn.BatchNorm2d(4, track_running_stats=False)), (3, 5, 5)),
    "bn-called-twice": (BatchNormTwice, (3, 5, 5)),
    "bn-on-input": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), *conv_bn(nn.BatchNorm2d(4))),
        (3, 5, 5),
    ),
    "frozen-parameters": (frozen, (3, 5, 5)),
    "subclass-and-syncbn": (
        lambda: mlp_bn(nn.BatchNorm1d(6), ScaledBatchNorm1d(6), nn.SyncBatchNorm(6)),
        (12,),
    ),
}


def make_model(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]().to(dtype)
    # Non-default BN parameters and buffers, so that every entry of the state is exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                if m.track_running_stats:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(4)
    return model


def make_batches(name, sizes, dtype, steps=1, seed=1, layout=None):
    """``steps`` batches per client; non-IID: each client has its own input shift and scale and
    its own two classes. ``layout(x)`` may give the inputs another memory layout."""
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[name][1]
    out = []
    for k, b in enumerate(sizes):
        batches = []
        for _ in range(steps):
            x = (torch.randn(b, *shape, generator=g) * (1 + 0.5 * k) + 0.5 * k).to(dtype)
            y = (2 * k + torch.randint(0, 2, (b,), generator=g)) % NUM_CLASSES
            batches.append((x if layout is None else layout(x), y))
        out.append(batches)
    return out


def sgd_steps(model, batches, lr, momentum=0.0, weight_decay=0.0, loss_fn=None):
    """Plain training of a copy of ``model`` with torch BN and one fresh SGD optimizer."""
    model = copy.deepcopy(model).train()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.state_dict()


def centralized_step(model, client_batches, **sgd):
    """One SGD step on the concatenation of every client's first batch."""
    x = torch.cat([b[0][0] for b in client_batches])
    y = torch.cat([b[0][1] for b in client_batches])
    return sgd_steps(model, [(x, y)], **sgd)


def sample_weighted_mean(states, weights):
    """The specification of server averaging: each floating-point entry is the mean of the
    clients' entries weighted by their sample counts; integer entries (num_batches_tracked)
    agree between clients and are kept."""
    w = torch.tensor(weights, dtype=torch.float64)
    out = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key] for s in states])
        if first.is_floating_point():
            mean = torch.tensordot(w / w.sum(), stacked.double(), dims=1)
            out[key] = mean.to(first.dtype)
        else:
            assert bool((stacked == first).all()), key
            out[key] = first.clone()
    return out


def to_float64(model, client_batches):
    batches = [[(x.double(), y) for x, y in b] for b in client_batches]
    return copy.deepcopy(model).double(), batches


def assert_equals_centralized(got, model, client_batches, steps=centralized_step, **sgd):
    """``got`` is the centralized result: in float64 to F64_REL_TOL of the update; in a lower
    precision, no farther from the float64 result than NOISE_FACTOR times the centralized run
    in that same precision."""
    start = model.state_dict()
    dtype = next(v.dtype for v in start.values() if v.is_floating_point())
    if dtype == torch.float64:
        assert relative_error(got, steps(model, client_batches, **sgd), start) <= F64_REL_TOL
        return
    exact = steps(*to_float64(model, client_batches), **sgd)
    assert_within_rounding_noise(got, steps(model, client_batches, **sgd), exact, start)


def max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --- The defining property ------------------------------------------------------------------

ROUND_CASES = [
    # model, client batch sizes, dtype, momentum, weight decay
    ("resnet20", (4, 8, 5, 6, 7), torch.float32, 0.9, 5e-4),
    ("resnet20", (6, 6, 6, 6, 6), torch.float64, 0.0, 0.0),
    ("small_cnn", (6, 6, 6, 6), torch.float32, 0.0, 0.0),
    # A client with a single sample: fine, BN normalizes with the union's statistics.
    ("small_cnn", (1, 7, 4), torch.float64, 0.9, 1e-3),
    ("seq3d", (5, 5, 5), torch.float32, 0.5, 1e-2),
    ("seq3d", (2, 9, 4, 3), torch.float64, 0.9, 1e-3),
]


@pytest.mark.parametrize(
    "name, sizes, dtype, momentum, weight_decay",
    ROUND_CASES,
    ids=[f"{c[0]}-{'equal' if len(set(c[1])) == 1 else 'unequal'}-{c[2]}" for c in ROUND_CASES],
)
def test_one_round_equals_one_centralized_sgd_step(name, sizes, dtype, momentum, weight_decay):
    model = make_model(name, dtype)
    batches = make_batches(name, sizes, dtype)
    sgd = {"lr": 0.1, "momentum": momentum, "weight_decay": weight_decay}

    got = synced_round(model, batches, nn.CrossEntropyLoss(), **sgd)

    assert_equals_centralized(got, model, batches, **sgd)


@pytest.mark.parametrize("name, sizes", [("resnet20", (5, 7, 4)), ("small_cnn", (3, 8, 5, 2))])
def test_rounds_in_a_row_equal_centralized_steps(name, sizes):
    """3 rounds chained (each new global state loaded) = 3 centralized steps, each with a fresh
    SGD optimizer, as FedTAN makes a fresh one every round. In float64: in float32 the
    centralized run itself drifts from its float64 twin by several % of the update by round 3."""
    sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    fedtan = make_model(name, torch.float64)
    central = copy.deepcopy(fedtan)
    for round_ in range(3):
        batches = make_batches(name, sizes, torch.float64, seed=10 + round_)
        start = {k: v.clone() for k, v in central.state_dict().items()}
        fedtan.load_state_dict(synced_round(fedtan, batches, nn.CrossEntropyLoss(), **sgd))
        central.load_state_dict(centralized_step(central, batches, **sgd))
        assert relative_error(fedtan.state_dict(), central.state_dict(), start) <= F64_REL_TOL
    assert all(
        m.num_batches_tracked.item() == 4 + 3
        for m in fedtan.modules()
        if hasattr(m, "num_batches_tracked")
    )


@pytest.mark.parametrize("name", ["small_cnn", "seq3d"])
def test_one_client_with_three_local_steps_is_plain_local_sgd(name):
    model = make_model(name, torch.float64)
    batches = make_batches(name, (6,), torch.float64, steps=3)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    got = synced_round(model, batches, nn.CrossEntropyLoss(), **sgd)
    expected = sgd_steps(model, batches[0], **sgd)
    assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL


# --- PyTorch's SyncBatchNorm test cases, and more: each one round against centralized SGD ------

SPEC_CASES = {
    # name in MODELS: client batch sizes
    "no-affine": (3, 5, 2),
    "2d-input": (4, 6, 3),
    "no-running-stats": (3, 5, 2),
    "bn-called-twice": (3, 5, 2),
    "bn-on-input": (3, 5, 2),
    "frozen-parameters": (3, 5, 2),
    "subclass-and-syncbn": (4, 6, 3),
}


@device_params
@pytest.mark.parametrize("name", SPEC_CASES, ids=SPEC_CASES)
def test_one_round_equals_one_centralized_step_for(name, device):
    model = make_model(name, torch.float64).to(device)
    batches = on_device(make_batches(name, SPEC_CASES[name], torch.float64), device)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    got = synced_round(model, batches, nn.CrossEntropyLoss(), **sgd)
    assert_equals_centralized(got, model, batches, **sgd)


def on_device(client_batches, device):
    return [[(x.to(device), y.to(device)) for x, y in b] for b in client_batches]


def test_one_sample_per_client():
    model = make_model("small_cnn", torch.float64)
    batches = make_batches("small_cnn", (1, 1, 1, 1), torch.float64)
    got = synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.1)
    assert_equals_centralized(got, model, batches, lr=0.1)


@pytest.mark.parametrize("name", ["2d-input", "momentum-none"])
def test_running_statistics_over_many_rounds_with_different_batch_sizes(name):
    """Running mean and unbiased running variance (and momentum=None's cumulative average) over
    20 chained rounds, the clients' batch sizes changing every round."""
    sizes = torch.Generator().manual_seed(4)
    fedtan = make_model(name, torch.float64)
    central = copy.deepcopy(fedtan)
    for round_ in range(20):
        batches = make_batches(
            name, torch.randint(1, 7, (3,), generator=sizes).tolist(), torch.float64, seed=round_
        )
        start = {k: v.clone() for k, v in central.state_dict().items()}
        fedtan.load_state_dict(synced_round(fedtan, batches, nn.CrossEntropyLoss(), lr=0.05))
        central.load_state_dict(centralized_step(central, batches, lr=0.05))
        assert relative_error(fedtan.state_dict(), central.state_dict(), start) <= F64_REL_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_round_keeps_dtypes_and_is_as_close_as_centralized(dtype):
    model = make_model("2d-input", dtype)
    batches = make_batches("2d-input", (4, 6, 3), dtype)
    got = synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.1)
    # assert_equals_centralized also checks that every entry kept its dtype.
    assert_equals_centralized(got, model, batches, lr=0.1)


LAYOUTS = {
    # name: (model, new layout of an input, memory format of the model's weights)
    "channels_last": (
        "small_cnn",
        lambda x: x.contiguous(memory_format=torch.channels_last),
        torch.channels_last,
    ),
    "channels_last_3d": (
        "seq3d",
        lambda x: x.contiguous(memory_format=torch.channels_last_3d),
        torch.channels_last_3d,
    ),
    # Non-contiguous views (PyTorch issues 62967 and 64039 were wrong results there).
    "permuted": (
        "small_cnn",
        lambda x: x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        None,
    ),
    "transposed": ("small_cnn", lambda x: x.transpose(2, 3).contiguous().transpose(2, 3), None),
    "strided": ("small_cnn", lambda x: torch.cat([x, x], dim=3)[..., ::2], None),
}


@device_params
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS)
def test_inputs_in_any_memory_layout(layout, device):
    name, relayout, memory_format = layout
    model = make_model(name, torch.float64).to(device)
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    # Laid out on the device itself: a copy across devices would not keep every layout.
    batches = make_batches(name, (3, 5, 2), torch.float64, layout=lambda x: relayout(x.to(device)))
    batches = on_device(batches, device)  # the targets
    assert all(not b[0][0].is_contiguous() for b in batches)
    got = synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.1)
    assert_equals_centralized(got, model, batches, lr=0.1)


def test_only_the_first_local_step_synchronizes():
    model = convert_federated_batchnorm(make_model("small_cnn", torch.float32))
    batches = make_batches("small_cnn", (5,), torch.float32, steps=3)[0]
    channel = RecordingChannel(InProcessHub(1).channel(0))
    losses = train_client(model, batches, nn.CrossEntropyLoss(), lr=0.1, channel=channel)
    assert len(losses) == 3 and all(isinstance(v, float) for v in losses)
    # 2 exchanges per BN layer: forward in network order, backward in reverse; none after.
    layers = ["bn1", "bn2", "bn3"]
    assert channel.calls == [("forward", n) for n in layers] + [
        ("backward", n) for n in reversed(layers)
    ]
    assert all(m._sync is None for _, m in federated_batchnorm_layers(model))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def fedtan_round_reference(model, client_batches, lr, momentum, weight_decay):
    """FedTAN with E > 1 for ``mlp()``, computed without any synchronization machinery.

    Synced step: the union batch goes through one BN, but every client's rows go through their
    own (equal) copy of the parameters, so autograd splits the gradient of the union's mean loss
    by client; client k's gradient is N_b / B_k times its part (it minimizes its own mean loss).
    Running statistics: those of the union batch. Then plain local steps with the same
    optimizer, and the sample-weighted average of the clients' states.
    """
    xs = [b[0][0] for b in client_batches]
    ys = [b[0][1] for b in client_batches]
    sizes = [len(x) for x in xs]
    copies = [
        {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()} for _ in xs
    ]

    def rows(fn, per_client_inputs):
        return torch.cat([fn(v, c) for v, c in zip(per_client_inputs, copies, strict=True)])

    hidden = rows(lambda x, c: F.linear(x, c["0.weight"], c["0.bias"]), xs)
    normed = F.batch_norm(hidden, None, None, training=True, eps=model[1].eps)
    gamma = rows(lambda b, c: c["1.weight"].expand(b, -1), sizes)
    beta = rows(lambda b, c: c["1.bias"].expand(b, -1), sizes)
    acts = F.relu(normed * gamma + beta).split(sizes)
    logits = rows(lambda a, c: F.linear(a, c["3.weight"], c["3.bias"]), acts)
    loss = F.cross_entropy(logits, torch.cat(ys))
    grads = [torch.autograd.grad(loss, list(c.values()), retain_graph=True) for c in copies]

    union_model = copy.deepcopy(model).train()  # running statistics of the union batch
    union_model(torch.cat(xs))
    states = []
    for k, batches in enumerate(client_batches):
        client = copy.deepcopy(model).train()
        client[1].load_state_dict(union_model[1].state_dict())
        opt = torch.optim.SGD(
            client.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        for p, g in zip(client.parameters(), grads[k], strict=True):
            p.grad = g * (sum(sizes) / sizes[k])
        opt.step()
        for x, y in batches[1:]:
            opt.zero_grad()
            F.cross_entropy(client(x), y).backward()
            opt.step()
        states.append(client.state_dict())
    return sample_weighted_mean(states, [sum(len(y) for _, y in b) for b in client_batches])


def test_round_with_several_local_steps_equals_its_reference():
    torch.manual_seed(0)
    model = mlp().double()
    g = torch.Generator().manual_seed(2)
    client_batches = [
        [
            (
                torch.randn(b, 5, generator=g, dtype=torch.float64) * (1 + k) + k,
                torch.randint(0, 3, (b,), generator=g),
            )
            for _ in range(3)
        ]
        for k, b in enumerate((2, 7, 4))
    ]
    sgd = {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-2}
    got = synced_round(model, client_batches, nn.CrossEntropyLoss(), **sgd)
    expected = fedtan_round_reference(model, client_batches, **sgd)
    assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL


def test_input_model_is_left_unchanged():
    model = make_model("small_cnn", torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    batches = make_batches("small_cnn", (4, 5), torch.float32, steps=2)

    got = synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.5)

    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not federated_batchnorm_layers(model)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert max_difference(got, before) > 1e-2
    model.load_state_dict(got)  # the result loads back into the plain model, strictly


# --- Bad input is refused with a clear error ------------------------------------------------


def small_round(batches, loss_fn=None, model=None, **kwargs):
    model = model or make_model("small_cnn", torch.float32)
    return synced_round(model, batches, loss_fn or nn.CrossEntropyLoss(), lr=0.1, **kwargs)


def test_refuses_empty_client_list():
    with pytest.raises(ValueError, match="no clients"):
        small_round([])


def test_refuses_a_client_without_batches():
    batches = make_batches("small_cnn", (3, 4), torch.float32)
    with pytest.raises(ValueError, match="client 2 has no batches"):
        small_round([*batches, []])


@pytest.mark.parametrize("step", [0, 1], ids=["synchronized step", "local step"])
def test_refuses_an_empty_batch_on_one_client(step):
    batches = make_batches("small_cnn", (3, 4, 2), torch.float32, steps=2)
    batches[1][step] = (batches[1][step][0][:0], batches[1][step][1][:0])
    with pytest.raises(ValueError, match=f"client 1, step {step}: empty batch"):
        small_round(batches)


def test_refuses_inputs_and_targets_of_different_lengths():
    batches = make_batches("small_cnn", (3, 4), torch.float32)
    batches[0][0] = (batches[0][0][0], batches[0][0][1][:2])
    with pytest.raises(ValueError, match="client 0, step 0: 3 inputs but 2 targets"):
        small_round(batches)


def test_refuses_mismatched_input_shapes_between_clients():
    batches = make_batches("small_cnn", (3, 4, 2), torch.float32)
    batches[2][0] = (torch.randn(2, 3, 10, 10), batches[2][0][1])
    with pytest.raises(ValueError, match=r"client 2: input shape \(3, 10, 10\) differs"):
        small_round(batches)


def test_refuses_a_loss_that_sums():
    batches = make_batches("small_cnn", (3, 4), torch.float32)
    with pytest.raises(ValueError, match="reduction='mean'.*reduction='sum'"):
        small_round(batches, nn.CrossEntropyLoss(reduction="sum"))


def no_thread_left(before: set[threading.Thread]) -> bool:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t not in before and t.is_alive()]:
            return True
        time.sleep(0.01)
    return False


def test_non_finite_statistics_fail_the_round_naming_client_and_layer():
    batches = make_batches("small_cnn", (3, 4, 5), torch.float32)
    batches[1][0][0][2, 0, 3, 3] = float("nan")
    threads = set(threading.enumerate())
    start = time.monotonic()
    with pytest.raises(BNSyncError, match=r"client 1, layer 'bn1'.*non-finite"):
        small_round(batches, timeout=60)
    assert time.monotonic() - start < 10
    assert no_thread_left(threads)


def test_a_client_failing_mid_step_releases_the_others_and_is_named():
    """Client 1 fails after the forward sync (in its loss); the others, waiting in the backward
    sync, are released, and the error names client 1, not a client it released."""

    def loss_fn(logits, targets):
        if len(targets) == 4:
            raise ArithmeticError("loss exploded")
        return nn.functional.cross_entropy(logits, targets)

    batches = make_batches("small_cnn", (3, 4, 5), torch.float32)
    threads = set(threading.enumerate())
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="client 1 failed: loss exploded"):
        small_round(batches, loss_fn, timeout=60)
    assert time.monotonic() - start < 10
    assert no_thread_left(threads)


def test_model_without_batchnorm_is_refused_unless_allowed():
    batches = make_batches("small_cnn", (3, 4), torch.float32)
    group_norm = build_model("small_cnn", in_channels=3, num_classes=NUM_CLASSES, norm="group")
    with pytest.raises(ValueError, match="no BatchNorm layers.*allow_no_batchnorm=True"):
        small_round(batches, model=group_norm)


def test_model_without_batchnorm_when_allowed_is_a_weighted_average_of_local_sgd():
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=3, num_classes=NUM_CLASSES, norm="group").double()
    batches = make_batches("small_cnn", (2, 6, 3), torch.float64, steps=2)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    got = synced_round(model, batches, nn.CrossEntropyLoss(), allow_no_batchnorm=True, **sgd)
    local = [sgd_steps(model, b, **sgd) for b in batches]
    expected = sample_weighted_mean(local, [2 * b for b in (2, 6, 3)])
    assert relative_error(got, expected, model.state_dict()) <= F64_REL_TOL
    # Weighted by sample counts, not a plain mean.
    assert max_difference(got, sample_weighted_mean(local, [1, 1, 1])) > 1e-4
