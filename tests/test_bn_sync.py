"""Specification of the federated BatchNorm layer (common/bn_sync.py).

1. Without a channel, or in eval mode, a FederatedBatchNorm*d *is* torch's BatchNorm*d: same
   outputs, running statistics, counters and gradients, bit for bit.
2. ``convert_federated_batchnorm`` swaps every torch BN layer of any model in place, sharing its
   parameters and buffers (like ``nn.SyncBatchNorm.convert_sync_batchnorm``); ``revert`` undoes it.
3. Synchronized over one client, a training step is an ordinary BN training step.
4. Synchronized over K clients, each client's forward and backward are the rows of one BN over
   the concatenation of all clients' batches (the gradient check below).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from common.fedtan.bn_channel import BNChannel, GradSums, Moments
from common.fedtan.bn_sync import (
    FederatedBatchNorm1d,
    FederatedBatchNorm2d,
    FederatedBatchNorm3d,
    _SyncedBatchNormFunction,
    convert_federated_batchnorm,
    federated_batchnorm_layers,
    has_batchnorm,
    revert_federated_batchnorm,
    synchronized,
)
from common.fedtan.inprocess import InProcessHub
from tests.recording_channel import RecordingChannel

# name: (torch class, federated class, input shape (B, C, ...))
SHAPES = {
    "1d-2D": (nn.BatchNorm1d, FederatedBatchNorm1d, (6, 4)),
    "1d-3D": (nn.BatchNorm1d, FederatedBatchNorm1d, (6, 4, 5)),
    "2d": (nn.BatchNorm2d, FederatedBatchNorm2d, (6, 4, 3, 5)),
    "3d": (nn.BatchNorm3d, FederatedBatchNorm3d, (6, 4, 2, 3, 2)),
}
VARIANTS = {
    "default": {},
    "momentum=None": {"momentum": None},
    "momentum=0.3": {"momentum": 0.3},
    "no-running-stats": {"track_running_stats": False},
    "affine=False": {"affine": False},
}
shape_params = pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
variant_params = pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())


def make_pair(torch_cls, fed_cls, num_features, variant, dtype=torch.float32, seed=0):
    """A torch BN layer with non-trivial parameters and buffers, and a federated twin of it."""
    g = torch.Generator().manual_seed(seed)
    ref = torch_cls(num_features, **variant).to(dtype)
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(torch.rand(num_features, generator=g) + 0.5)
            ref.bias.copy_(torch.randn(num_features, generator=g))
        if ref.track_running_stats:
            ref.running_mean.copy_(torch.randn(num_features, generator=g))
            ref.running_var.copy_(torch.rand(num_features, generator=g) + 0.5)
            ref.num_batches_tracked.fill_(3)
    fed = fed_cls(num_features, **variant).to(dtype)
    fed.load_state_dict(ref.state_dict())
    assert type(fed) is fed_cls and isinstance(fed, torch_cls)
    return ref, fed


def random_input(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 1).to(dtype)


def assert_same_state(a: nn.Module, b: nn.Module, exact: bool = True, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], **tol, msg=key)


class ForbiddenChannel(BNChannel):
    """A channel that must not be used."""

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        raise AssertionError(f"unexpected forward sync of {layer!r}")

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        raise AssertionError(f"unexpected backward sync of {layer!r}")


# --- 1. Without a channel, or in eval mode, it is torch's layer -----------------------------


@shape_params
@variant_params
def test_eval_mode_is_torch_batchnorm_bit_for_bit(shape, variant):
    torch_cls, fed_cls, in_shape = shape
    ref, fed = make_pair(torch_cls, fed_cls, in_shape[1], variant)
    ref.eval(), fed.eval()
    x = random_input(in_shape)
    # Even with a channel attached, eval mode never synchronizes.
    with synchronized(fed, ForbiddenChannel()):
        out = fed(x)
    assert torch.equal(out, ref(x))
    assert_same_state(ref, fed)


@shape_params
@variant_params
def test_training_without_channel_is_torch_batchnorm_bit_for_bit(shape, variant):
    torch_cls, fed_cls, in_shape = shape
    ref, fed = make_pair(torch_cls, fed_cls, in_shape[1], variant)
    ref.train(), fed.train()
    for step in range(3):  # several steps: running stats, counters and momentum=None evolve
        x = random_input(in_shape, seed=step)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out_fed = ref(xr), fed(xf)
        assert torch.equal(out_fed, out_ref)
        up = random_input(in_shape, seed=100 + step)
        (out_ref * up).sum().backward()
        (out_fed * up).sum().backward()
        assert torch.equal(xf.grad, xr.grad)
        for (name, p_ref), p_fed in zip(ref.named_parameters(), fed.parameters(), strict=True):
            assert torch.equal(p_fed.grad, p_ref.grad), name
        assert_same_state(ref, fed)


def test_synchronized_requires_federated_layers_and_detaches_on_exit():
    with pytest.raises(ValueError, match="no federated BatchNorm layers.*convert_federated"):
        with synchronized(nn.Sequential(nn.BatchNorm2d(3)), ForbiddenChannel()):
            pass
    model = convert_federated_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)))
    with pytest.raises(RuntimeError, match="boom"):
        with synchronized(model, ForbiddenChannel()):
            raise RuntimeError("boom")
    model.train()(torch.randn(4, 3, 2, 2))  # detached again: the forbidden channel is not called


# --- 2. Conversion --------------------------------------------------------------------------


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 1)
        self.bn3 = nn.BatchNorm3d(4, momentum=None)
        self.inner = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8, 6), nn.BatchNorm1d(6))
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(1, 5, 1), nn.BatchNorm2d(5, affine=False))]
        )
        self.untracked = nn.BatchNorm2d(5, track_running_stats=False)
        self.gn = nn.GroupNorm(1, 5)


def make_nested() -> Nested:
    torch.manual_seed(0)
    model = Nested()
    for m in model.modules():  # non-default values everywhere
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias)
            if m.track_running_stats:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    model.blocks[0][1].eval()
    return model


def test_convert_swaps_every_batchnorm_sharing_parameters_and_buffers():
    model = make_nested()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = dict(model.named_modules())
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}

    converted = convert_federated_batchnorm(model)

    assert converted is model  # children are replaced in place; the root is kept
    expected = {
        "bn3": FederatedBatchNorm3d,
        "inner.2": FederatedBatchNorm1d,
        "blocks.0.1": FederatedBatchNorm2d,
        "untracked": FederatedBatchNorm2d,
    }
    for name, module in model.named_modules():
        if name in expected:
            assert type(module) is expected[name], name
            old = originals[name]
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                assert getattr(module, attr) == getattr(old, attr), (name, attr)
            assert module.training == old.training, name
        else:  # everything else is the very same object
            assert module is originals[name], name
    assert [n for n, _ in federated_batchnorm_layers(model)] == list(expected)
    assert not any(
        type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in model.modules()
    )

    # Same keys, values and dtypes; the very same tensors (shared storage, as SyncBatchNorm does).
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    now = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert list(now) == list(tensors)
    for name, tensor in tensors.items():
        assert now[name] is tensor, name
    assert model.untracked.running_mean is None and model.untracked.num_batches_tracked is None
    assert model.blocks[0][1].weight is None


def test_revert_gives_back_plain_torch_classes_with_equal_state():
    model = make_nested()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reverted = revert_federated_batchnorm(convert_federated_batchnorm(model))
    classes = {n: type(m) for n, m in reverted.named_modules()}
    assert classes["bn3"] is nn.BatchNorm3d and classes["inner.2"] is nn.BatchNorm1d
    assert classes["blocks.0.1"] is nn.BatchNorm2d and classes["untracked"] is nn.BatchNorm2d
    assert not federated_batchnorm_layers(reverted)
    after = reverted.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key


def test_convert_a_bare_batchnorm_returns_a_new_root():
    bn = nn.BatchNorm2d(3, eps=1e-3, momentum=0.2).double()
    fed = convert_federated_batchnorm(bn)
    assert type(fed) is FederatedBatchNorm2d and fed is not bn
    assert fed.weight is bn.weight and fed.running_var is bn.running_var
    assert (fed.eps, fed.momentum) == (1e-3, 0.2)
    back = revert_federated_batchnorm(fed)
    assert type(back) is nn.BatchNorm2d and back.running_mean is bn.running_mean


def test_has_batchnorm():
    assert has_batchnorm(make_nested())
    assert has_batchnorm(convert_federated_batchnorm(make_nested()))
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2)))


# --- 3. One client with a channel: an ordinary BN step --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@shape_params
@variant_params
def test_synced_step_with_one_client_is_an_ordinary_batchnorm_step(shape, variant, dtype):
    torch_cls, fed_cls, in_shape = shape
    ref, fed = make_pair(torch_cls, fed_cls, in_shape[1], variant, dtype=dtype)
    ref.train(), fed.train()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    channel = RecordingChannel(InProcessHub(1).channel(0))
    for step in range(2):
        x = random_input(in_shape, dtype, seed=step)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        up = random_input(in_shape, dtype, seed=100 + step)
        with synchronized(fed, channel):
            out_fed = fed(xf)
            (out_fed * up).sum().backward()
        out_ref = ref(xr)
        (out_ref * up).sum().backward()
        torch.testing.assert_close(out_fed, out_ref, **tol)
        torch.testing.assert_close(xf.grad, xr.grad, **tol)
        for (name, p_ref), p_fed in zip(ref.named_parameters(), fed.parameters(), strict=True):
            torch.testing.assert_close(p_fed.grad, p_ref.grad, **tol, msg=name)
        assert_same_state(ref, fed, exact=False, **tol)
    # Exactly two exchanges per layer and step: forward moments, backward gradient sums.
    assert channel.calls == [("forward", ""), ("backward", "")] * 2


# --- 4. K clients: the gradient check of the backward split ---------------------------------


def per_sample_loss(y: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A smooth, non-linear loss per sample, so that g = dL/dy depends on y (and xhat)."""
    g = torch.Generator().manual_seed(seed)
    flat = y.flatten(1)
    proj = torch.randn(flat.size(1), 3, generator=g, dtype=y.dtype)
    return torch.sin(flat @ proj).sum(1) + 0.1 * (flat**2).sum(1)


