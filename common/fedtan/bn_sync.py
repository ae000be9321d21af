"""Federated BatchNorm: BN layers of several clients that act as one BN over the union batch.

``FederatedBatchNorm1d/2d/3d`` are ``torch.nn.BatchNorm1d/2d/3d`` with one addition: while a
``BNChannel`` is attached (``with synchronized(model, channel):``) and the layer is in training
mode, it normalizes with the statistics of the union of all clients' batches and splits its
backward pass the same way. Otherwise (eval mode, or plain local steps) it *is* the torch layer.
``convert_federated_batchnorm`` makes the same twin of any other BatchNorm class whose forward
is torch's (``nn.SyncBatchNorm``, a user's subclass).

Statistics are reduced, exchanged and applied in float32 at least, as torch's own kernels do for
half inputs (autocast included); running statistics keep the parameters' dtype; outputs and
input gradients keep the input's dtype and memory format.

The math (shared doc, section 2): with xhat = (x - mu) / sqrt(var + eps) and g = dL/dy,

    dL/dx = gamma / sqrt(var + eps) * (g - S1 / N - xhat * S2 / N),
    S1 = sum of g over the union batch,  S2 = sum of g * xhat over the union batch.

Each client minimizes the mean loss over its own samples, so its g is N / n_k times its share of
the union's g. It therefore sends its partial sums weighted by n_k / N, and the summed result,
which is in the union's scale, enters its formula as S / n_k.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from common.fedtan.bn_channel import BNChannel, GradSums, Moments, share_of_union


class _SyncedBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the union batch; the two ``channel`` calls are the only communication."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, channel, layer):
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.size(1)
        # Statistics are reduced, exchanged and applied in float32 at least, as torch's BN
        # kernels do for half inputs (autocast included): squared deviations overflow float16.
        acc = torch.promote_types(x.dtype, torch.float32)
        # Two passes (mean, then squared deviations): on CPU about 10x faster than
        # torch.var_mean over these dims, and as accurate.
        mean = x.mean(dims, dtype=acc)
        m2 = (x - _per_channel(mean, x)).pow_(2).sum(dims, dtype=acc)
        union = channel.reduce_moments(layer, Moments(count, mean, m2))

        # The union statistics may arrive on another device (a transport works on the CPU).
        mean, var = (v.to(x.device, acc) for v in (union.mean, union.var))
        if running_mean is not None:
            # PyTorch's convention: the running variance is unbiased over the union batch.
            unbiased = var * (union.count / max(union.count - 1, 1))
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)

        # With every parameter in `acc`, the native kernels run in their mixed-precision mode
        # for a half input (a no-op cast otherwise): one code path on every device and dtype.
        weight_acc = torch.ones_like(mean) if weight is None else weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        # One fused native pass: BN in its eval form, with the union's statistics.
        out = _batch_norm_eval(x, weight_acc, bias_acc, mean, var, eps)

        ctx.save_for_backward(x, weight_acc, mean, var, torch.rsqrt(var + eps))
        ctx.eps, ctx.channel, ctx.layer = eps, channel, layer
        ctx.count, ctx.share = count, share_of_union(count, union.count)
        ctx.param_dtype = None if weight is None else weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, mean, var, invstd = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        # One fused native pass gives this client's sums S1 = sum g (eval-mode grad_bias) and
        # S2 = sum g * xhat (eval-mode grad_weight), and gamma * invstd * g (eval grad_input).
        # The saved mean and invstd must be passed: CUDA's unfused path (2-D or channels_last
        # input, no input gradient) asserts on them.
        scaled_g, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out,
            x,
            w,
            mean,
            var,
            mean,
            invstd,
            train=False,
            eps=ctx.eps,
            output_mask=[need_x, True, True],
        )

        grad_x = None
        if need_x:
            union = ctx.channel.reduce_grad_sums(
                ctx.layer, GradSums(sum_dy * ctx.share, sum_dy_xhat * ctx.share)
            )
            s1, s2 = (
                v.to(grad_out.device, mean.dtype) / ctx.count
                for v in (union.sum_dy, union.sum_dy_xhat)
            )
            # gamma * invstd * (g - s1 - xhat * s2): the xhat term in one fused pass.
            scale = w * invstd
            correction = _batch_norm_eval(x, -scale * s2, -scale * s1, mean, var, ctx.eps)
            grad_x = scaled_g.add_(correction)

        # gamma and beta only see this client's samples: their local sums are their gradients.
        grad_weight = sum_dy_xhat.to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _batch_norm_eval(
    x: Tensor, weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per channel: BN's eval form, one fused
    pass of torch's native kernel (not cuDNN's), the kernel family of the backward's
    ``native_batch_norm_backward``."""
    return torch.batch_norm(
        x, weight, bias, mean, var, training=False, momentum=0.0, eps=eps, cudnn_enabled=False
    )


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


class _FederatedBatchNorm:
    """Adds the synchronized training step to a torch BatchNorm class (mixed in before it)."""

    _sync: tuple[BNChannel, str] | None = None

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self._sync is None:
            return super().forward(input)
        self._check_input_dim(input)
        channel, layer = self._sync

        # Same bookkeeping as torch.nn.modules.batchnorm._BatchNorm.forward.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats and self.running_mean is not None
        return _SyncedBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            self.eps, momentum, channel, layer,
        )  # fmt: skip


