"""Specification of what keeps the in-process engine free of fixed costs per round.

* ``ClientReplicas``: the K client models are made once and reloaded with the global model at
  the start of every round; a round with reused replicas is the same round as with fresh copies
  (bit for bit), so it still equals centralized SGD, also after a failed round and when K or
  the model's dtype changes.
* The combination of one exchange reads the device once, however many clients (one
  ``aten._local_scalar_dense``, the op behind ``bool(tensor)`` and ``tensor.item()``), and still
  refuses a bad contribution naming the client. The in-process hub, whose clients are trusted
  threads, defers that read: one per step, however many exchanges.
* ``train_client`` reads no loss during the round.
* ``average_states`` is the sample-weighted mean of every entry, computed in float64.
* ``task.evaluate`` normalizes the test set once per process and device, and reads the device
  once per quantity, not once per batch.
"""

from __future__ import annotations

import copy
import threading
import tomllib
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import common.fedtan.engine as fedtan
from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.data import TensorDataset, eval_batches
from common.experiment.models import build_model
from common.fedtan import ClientReplicas, synced_round, train_client
from common.fedtan.aggregation import average_states
from common.fedtan.bn_channel import (
    BNSyncError,
    GradSums,
    Moments,
    combine_grad_sums,
    combine_moments,
)
from common.fedtan.inprocess import InProcessHub

NUM_CLASSES = 10
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
F64_ATOL = 1e-10  # the engine's float64 exactness bound, as in tests/test_fedtan.py


def bn_net() -> nn.Module:
    """BN layers with every kind of state: affine or not, momentum None, 1d and 2d."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4, momentum=None),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 8),
        nn.BatchNorm1d(8, affine=False),
        nn.ReLU(),
        nn.Linear(8, NUM_CLASSES),
    )


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = bn_net().to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
    return model


def make_batches(sizes, dtype=torch.float64, seed=1, steps=1):
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (
                (torch.randn(b, 3, 6, 6, generator=g) * (1 + k) + k).to(dtype),
                (2 * k + torch.randint(0, 2, (b,), generator=g)) % NUM_CLASSES,
            )
            for _ in range(steps)
        ]
        for k, b in enumerate(sizes)
    ]


def centralized_step(model: nn.Module, client_batches) -> dict[str, torch.Tensor]:
    """One SGD step with torch BN on the concatenation of every client's batch."""
    model = copy.deepcopy(model).train()
    x = torch.cat([b[0][0] for b in client_batches])
    y = torch.cat([b[0][1] for b in client_batches])
    opt = torch.optim.SGD(model.parameters(), **SGD)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model.state_dict()


