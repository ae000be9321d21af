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

import contextlib
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
from tests.devices import device_params
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


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Same keys, dtypes and values, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


class DtypeRecordingChannel(RecordingChannel):
    """Also records the dtypes of the vectors the client sends."""

    def __init__(self, inner: BNChannel) -> None:
        super().__init__(inner)
        self.sent_dtypes: set[torch.dtype] = set()

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        self.sent_dtypes |= {local.mean.dtype, local.m2.dtype}
        return super().reduce_moments(layer, local)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        self.sent_dtypes |= {local.sum_dy.dtype, local.sum_dy_xhat.dtype}
        return super().reduce_grad_sums(layer, local)


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


class NotedBatchNorm2d(nn.BatchNorm2d):
    """A user's subclass that keeps torch's forward: it adds an attribute and a method."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, momentum=0.25)
        self.note = "kept"

    def describe(self) -> str:
        return f"{self.note} {self.num_features}"


class DoublingBatchNorm2d(nn.BatchNorm2d):
    """A subclass that computes something else in its forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


def test_convert_federates_subclasses_and_syncbatchnorm_and_revert_restores_their_classes():
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        NotedBatchNorm2d(3),
        nn.SyncBatchNorm(3),  # a model written for DDP
        nn.Sequential(NotedBatchNorm2d(3)),
    )
    classes = {n: type(m) for n, m in model.named_modules()}
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}

    convert_federated_batchnorm(model)

    layers = dict(federated_batchnorm_layers(model))
    assert list(layers) == ["0", "1", "2", "3.0"]
    for name, layer in layers.items():
        assert isinstance(layer, classes[name]) and type(layer) is not classes[name], name
    assert type(layers["0"]) is FederatedBatchNorm2d
    assert type(layers["1"]) is type(layers["3.0"])  # one federated twin per class
    assert layers["1"].describe() == "kept 3" and layers["1"].momentum == 0.25
    now = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert list(now) == list(tensors) and all(now[n] is t for n, t in tensors.items())
    # Converted twice: nothing changes.
    assert dict(federated_batchnorm_layers(convert_federated_batchnorm(model))) == layers

    reverted = revert_federated_batchnorm(model)
    assert {n: type(m) for n, m in reverted.named_modules()} == classes
    assert reverted[1].describe() == "kept 3" and "_sync" not in vars(reverted[1])
    now = {n: t for n, t in [*reverted.named_parameters(), *reverted.named_buffers()]}
    assert all(now[n] is t for n, t in tensors.items())


def test_convert_refuses_a_subclass_that_overrides_forward_and_changes_nothing():
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.Sequential(nn.Conv2d(3, 3, 1), DoublingBatchNorm2d(3))
    )
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(
        TypeError, match=r"layer '1\.1' is a tests\.test_bn_sync\.DoublingBatchNorm2d.*forward"
    ):
        convert_federated_batchnorm(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_convert_refuses_an_uninitialized_lazy_batchnorm_and_accepts_it_once_initialized():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"layer '1' is a .*LazyBatchNorm2d.*not initialized"):
        convert_federated_batchnorm(model)
    model(torch.randn(4, 2, 3, 3))  # initializes it: it becomes a BatchNorm2d
    assert type(convert_federated_batchnorm(model)[1]) is FederatedBatchNorm2d


# --- 3. One client with a channel: an ordinary BN step --------------------------------------


