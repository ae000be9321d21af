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
from tests.recording_channel import RecordingChannel

NUM_CLASSES = 10
F32_TOL = {"rtol": 1e-4, "atol": 1e-5}
F64_TOL = {"rtol": 0.0, "atol": 1e-10}


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
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(4)
    return model


def make_batches(name, sizes, dtype, steps=1, seed=1):
    """``steps`` batches per client; non-IID: each client has its own input shift and scale and
    its own two classes."""
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[name][1]
    out = []
    for k, b in enumerate(sizes):
        batches = []
        for _ in range(steps):
            x = torch.randn(b, *shape, generator=g) * (1 + 0.5 * k) + 0.5 * k
            y = (2 * k + torch.randint(0, 2, (b,), generator=g)) % NUM_CLASSES
            batches.append((x.to(dtype), y))
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


def weighted_average(states, weights):
    total = sum(weights)
    out = {}
    for key, ref in states[0].items():
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[key] = (acc if ref.is_floating_point() else acc.round()).to(ref.dtype)
    return out


def assert_states_close(got, expected, tol):
    assert list(got) == list(expected), "state_dict keys differ"
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].shape == expected[key].shape, key
        if expected[key].is_floating_point():
            torch.testing.assert_close(got[key], expected[key], **tol, msg=key)
        else:
            assert torch.equal(got[key], expected[key]), key


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
    expected = centralized_step(model, batches, **sgd)

    assert_states_close(got, expected, F64_TOL if dtype == torch.float64 else F32_TOL)
    # Not vacuous: the step moved the model well beyond the tolerance.
    assert max_difference(expected, model.state_dict()) > 1e-2


@pytest.mark.parametrize(
    "name, dtype, sizes",
    [("resnet20", torch.float32, (5, 7, 4)), ("small_cnn", torch.float64, (3, 8, 5, 2))],
)
def test_rounds_in_a_row_equal_centralized_steps(name, dtype, sizes):
    """3 rounds chained (each new global state loaded) = 3 centralized steps, each with a fresh
    SGD optimizer, as FedTAN makes a fresh one every round."""
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    fedtan = make_model(name, dtype)
    central = copy.deepcopy(fedtan)
    for round_ in range(3):
        batches = make_batches(name, sizes, dtype, seed=10 + round_)
        fedtan.load_state_dict(synced_round(fedtan, batches, nn.CrossEntropyLoss(), **sgd))
        central.load_state_dict(centralized_step(central, batches, **sgd))
        assert_states_close(fedtan.state_dict(), central.state_dict(), tol)
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
    assert_states_close(got, sgd_steps(model, batches[0], **sgd), F64_TOL)


def test_local_steps_after_the_synced_one_differ_from_fedavg_with_local_batchnorm():
    """With E = 2 and K > 1 the round runs (both local steps, full state averaged) and is not
    FedAvg with local BN: the synchronized first step matters."""
    name, sizes, steps = "small_cnn", (3, 6, 4), 2
    model = make_model(name, torch.float64)
    batches = make_batches(name, sizes, torch.float64, steps=steps)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}

    got = synced_round(model, batches, nn.CrossEntropyLoss(), **sgd)

    weights = [steps * b for b in sizes]
    fedavg = weighted_average([sgd_steps(model, b, **sgd) for b in batches], weights)
    assert list(got) == list(fedavg)
    for key, value in got.items():
        assert value.dtype == fedavg[key].dtype and bool(torch.isfinite(value.double()).all())
        if key.endswith("num_batches_tracked"):
            assert value.item() == fedavg[key].item() == 4 + steps, key
    update = max_difference(fedavg, model.state_dict())
    assert max_difference(got, fedavg) > 1e-2 * update


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
    return weighted_average(states, [sum(len(y) for _, y in b) for b in client_batches])


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
    assert_states_close(got, fedtan_round_reference(model, client_batches, **sgd), F64_TOL)


def test_input_model_is_left_unchanged():
    model = make_model("small_cnn", torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    batches = make_batches("small_cnn", (4, 5), torch.float32, steps=2)

    got = synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.5)

    assert_states_close(model.state_dict(), before, {"rtol": 0, "atol": 0})
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


def test_refuses_an_empty_batch():
    batches = make_batches("small_cnn", (3, 4), torch.float32, steps=2)
    batches[1][1] = (batches[1][1][0][:0], batches[1][1][1][:0])
    with pytest.raises(ValueError, match="client 1, step 1: empty batch"):
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
    expected = weighted_average(local, [2 * b for b in (2, 6, 3)])
    assert_states_close(got, expected, F64_TOL)
    # Weighted by sample counts, not a plain mean.
    assert max_difference(got, weighted_average(local, [1, 1, 1])) > 1e-4