def assert_states_equal(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


def no_deepcopy(monkeypatch):
    """From now on, making a model copy in common.fedtan.engine fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a client model was deep-copied again")

    monkeypatch.setattr(fedtan, "copy", types.SimpleNamespace(deepcopy=refuse))


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``bool(t)``, ``t.item()``) in this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# --- ClientReplicas -------------------------------------------------------------------------


def test_replicas_are_made_once_and_reloaded_with_the_global_model(monkeypatch):
    model = make_model()
    replicas = ClientReplicas(model)
    first = [m for m, _ in replicas.for_round(3)]
    synced_round(model, make_batches((2, 3, 4)), nn.CrossEntropyLoss(), **SGD, replicas=replicas)
    no_deepcopy(monkeypatch)
    again = replicas.for_round(3)
    assert [m for m, _ in again] == first  # the same objects
    for replica, state in again:
        # Reloaded: the training of the last round is gone, and `state` is the replica's own.
        assert_states_equal(replica.state_dict(), model.state_dict())
        assert all(state[k] is not model.state_dict()[k] for k in state)


def test_rounds_with_reused_replicas_are_the_rounds_with_fresh_copies():
    """Three chained rounds, K changing, unequal batches, momentum and weight decay: bit for bit
    the rounds without replicas, and each the centralized step."""
    reused, fresh = make_model(), make_model()
    replicas = ClientReplicas(reused)
    for round_, sizes in enumerate([(2, 5, 3), (4, 1), (3, 3, 2, 6)]):
        batches = make_batches(sizes, seed=10 + round_)
        expected = centralized_step(fresh, batches)
        fresh.load_state_dict(synced_round(fresh, batches, nn.CrossEntropyLoss(), **SGD))
        got = synced_round(reused, batches, nn.CrossEntropyLoss(), **SGD, replicas=replicas)
        reused.load_state_dict(got)
        assert_states_equal(reused.state_dict(), fresh.state_dict())
        for key, value in expected.items():
            if value.is_floating_point():
                torch.testing.assert_close(got[key], value, rtol=0, atol=F64_ATOL, msg=key)
            else:
                assert torch.equal(got[key], value), key


def test_a_failed_round_leaves_nothing_in_the_replicas():
    model = make_model()
    replicas = ClientReplicas(model)
    bad = make_batches((2, 3, 4), seed=5)
    bad[1][0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(BNSyncError, match=r"client 1, layer '1'.*non-finite"):
        synced_round(model, bad, nn.CrossEntropyLoss(), **SGD, replicas=replicas)
    batches = make_batches((2, 3, 4), seed=6, steps=2)
    got = synced_round(model, batches, nn.CrossEntropyLoss(), **SGD, replicas=replicas)
    assert_states_equal(got, synced_round(model, batches, nn.CrossEntropyLoss(), **SGD))


def test_replicas_follow_a_model_moved_to_another_dtype():
    model = make_model(torch.float32)
    replicas = ClientReplicas(model)
    synced_round(model, make_batches((2, 3), torch.float32), nn.CrossEntropyLoss(), **SGD,
                 replicas=replicas)  # fmt: skip
    model.double()
    batches = make_batches((2, 3))
    got = synced_round(model, batches, nn.CrossEntropyLoss(), **SGD, replicas=replicas)
    assert got["0.weight"].dtype == torch.float64
    assert_states_equal(got, synced_round(model, batches, nn.CrossEntropyLoss(), **SGD))


class Scaled(nn.Module):
    """A BN net whose input scale is a non-persistent buffer: not in its state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64), persistent=False)

    def forward(self, x):
        return self.net(x * self.scale)


def test_replicas_follow_buffers_outside_the_state_dict():
    model = Scaled()
    replicas = ClientReplicas(model)
    synced_round(model, make_batches((2, 3)), nn.CrossEntropyLoss(), lr=0.1, replicas=replicas)
    model.scale.fill_(3.0)
    batches = make_batches((2, 3), seed=4)
    got = synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.1, replicas=replicas)
    assert_states_equal(got, synced_round(model, batches, nn.CrossEntropyLoss(), lr=0.1))


def test_replicas_of_another_model_are_refused():
    model, other = make_model(), make_model()
    with pytest.raises(ValueError, match="replicas were made from another model"):
        synced_round(model, make_batches((2, 3)), nn.CrossEntropyLoss(), lr=0.1,
                     replicas=ClientReplicas(other))  # fmt: skip


# --- one read of the device per exchange ----------------------------------------------------


def test_combining_an_exchange_reads_the_device_once_for_any_number_of_clients():
    g = torch.Generator().manual_seed(0)
    for clients in (1, 5, 12):
        moments = {k: Moments(4, torch.randn(7, generator=g), torch.rand(7, generator=g))
                   for k in range(clients)}  # fmt: skip
        sums = {k: GradSums(torch.randn(7, generator=g), torch.randn(7, generator=g))
                for k in range(clients)}  # fmt: skip
        with ScalarReads() as reads:
            combine_moments("bn", moments)
        assert reads.count == 1, clients
        with ScalarReads() as reads:
            combine_grad_sums("bn", sums)
        assert reads.count == 1, clients