def assert_as_close_as_torch(got, plain, truth, name=""):
    """``got`` is no farther from the float64 ``truth`` than 10 times torch's own result in the
    same precision (``plain``) is, or than one float32 rounding of the quantity's size (the
    least noise any computation in float32 or below has). In float64, to 1e-10 of its size."""
    size = truth.abs().max().item()
    error = (got.double() - truth.double()).abs().max().item()
    if got.dtype == torch.float64:
        assert error <= 1e-10 * size, (name, error, size)
        return
    own_noise = (plain.double() - truth.double()).abs().max().item()
    floor = torch.finfo(torch.float32).eps * size
    assert error <= 10 * max(own_noise, floor), (name, error, own_noise, floor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@shape_params
@variant_params
def test_synced_step_with_one_client_is_an_ordinary_batchnorm_step(shape, variant, dtype):
    torch_cls, fed_cls, in_shape = shape
    ref, fed = make_pair(torch_cls, fed_cls, in_shape[1], variant, dtype=dtype)
    ref64 = copy.deepcopy(ref).double()
    channel = RecordingChannel(InProcessHub(1).channel(0))
    for step in range(2):
        x = random_input(in_shape, dtype, seed=step)
        up = random_input(in_shape, dtype, seed=100 + step)
        results = []
        for layer, sync in ((fed, channel), (ref, None), (ref64, None)):
            xi = x.clone().to(layer_dtype(layer)).requires_grad_()
            with synchronized(layer, sync) if sync else contextlib.nullcontext():
                out = layer.train()(xi)
                (out * up.to(out.dtype)).sum().backward()
            grads = [p.grad for p in layer.parameters()]
            state = [t for t in layer.state_dict().values() if t.is_floating_point()]
            results.append([out, xi.grad, *grads, *state])
        for i, (got, plain, truth) in enumerate(zip(*results, strict=True)):
            assert got.dtype == dtype, i
            assert_as_close_as_torch(got, plain, truth, name=str(i))
        fed_state, ref_state = fed.state_dict(), ref.state_dict()
        assert list(fed_state) == list(ref_state)
        assert all(
            torch.equal(fed_state[k], v) for k, v in ref_state.items() if k.endswith("tracked")
        )
    # Exactly two exchanges per layer and step: forward moments, backward gradient sums.
    assert channel.calls == [("forward", ""), ("backward", "")] * 2


def layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(t.dtype for t in layer.state_dict().values() if t.is_floating_point())


# --- 4. K clients: the gradient check of the backward split ---------------------------------


def per_sample_loss(y: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A smooth, non-linear loss per sample, so that g = dL/dy depends on y (and xhat).
    Computed in float32 at least, as a loss under autocast is."""
    g = torch.Generator().manual_seed(seed)
    flat = y.flatten(1).to(torch.promote_types(y.dtype, torch.float32))
    proj = torch.randn(flat.size(1), 3, generator=g, dtype=flat.dtype).to(y.device)
    return torch.sin(flat @ proj).sum(1) + 0.1 * (flat**2).sum(1)


def run_synced_clients(
    template: nn.Module, xs: list[torch.Tensor], input_grad: bool = True, autocast=None
):
    """Each client k, in its own thread, runs its batch through its copy of ``template``
    synchronized with the others, with the loss = mean of per-sample losses over its own batch
    (under ``torch.autocast`` to ``autocast`` if given). Returns the clients, inputs, outputs
    and each client's recording channel."""
    hub = InProcessHub(len(xs), timeout=30)
    clients = [convert_federated_batchnorm(copy.deepcopy(template)).train() for _ in xs]
    inputs = [x.clone().requires_grad_(input_grad) for x in xs]
    channels = [DtypeRecordingChannel(hub.channel(k)) for k in range(len(xs))]
    outputs: list = [None] * len(xs)
    errors: list = [None] * len(xs)

    def work(k: int) -> None:
        device = xs[k].device.type
        try:
            with synchronized(clients[k], channels[k]):
                with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
                    y = clients[k](inputs[k])
                    loss = per_sample_loss(y).mean()
                with torch.autograd.set_multithreading_enabled(False):
                    loss.backward()
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
    return clients, inputs, outputs, channels


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

    clients, inputs, outputs, _ = run_synced_clients(template, xs)

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


# --- 5. Every device, memory format and precision torch's BN accepts -------------------------
# Each case runs on the CPU and, where present, on CUDA, whose BN kernels take other paths
# (2-D input, channels_last, H*W == 1 and inputs without gradient use its unfused backward).


def union_reference(template: nn.Module, xs: list[torch.Tensor], input_grad=True, autocast=None):
    """torch's BN (a copy of ``template``) on the concatenation of ``xs``, with the loss of
    ``run_synced_clients``: the mean of the per-sample losses over the union."""
    ref = copy.deepcopy(template).train()
    x_all = torch.cat([x.detach() for x in xs]).requires_grad_(input_grad)
    device = x_all.device.type
    with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        y_all = ref(x_all)
        loss = per_sample_loss(y_all).mean()
    loss.backward()
    return ref, x_all, y_all.detach()


def compared_quantities(clients, inputs, outputs, sizes):
    """What must equal the union's BN, per client, put in the union's terms: outputs, input
    gradients times the client's share, running statistics; and the share-weighted sums of the
    clients' gamma and beta gradients."""
    total = sum(sizes)
    shares = [b / total for b in sizes]
    out = {"output": torch.cat(outputs)}
    if inputs[0].grad is not None:
        out["input grad"] = torch.cat([x.grad * s for x, s in zip(inputs, shares, strict=True)])
    for name in ("running_mean", "running_var"):
        out[name] = torch.stack([getattr(c, name) for c in clients])
    for name in ("weight", "bias"):
        grads = [getattr(c, name).grad * s for c, s in zip(clients, shares, strict=True)]
        out[f"{name} grad"] = sum(grads)
    return out


def reference_quantities(ref, x_all, y_all, num_clients):
    out = {"output": y_all}
    if x_all.grad is not None:
        out["input grad"] = x_all.grad
    for name in ("running_mean", "running_var"):
        out[name] = getattr(ref, name).expand(num_clients, -1)
    out["weight grad"], out["bias grad"] = ref.weight.grad, ref.bias.grad
    return out


def make_clients_data(sample_shape, sizes, device, dtype=torch.float64, scale=2.0, shift=1.0):
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(b, *sample_shape, generator=g) * scale * (1 + k) + shift * (k + 1)).to(
            device, dtype
        )
        for k, b in enumerate(sizes)
    ]