def run_synced_clients(template: nn.Module, xs: list[torch.Tensor]):
    """Each client k, in its own thread, runs its batch through its copy of ``template``
    synchronized with the others, with the loss = mean of per-sample losses over its own batch."""
    hub = InProcessHub(len(xs), timeout=30)
    clients = [convert_federated_batchnorm(copy.deepcopy(template)).train() for _ in xs]
    inputs = [x.clone().requires_grad_() for x in xs]
    outputs: list = [None] * len(xs)
    errors: list = [None] * len(xs)

    def work(k: int) -> None:
        try:
            with synchronized(clients[k], hub.channel(k)):
                y = clients[k](inputs[k])
                with torch.autograd.set_multithreading_enabled(False):
                    per_sample_loss(y).mean().backward()
            outputs[k] = y.detach()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors[k] = error
            hub.abort(error)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    for error in errors:
        if error is not None:
            raise error
    return clients, inputs, outputs


GRAD_CASES = {
    # A client with a single sample is fine: BN statistics are those of the union.
    "1d-2D": (nn.BatchNorm1d, (1, 6, 3), (5,)),
    "1d-3D": (nn.BatchNorm1d, (2, 5, 3), (4, 3)),
    "2d": (nn.BatchNorm2d, (2, 5, 3), (3, 4, 2)),
    "3d": (nn.BatchNorm3d, (4, 1, 2), (2, 2, 3, 2)),
}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_backward_split_over_three_clients_matches_autograd_on_the_union(case):
    """Answers, in code, whether the BN backward split is right.

    Each client computes its input gradient with
        dL/dx = gamma / sqrt(var + eps) * (g - S1 / N - xhat * S2 / N)
    from its own g and the union's sums S1 (of g) and S2 (of g * xhat). Here K = 3 clients with
    unequal batch sizes, float64, and the reference is autograd through plain torch BN on the
    concatenated input, with L = the mean over the union of the per-sample losses.

    Client k minimizes the mean loss over its own B_k samples, which is N_b / B_k times its part
    of L; so its input gradient times its share B_k / N_b must equal autograd's rows of
    dL/dx for its samples, and the share-weighted sum of the clients' gamma/beta gradients must
    equal autograd's dL/dgamma, dL/dbeta.
    """
    torch_cls, sizes, sample_shape = case
    channels = sample_shape[0]
    g = torch.Generator().manual_seed(3)
    # Non-IID on purpose: each client's data has its own location and scale.
    xs = [
        torch.randn(b, *sample_shape, generator=g, dtype=torch.float64) * (1 + k) + 2 * k
        for k, b in enumerate(sizes)
    ]
    ref = torch_cls(channels, momentum=0.3).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        ref.bias.copy_(torch.randn(channels, generator=g))
    template = copy.deepcopy(ref)

    clients, inputs, outputs = run_synced_clients(template, xs)

    x_all = torch.cat(xs).requires_grad_()
    y_all = ref.train()(x_all)
    per_sample_loss(y_all).mean().backward()
    total = sum(sizes)
    shares = [b / total for b in sizes]
    tol = {"rtol": 1e-10, "atol": 1e-12}
    for k, rows in enumerate(torch.split(torch.arange(total), list(sizes))):
        torch.testing.assert_close(outputs[k], y_all.detach()[rows], **tol)
        torch.testing.assert_close(inputs[k].grad * shares[k], x_all.grad[rows], **tol)
        # Running statistics come from the union (unbiased variance over the union's N values).
        torch.testing.assert_close(clients[k].running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(clients[k].running_var, ref.running_var, **tol)
        assert clients[k].num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    for name in ("weight", "bias"):
        combined = sum(s * getattr(c, name).grad for s, c in zip(shares, clients, strict=True))
        torch.testing.assert_close(combined, getattr(ref, name).grad, **tol, msg=name)


@pytest.mark.parametrize("affine", [True, False])
def test_synced_function_gradcheck_with_one_client(affine):
    """torch.autograd.gradcheck of the synchronized Function itself (K = 1, float64)."""
    channel = InProcessHub(1).channel(0)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    weight = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()

    if affine:

        def fn(x, weight, bias):
            return _SyncedBatchNormFunction.apply(
                x, weight, bias, None, None, 1e-5, 0.1, channel, "bn"
            )

        inputs = (x, weight, bias)
    else:

        def fn(x):
            return _SyncedBatchNormFunction.apply(
                x, None, None, None, None, 1e-5, 0.1, channel, "bn"
            )

        inputs = (x,)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
