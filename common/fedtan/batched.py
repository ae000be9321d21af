"""The batched engine: one FedTAN round with the K clients run as one computation.

The threaded engine runs K client models in K Python threads; under the GIL their small
operations run one after another, so a round with little compute per client costs K times the
fixed cost of a step. Here the K clients' parameters and buffers are stacked along a leading
client dimension and one ``torch.func.vmap`` over ``functional_call`` runs all K clients in each
operation (a convolution becomes one grouped convolution, and so on).

The synchronized step needs the one thing vmap cannot express per client: BN statistics of the
union batch. A federated layer steps out of vmap for it (``_to_clients_stack`` hands it the
physical ``(K, B, C, ...)`` tensor), normalizes the union with torch's own batch norm, applies
each client's affine parameters, and steps back in (``_from_clients_stack``). Autograd then
differentiates the sum of the K clients' mean losses through that graph. With equal client
batches, client k's gradient of that sum is FedTAN's gradient for client k (shared doc, section
2): dL/dx_k = gamma * invstd * (g_k - mean_union(g) - xhat * mean_union(g * xhat)), where gamma
is the same for every client because the synchronized step is the round's first, taken from the
global model. Steps 2..E are the same vmapped call with torch's BN, per client.

Each client's optimizer (``torch.optim.SGD``, fresh per round) steps the stacked parameters,
which is K independent SGD steps (SGD is elementwise). The round's result is the sample-weighted
average of the K states (``average_states``), as the threaded engine returns.

``batching_obstacle`` says why a round cannot run batched (unequal client batches, BN momentum
None, half precision or autocast, a BN layer with its own forward); the caller then runs the
threaded engine. ``batching_pays_off`` says whether it is the faster engine for a round.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from common.fedtan.aggregation import average_states

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

# The forward methods whose computation the batched layer reproduces (as bn_sync's twin does).
_KNOWN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
_BATCHED_DTYPES = (torch.float32, torch.float64)


class _ToClientsStack(torch.autograd.Function):
    """Under vmap over the clients: each per-client tensor becomes the physical stack of all K
    (an unbatched ``(K, ...)`` tensor), so that one computation can see the union batch. One
    call for all of a layer's tensors: each call of a Function under vmap costs Python work."""

    @staticmethod
    def forward(*tensors: Tensor) -> tuple[Tensor, ...]:  # outside vmap: stacks of one client
        return tuple(t.unsqueeze(0) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:
        return tuple(g.squeeze(0) for g in grads)

    @staticmethod
    def vmap(info, in_dims, *tensors: Tensor):
        stacks = tuple(
            # The same tensor for every client, or a plain view of the physical tensor
            # (autograd records it like any other op).
            t.unsqueeze(0).expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
            for t, dim in zip(tensors, in_dims, strict=True)
        )
        return stacks, (None,) * len(stacks)


class _FromClientsStack(torch.autograd.Function):
    """The inverse of ``_ToClientsStack``: a ``(K, ...)`` stack becomes per-client again.
    ``like`` is any per-client tensor: it makes vmap call this rule (an all-unbatched call
    would run unbatched)."""

    @staticmethod
    def forward(stack: Tensor, like: Tensor) -> Tensor:  # outside vmap: a stack of one client
        return stack.squeeze(0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.unsqueeze(0), None

    @staticmethod
    def vmap(info, in_dims, stack: Tensor, like: Tensor):
        if in_dims[0] is not None:
            raise ValueError("_FromClientsStack expects the physical stack, not a per-client one")
        # A new tensor object: vmap hands back an input returned as is unchanged (unbatched).
        return stack.view_as(stack), 0


def _union_batch_norm(layer: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``layer``'s training forward over the union of the K clients' batches (``x`` per client,
    under vmap): union statistics, each client's own affine parameters."""
    momentum = layer.momentum  # not None: batching_obstacle
    affine = layer.weight is not None
    track = layer.track_running_stats and layer.running_mean is not None
    if track:
        layer.num_batches_tracked.add_(1)
    per_client = [x]
    if affine:
        per_client += [layer.weight, layer.bias]
    if track:
        per_client += [layer.running_mean, layer.running_var]
    stack, *stacks = _ToClientsStack.apply(*per_client)  # stack: (K, B, C, *spatial)
    running_mean = running_var = None
    if track:
        # Every client holds the same running statistics in the synchronized step (all start
        # from the global model and add the same union statistics): update one copy, give it
        # to all.
        running_mean, running_var = (s[0].detach().clone() for s in stacks[-2:])
    # torch's own kernel over the union batch: its statistics (and its running-statistics update,
    # unbiased over the union) are the centralized BN's. vmap's convolutions leave the samples
    # outside the clients in memory ((B, K, C, ...)): flatten in that order, a view, not a copy.
    samples_first = stack.transpose(0, 1)
    union = samples_first if samples_first.is_contiguous() else stack
    xhat = F.batch_norm(
        union.flatten(0, 1), running_mean, running_var, None, None, True, momentum, layer.eps
    ).view(union.shape)
    if union is samples_first:
        xhat = xhat.transpose(0, 1)
    if track:
        with torch.no_grad():
            layer.running_mean.copy_(running_mean)
            layer.running_var.copy_(running_var)
    if affine:
        per_channel = (stack.shape[0], 1, -1, *([1] * (stack.dim() - 3)))
        weight, bias = (s.view(per_channel) for s in stacks[:2])
        xhat = torch.addcmul(bias, xhat, weight)
    return _FromClientsStack.apply(xhat, x)


class _BatchedBatchNorm:
    """Adds the union-batch training step to a torch BatchNorm class, for use under vmap."""

    union: bool = False

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not self.union:
            return super().forward(input)
        self._check_input_dim(input)
        return _union_batch_norm(self, input)


_batched_classes: dict[type[nn.Module], type[nn.Module]] = {}


def _batched_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _batched_classes:
        _batched_classes[cls] = type(f"Batched{cls.__name__}", (_BatchedBatchNorm, cls), {})
    return _batched_classes[cls]


def _batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batching_obstacle(model: nn.Module, client_batches: Sequence[Sequence[Batch]]) -> str | None:
    """Why this round cannot run batched, or None if it can. Checks shapes and settings only;
    vmap may still refuse the model's forward (random ops, ``.item()``), which the caller sees
    as an exception."""
    layers = _batchnorm_layers(model)
    if not layers:
        return "the model has no BatchNorm layers"
    for layer in layers:
        if type(layer).forward not in _KNOWN_FORWARDS:
            return f"{type(layer).__name__} overrides forward()"
        if layer.momentum is None:
            return "a BatchNorm layer has momentum=None (a cumulative average)"
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_floating_point() and t.dtype not in _BATCHED_DTYPES for t in tensors):
        return "the model has half-precision tensors"
    device_type = next(iter(tensors)).device.type if tensors else "cpu"
    if torch.is_autocast_enabled(device_type):
        return "autocast is enabled"
    steps = {len(batches) for batches in client_batches}
    if len(steps) != 1:
        return f"the clients take different numbers of local steps: {sorted(steps)}"
    for step in range(steps.pop()):
        sizes = {len(batches[step][1]) for batches in client_batches}
        if len(sizes) != 1:
            return f"step {step}: the clients' batch sizes differ: {sorted(sizes)}"
        shapes = {tuple(batches[step][0].shape) for batches in client_batches}
        if len(shapes) != 1:
            return f"step {step}: the clients' input shapes differ"
    return None


# On the CPU, vmap's grouped convolutions cost more than K separate ones once a client's batch
# is large: bench_round.py (ResNet-20, 5 clients, one thread, CPU seconds per round against a
# centralized step) measured batched 2.0x / threads 2.5x at 8 samples per client, and batched
# 1.9x / threads 1.4x at 32 (1.6x / 0.76x at 128): the crossover lies between 8 and 32, and
# this splits it.
CPU_BATCHED_MAX_SAMPLES = 16


def batching_pays_off(client_batches: Sequence[Sequence[Batch]]) -> bool:
    """Whether the batched engine is the faster one for this round (``synced_round``'s default):
    on an accelerator always (each small kernel launch is the cost that batching removes); on
    the CPU while the clients' batches are small (see ``CPU_BATCHED_MAX_SAMPLES``)."""
    inputs = client_batches[0][0][0]
    if inputs.device.type != "cpu":
        return True
    return max(len(y) for batches in client_batches for _, y in batches) <= (
        CPU_BATCHED_MAX_SAMPLES
    )


class BatchedClients:
    """The structure the batched engine runs for ``model``: a copy whose BN layers can normalize
    over the union batch. Made once per model and reused round after round; its own tensors are
    never used (every call passes the stacked client states)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._build()

    def _build(self) -> None:
        self._network = copy.deepcopy(self.model)
        for layer in _batchnorm_layers(self._network):
            layer.__class__ = _batched_class(type(layer))
        self._union_layers: list[_BatchedBatchNorm] = _batchnorm_layers(self._network)  # type: ignore[assignment]
        self._layout = _layout(self.model)

    def round(
        self,
        client_batches: Sequence[Sequence[Batch]],
        loss_fn: LossFn,
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> dict[str, Tensor]:
        """One FedTAN round, the clients batched; returns the new global ``state_dict``.
        ``batching_obstacle(model, client_batches)`` must be None."""
        if _layout(self.model) != self._layout:
            # The model's tensors changed (another device, dtype or shape): start again.
            self._build()
        num_clients = len(client_batches)
        # Every client starts from the global model: one stacked copy per tensor.
        params = {
            name: _stacked(p, num_clients).requires_grad_(p.requires_grad)
            for name, p in self.model.named_parameters()
        }
        buffers = {name: _stacked(b, num_clients) for name, b in self.model.named_buffers()}
        optimizer = torch.optim.SGD(
            params.values(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        network = self._network.train()

        def client_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor):
            return loss_fn(functional_call(network, (p, b), (x,)), y)

        batched_loss = vmap(client_loss)
        for step in range(len(client_batches[0])):
            inputs = torch.stack([batches[step][0] for batches in client_batches])
            targets = torch.stack([batches[step][1] for batches in client_batches])
            self._set_union(step == 0)
            try:
                losses = batched_loss(params, buffers, inputs, targets)
            finally:
                self._set_union(False)
            optimizer.zero_grad(set_to_none=True)
            # Client k's gradient of the sum is its own loss's (its parameters reach the other
            # clients' losses only through the union statistics, as in FedTAN's backward).
            losses.sum().backward()
            optimizer.step()

        stacked = {**params, **buffers}
        names = _state_names(self.model)
        states = [
            {key: stacked[name][k].detach() for key, name in names.items()}
            for k in range(num_clients)
        ]
        weights = [sum(len(targets) for _, targets in batches) for batches in client_batches]
        return average_states(states, weights)

    def _set_union(self, union: bool) -> None:
        for layer in self._union_layers:
            layer.union = union


def _stacked(t: Tensor, num_clients: int) -> Tensor:
    return t.detach().unsqueeze(0).repeat(num_clients, *([1] * t.dim()))


def _state_names(model: nn.Module) -> dict[str, str]:
    """Each ``state_dict`` key with the name ``functional_call`` knows its tensor by (tied
    tensors appear under several keys but once among the named tensors)."""
    name_of = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return {key: name_of[id(t)] for key, t in model.state_dict(keep_vars=True).items()}


def _layout(model: nn.Module) -> list[tuple[str, torch.Size, torch.dtype, torch.device]]:
    return [
        (n, t.shape, t.dtype, t.device)
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    ]


__all__ = ["BatchedClients", "batching_obstacle", "batching_pays_off"]
