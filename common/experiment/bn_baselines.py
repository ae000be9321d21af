"""The BatchNorm layers of two baselines that normalize with global statistics: FBN and HybridBN.

* FBN (Guerraoui et al. 2024, arXiv 2405.14670): in training, a client normalizes with the
  *global* mean and variance the server sent at the start of the round, never with its batch's.
* HybridBN (Chen et al. 2025, arXiv 2505.21877): per channel, a learnable ``a = sigmoid(d)``
  blends them: ``mean = (1 - a) * global + a * batch``, the same for the variance.

Both keep the global statistics in torch's ``running_mean`` / ``running_var`` (so evaluation is
torch's eval-mode BN with them), never update them in ``forward``, and record the moments of
every input they normalize in training (``round_count``, ``round_mean``, ``round_m2``: what the
layer saw since ``reset_round_moments``). The server pools the clients' recorded moments into the
next round's global statistics: the mean and (biased) variance of the union of everything the
clients normalized in the round (``pooled_statistics``). These buffers are part of the
``state_dict``, so they travel with the model.

Where the reference implementation (``Hongyao-Chen/HybridBN``, ``FedBaseline/models``) differs,
we follow the papers' definitions as the issue states them: its FBN clients record the
unweighted mean of per-batch means and variances (which drops the spread of the batch means),
and its server divides by ``n - 1`` and blends the result into the old statistics with momentum
0.1; its HybridBN keeps ``d`` on each client and records the statistics in a separate pass over
one batch after training, with the blended statistics. Here the pooled statistics are exactly the
union's, and ``d`` is averaged like every other parameter. As in the reference, the global
statistics start at torch's mean 0 / variance 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from common.fedtan.bn_channel import BNSyncError, Moments, combine_moments

ROUND_MOMENTS = ("round_count", "round_mean", "round_m2")


class _GlobalStatsBatchNorm(_BatchNorm):
    """BatchNorm whose running statistics are global ones (the server's), with a record of the
    moments of everything it normalized in training since ``reset_round_moments``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # momentum is never used: forward does not update the running (global) statistics.
        super().__init__(num_features, eps, None, affine, True, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("round_count", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("round_mean", torch.zeros(num_features, **factory))
        self.register_buffer("round_m2", torch.zeros(num_features, **factory))

    def reset_round_moments(self) -> None:
        self.round_count.zero_()
        self.round_mean.zero_()
        self.round_m2.zero_()

    def round_moments(self) -> Moments:
        return Moments(int(self.round_count), self.round_mean, self.round_m2)

    @torch.no_grad()
    def _record(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Merge a batch's moments into the round's (Chan et al.), in float64, on the device:
        no read of a value, so no wait for the device."""
        seen = self.round_count.double()
        total = seen + count
        delta = mean.double() - self.round_mean.double()
        merged_mean = self.round_mean.double() + delta * (count / total)
        spread = delta**2 * (seen * count / total)
        merged_m2 = self.round_m2.double() + var.double() * count + spread
        self.round_mean.copy_(merged_mean)
        self.round_m2.copy_(merged_m2)
        self.round_count.add_(count)

    def _global_form(self, input: Tensor) -> Tensor:
        """Normalization with the global statistics: torch's BN in its eval form."""
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


def _batch_moments(input: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of ``input`` (in float32 at least), and the count."""
    dims = [0, *range(2, input.dim())]
    acc = torch.promote_types(input.dtype, torch.float32)
    var, mean = torch.var_mean(input.to(acc), dims, correction=0)
    return mean, var, input.numel() // input.size(1)


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


class _FBN(_GlobalStatsBatchNorm):
    """FBN's layer: training normalizes with the global statistics exactly (as eval does), the
    batch only feeds the round's recorded moments."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.training:
            with torch.no_grad():
                self._record(*_batch_moments(input))
        return self._global_form(input)


class _HybridBN(_GlobalStatsBatchNorm):
    """HybridBN's layer: training normalizes with ``(1 - a) * global + a * batch`` statistics,
    ``a = sigmoid(mix_logit)`` per channel (``d`` in the paper; learned, gradients through the
    batch statistics as in BN); eval uses the global statistics."""

    def __init__(self, num_features: int, *args, mix_logit: float = 0.0, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        factory = {"device": self.running_mean.device, "dtype": self.running_mean.dtype}
        self.mix_logit = nn.Parameter(torch.full((num_features,), float(mix_logit), **factory))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return self._global_form(input)
        batch_mean, batch_var, count = _batch_moments(input)
        self._record(batch_mean.detach(), batch_var.detach(), count)
        a = torch.sigmoid(self.mix_logit).to(batch_mean.dtype)
        # Written out rather than lerp: a = 0 gives the global statistics exactly, a = 1 the
        # batch's exactly (FBN and local BN are its limits).
        mean = (1 - a) * self.running_mean + a * batch_mean
        var = (1 - a) * self.running_var + a * batch_var
        out = (input.to(mean.dtype) - _per_channel(mean, input)) * _per_channel(
            torch.rsqrt(var + self.eps), input
        )
        if self.weight is not None:
            out = out * _per_channel(self.weight, input) + _per_channel(self.bias, input)
        return out.to(input.dtype)


class FBNBatchNorm1d(_FBN, nn.BatchNorm1d):
    """FBN's ``nn.BatchNorm1d``."""


class FBNBatchNorm2d(_FBN, nn.BatchNorm2d):
    """FBN's ``nn.BatchNorm2d``."""


class FBNBatchNorm3d(_FBN, nn.BatchNorm3d):
    """FBN's ``nn.BatchNorm3d``."""


class HybridBatchNorm1d(_HybridBN, nn.BatchNorm1d):
    """HybridBN's ``nn.BatchNorm1d``."""


class HybridBatchNorm2d(_HybridBN, nn.BatchNorm2d):
    """HybridBN's ``nn.BatchNorm2d``."""


class HybridBatchNorm3d(_HybridBN, nn.BatchNorm3d):
    """HybridBN's ``nn.BatchNorm3d``."""


_FBN_CLASSES = {nn.BatchNorm1d: FBNBatchNorm1d, nn.BatchNorm2d: FBNBatchNorm2d}
_FBN_CLASSES[nn.BatchNorm3d] = FBNBatchNorm3d
_HYBRID_CLASSES = {nn.BatchNorm1d: HybridBatchNorm1d, nn.BatchNorm2d: HybridBatchNorm2d}
_HYBRID_CLASSES[nn.BatchNorm3d] = HybridBatchNorm3d


def convert_fbn(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` of ``module`` by FBN's layer (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does: same parameters and running statistics,
    which become the global ones); returns the (possibly new) root."""
    return _convert(module, _FBN_CLASSES, {})


def convert_hybridbn(module: nn.Module, mix_logit: float = 0.0) -> nn.Module:
    """Like ``convert_fbn``, with HybridBN's layer; ``mix_logit``: the initial ``d`` of every
    channel (0, a = 0.5, as the reference implementation)."""
    return _convert(module, _HYBRID_CLASSES, {"mix_logit": mix_logit})


def _convert(module: nn.Module, classes: Mapping[type, type], kwargs: dict) -> nn.Module:
    # Check every layer before replacing any: a refused model is left as it was.
    for path, child in module.named_modules():
        _target(child, path, classes)
    return _swap(module, "", classes, kwargs)


def _target(module: nn.Module, path: str, classes: Mapping[type, type]) -> type | None:
    if isinstance(module, _GlobalStatsBatchNorm) or not isinstance(module, _BatchNorm):
        return None
    where = f"layer {path!r}" if path else "the model itself"
    target = next((new for old, new in classes.items() if isinstance(module, old)), None)
    if target is None:
        raise TypeError(
            f"{where} is a {type(module).__name__}: only BatchNorm1d/2d/3d (and their "
            "subclasses) can be converted; an uninitialized lazy layer needs one forward pass"
        )
    if not module.track_running_stats:
        raise ValueError(
            f"{where} has track_running_stats=False: the global statistics live in its "
            "running_mean and running_var"
        )
    return target


def _swap(module: nn.Module, path: str, classes: Mapping[type, type], kwargs: dict) -> nn.Module:
    out = module
    if (target := _target(module, path, classes)) is not None:
        like = {"device": module.running_mean.device, "dtype": module.running_mean.dtype}
        out = target(module.num_features, module.eps, module.affine, **like, **kwargs)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if (value := getattr(module, name)) is not None:
                    getattr(out, name).copy_(value)
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _swap(child, f"{path}.{name}" if path else name, classes, kwargs))
    return out


def global_stats_layers(model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s FBN and HybridBN layers, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, _GlobalStatsBatchNorm)]


def reset_round_moments(model: nn.Module) -> None:
    """Start a round: every FBN/HybridBN layer records only what it normalizes from now on."""
    for module in model.modules():
        if isinstance(module, _GlobalStatsBatchNorm):
            module.reset_round_moments()


def recorded_moments(state: Mapping[str, Tensor], layer: str) -> Moments:
    """The moments ``layer`` recorded, read from a client's ``state_dict``."""
    count = state[f"{layer}.round_count"]
    if count.numel() != 1 or count.is_floating_point() or count.is_complex():
        raise BNSyncError(
            f"layer {layer!r}: round_count must be one integer, got {count.dtype} "
            f"of shape {tuple(count.shape)}"
        )
    return Moments(int(count), state[f"{layer}.round_mean"], state[f"{layer}.round_m2"])


def pooled_statistics(
    states: Sequence[Mapping[str, Tensor]], layers: Sequence[str]
) -> dict[str, Tensor]:
    """The next round's global statistics from the clients' ``state_dict``s: for every layer,
    the mean and biased variance of the union of everything the clients normalized in the round
    (count-weighted means; the variance includes the spread of the client means), as
    ``running_mean`` / ``running_var``, and the union's moments as its round moments. Computed in
    float64, stored in the layer's dtype."""
    pooled: dict[str, Tensor] = {}
    for layer in layers:
        parts = {k: recorded_moments(state, layer) for k, state in enumerate(states)}
        union = combine_moments(layer, parts)  # exact, float64; refuses bad parts
        dtype = states[0][f"{layer}.running_mean"].dtype
        pooled[f"{layer}.running_mean"] = union.mean.to(dtype)
        pooled[f"{layer}.running_var"] = union.var.to(dtype)
        pooled[f"{layer}.round_count"] = torch.tensor(union.count, dtype=torch.long)
        pooled[f"{layer}.round_mean"] = union.mean.to(dtype)
        pooled[f"{layer}.round_m2"] = union.m2.to(dtype)
    return pooled