def test_the_in_process_hub_reads_the_device_once_per_step_not_per_exchange():
    """A step of 2L exchanges by K client threads: no read in any client thread (the
    combinations run in them), one read when the step is verified."""
    hub = InProcessHub(3, timeout=10)
    reads = {}

    def client(rank: int) -> None:
        channel = hub.channel(rank)
        with ScalarReads() as counted:
            for layer in ("bn1", "bn2", "bn3"):
                channel.reduce_moments(layer, Moments(4, torch.randn(5), torch.rand(5)))
            for layer in ("bn3", "bn2", "bn1"):
                channel.reduce_grad_sums(layer, GradSums(torch.randn(5), torch.randn(5)))
        reads[rank] = counted.count

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert reads == {0: 0, 1: 0, 2: 0}
    with ScalarReads() as counted:
        hub.verify()
    assert counted.count == 1


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (Moments(4, torch.tensor([0.0, float("inf")]), torch.ones(2)), "mean has non-finite"),
        (Moments(4, torch.zeros(2), torch.tensor([float("nan"), 1.0])), "m2 has non-finite"),
        (Moments(4, torch.zeros(2), torch.tensor([1.0, -1e-3])), "negative sum of squared"),
    ],
)
def test_the_fused_check_still_names_the_client_and_what_is_wrong(bad, reason):
    good = Moments(4, torch.zeros(2), torch.ones(2))
    parts = {0: good, 1: good, "c2": bad, 3: good}
    with pytest.raises(BNSyncError, match=rf"client c2, layer 'bn'.*{reason}"):
        combine_moments("bn", parts)
    ok = GradSums(torch.zeros(2), torch.zeros(2))
    nan = GradSums(torch.zeros(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(BNSyncError, match=r"client 3, layer 'bn'.*sum_dy_xhat has non-finite"):
        combine_grad_sums("bn", {0: ok, 1: ok, 3: nan})


# --- losses ---------------------------------------------------------------------------------


def test_train_client_reads_no_loss_during_the_round():
    model = build_model("small_cnn", in_channels=3, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(4)]  # fmt: skip
    expected_model = copy.deepcopy(model)
    with ScalarReads() as reads:
        losses = train_client(model, batches, nn.CrossEntropyLoss(), lr=0.1)
    assert reads.count == 0
    # The same losses as reading each step's loss as it comes.
    opt = torch.optim.SGD(expected_model.parameters(), lr=0.1)
    expected = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(expected_model(x), y)
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert losses == expected
    assert all(type(v) is float for v in losses)


# --- average_states -------------------------------------------------------------------------


def test_average_states_is_the_weighted_mean_of_every_entry_in_float64():
    g = torch.Generator().manual_seed(0)

    def state(k):
        return {
            "w32": torch.randn(3, 4, generator=g) * 10**k,
            "scalar64": torch.randn((), generator=g, dtype=torch.float64),
            "count": torch.tensor(7),
            "v64": torch.randn(5, generator=g, dtype=torch.float64),
            "b32": torch.randn(2, generator=g),
        }

    states, weights = [state(k) for k in range(4)], [3, 1, 0, 6]
    got = average_states(states, weights)
    assert list(got) == list(states[0])
    total = sum(weights)
    for key, ref in states[0].items():
        exact = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        assert got[key].dtype == ref.dtype and got[key].shape == ref.shape, key
        if ref.is_floating_point():
            # Summation order may differ: a few float64 roundings of the largest term, and then
            # the one rounding of the cast back to the entry's dtype.
            terms = torch.stack([s[key].double().abs() for s in states]).amax(0)
            bound = 8 * torch.finfo(torch.float64).eps * terms
            bound += torch.finfo(ref.dtype).eps * exact.abs()
            assert bool(((got[key].double() - exact).abs() <= bound).all()), key
        else:
            assert torch.equal(got[key], exact.round().to(ref.dtype)), key


# --- evaluation -----------------------------------------------------------------------------


def test_evaluation_prepares_the_test_set_once_and_reads_the_device_twice(monkeypatch):
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_flower({**defaults, "dataset": "digits", "model": "small_cnn"})
    model = task.build_global_model(cfg)
    with torch.no_grad():  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
    task.eval_set.cache_clear()
    with ScalarReads() as reads:
        got = task.evaluate(model, cfg, torch.device("cpu"), batch_size=100)
    assert reads.count == 2  # the summed loss and the count of correct answers, once each

    # The definition: per-batch loss sums and hits over the normalized test set, in order.
    test = task.eval_dataset(cfg)
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(test, 100):
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    assert got == {"test-loss": loss / len(test), "test-accuracy": correct / len(test)}

    def refuse(*_args):
        raise AssertionError("the test set was normalized again")

    monkeypatch.setattr(TensorDataset, "normalize", refuse)
    assert task.evaluate(model, cfg, torch.device("cpu"), batch_size=100) == got