class FederatedBatchNorm1d(_FederatedBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that can normalize over the union of several clients' batches."""


class FederatedBatchNorm2d(_FederatedBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that can normalize over the union of several clients' batches."""


class FederatedBatchNorm3d(_FederatedBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that can normalize over the union of several clients' batches."""


# The forward methods whose computation the federated layer reproduces: torch's BN, and
# SyncBatchNorm's, which is the same outside a process group.
_KNOWN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
_federated_classes: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FederatedBatchNorm1d,
    nn.BatchNorm2d: FederatedBatchNorm2d,
    nn.BatchNorm3d: FederatedBatchNorm3d,
}


def convert_federated_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of ``module`` federated.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: every instance of torch's ``_BatchNorm``
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and their subclasses) is replaced in place, the
    new layer shares the old one's parameters, buffers and attributes, and the (possibly new)
    root is returned. A subclass that overrides ``forward`` is refused: its computation is not
    the one FedTAN synchronizes. So is a lazy layer that has not seen an input yet.
    """
    # Check every layer before replacing any: a refused model is left as it was.
    for path, child in module.named_modules():
        _to_federated(child, path)
    return _swap_batchnorms(module, "", _to_federated)


def revert_federated_batchnorm(module: nn.Module) -> nn.Module:
    """Inverse of ``convert_federated_batchnorm``: every layer gets its original class back."""
    return _swap_batchnorms(module, "", _to_original)


def federated_batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The federated BN layers of ``model`` with their qualified names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FederatedBatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextmanager
def synchronized(model: nn.Module, channel: BNChannel) -> Iterator[nn.Module]:
    """Within this block, the federated BN layers of ``model`` synchronize through ``channel``.

    The layer names become the keys of the exchange, so all clients must use the same model.
    """
    layers = federated_batchnorm_layers(model)
    if not layers:
        raise ValueError(
            "the model has no federated BatchNorm layers: "
            "call convert_federated_batchnorm(model) first"
        )
    for name, layer in layers:
        layer._sync = (channel, name)
    try:
        yield model
    finally:
        for _, layer in layers:
            layer._sync = None


def _to_federated(module: nn.Module, path: str) -> type[nn.Module] | None:
    if isinstance(module, _FederatedBatchNorm) or not isinstance(
        module, nn.modules.batchnorm._BatchNorm
    ):
        return None
    cls = type(module)
    where = f"layer {path!r}" if path else "the model itself"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"{where} is a {_class_name(cls)} that is not initialized yet: "
            "run one forward pass before convert_federated_batchnorm"
        )
    if cls.forward not in _KNOWN_FORWARDS:
        raise TypeError(
            f"{where} is a {_class_name(cls)}, which overrides forward(): FedTAN cannot "
            "synchronize a computation it does not know; derive from the torch class without "
            "overriding forward, or keep the layer out of the model"
        )
    if cls not in _federated_classes:
        # One federated twin per user class, so that its own methods and attributes remain.
        _federated_classes[cls] = type(
            f"Federated{cls.__name__}",
            (_FederatedBatchNorm, cls),
            {"__module__": __name__, "__doc__": f"Federated {_class_name(cls)}."},
        )
    return _federated_classes[cls]


def _to_original(module: nn.Module, path: str) -> type[nn.Module] | None:
    if not isinstance(module, _FederatedBatchNorm):
        return None
    # The federated class is (_FederatedBatchNorm, original): the original is next in the MRO.
    mro = type(module).__mro__
    return mro[mro.index(_FederatedBatchNorm) + 1]


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _swap_batchnorms(
    module: nn.Module, path: str, target_class: Callable[[nn.Module, str], type[nn.Module] | None]
) -> nn.Module:
    out = module
    target = target_class(module, path)
    if target is not None:
        # A new object of the target class over the same tensors and attributes; the module
        # dicts are copied so that swapping the new layer's children leaves the old one intact.
        out = target.__new__(target)
        out.__dict__.update(
            {k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
        )
        out.__dict__.pop("_sync", None)  # a channel attachment is no part of the layer
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        out.add_module(name, _swap_batchnorms(child, child_path, target_class))
    return out


class _TracingChannel(BNChannel):
    """A one-client channel that records the order in which the BN layers synchronize."""

    def __init__(self) -> None:
        self.forward: list[str] = []
        self.backward: list[str] = []

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        self.forward.append(layer)
        return local

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        self.backward.append(layer)
        return local


def trace_sync_points(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn
) -> tuple[list[str], list[str]]:
    """The BN layers in the order a synced step reaches them: (forward order, backward order).

    Runs one step on a copy of ``model`` as a single client; a server uses it to know the 2L
    exchanges of a round before it starts them. The order must not depend on the data.
    """
    traced = convert_federated_batchnorm(copy.deepcopy(model)).train()
    channel = _TracingChannel()
    with synchronized(traced, channel):
        loss_fn(traced(inputs), targets).backward()
    return channel.forward, channel.backward