def make_layer(torch_cls, channels, device):
    g = torch.Generator().manual_seed(12)
    layer = torch_cls(channels, momentum=0.3)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=g))
    return layer.to(device)


LAYOUT_CASES = {
    # name: (torch class, sample shape, memory format, input needs a gradient)
    "2-D input": (nn.BatchNorm1d, (5,), None, True),
    "2-D input without input gradient": (nn.BatchNorm1d, (5,), None, False),
    "H*W == 1": (nn.BatchNorm2d, (5, 1, 1), None, True),
    "channels_last": (nn.BatchNorm2d, (5, 3, 2), torch.channels_last, True),
    "channels_last without input gradient": (nn.BatchNorm2d, (5, 3, 2), torch.channels_last, False),
    "channels_last_3d": (nn.BatchNorm3d, (5, 2, 3, 2), torch.channels_last_3d, True),
}


@device_params
@pytest.mark.parametrize("case", LAYOUT_CASES.values(), ids=LAYOUT_CASES)
def test_layouts_match_batchnorm_on_the_union_and_keep_their_memory_format(device, case):
    torch_cls, sample_shape, memory_format, input_grad = case
    sizes = (2, 5, 3)
    xs = make_clients_data(sample_shape, sizes, device)
    if memory_format is not None:
        xs = [x.contiguous(memory_format=memory_format) for x in xs]
    template = make_layer(torch_cls, sample_shape[0], device).double()

    clients, inputs, outputs, channels = run_synced_clients(template, xs, input_grad=input_grad)
    ref, x_all, y_all = union_reference(template, xs, input_grad)

    got = compared_quantities(clients, inputs, outputs, sizes)
    expected = reference_quantities(ref, x_all, y_all, len(sizes))
    assert list(got) == list(expected) and ("input grad" in got) == input_grad
    for name, value in expected.items():
        scale = value.abs().max().item()
        assert (got[name] - value).abs().max().item() <= 1e-10 * scale, name
    # Without an input gradient there is nothing to exchange backward.
    assert channels[0].calls == [("forward", "")] + [("backward", "")] * input_grad
    if memory_format is not None:
        assert all(y.is_contiguous(memory_format=memory_format) for y in outputs)
        if input_grad:
            assert all(x.grad.is_contiguous(memory_format=memory_format) for x in inputs)


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@device_params
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES.values(), ids=AUTOCAST_DTYPES)
def test_autocast_trains_like_torch_batchnorm_under_autocast(device, dtype):
    """Under autocast a BN layer sees a half input (the output of an autocast convolution) and
    keeps float32 parameters and running statistics. The inputs here are large (about 300,
    spread 100): their squared deviations overflow float16 unless reduced in float32."""
    sizes = (2, 5, 3)
    xs = make_clients_data((4, 3, 4), sizes, device, dtype=dtype, scale=100.0, shift=300.0)
    template = make_layer(nn.BatchNorm2d, 4, device)

    clients, inputs, outputs, channels = run_synced_clients(template, xs, autocast=dtype)
    ref_low, x_low, y_low = union_reference(template, xs, autocast=dtype)
    # The truth: the same layer and the same input values in float64.
    ref64, x64, y64 = union_reference(template.double(), [x.double() for x in xs])

    assert all(
        y.dtype == dtype and x.grad.dtype == dtype for y, x in zip(outputs, inputs, strict=True)
    )
    for client in clients:
        assert all(
            t.dtype == torch.float32 for t in client.state_dict().values() if t.is_floating_point()
        )
        assert client.weight.grad.dtype == client.bias.grad.dtype == torch.float32
    assert all(c.sent_dtypes == {torch.float32} for c in channels)

    got = compared_quantities(clients, inputs, outputs, sizes)
    torch_low = reference_quantities(ref_low, x_low, y_low, len(sizes))
    exact = reference_quantities(ref64, x64, y64, len(sizes))
    for name, truth in exact.items():
        assert bool(torch.isfinite(got[name]).all()), name
        assert_as_close_as_torch(got[name], torch_low[name], truth, name)
