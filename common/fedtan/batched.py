"""The batched engine: one FedTAN round with the K clients run as one computation.

The threaded engine runs K client models in K Python threads; under the GIL their small
operations run one after another, so a round with little compute per client costs K times the
fixed cost of a step. Here the K clients' parameters and buffers are stacked along a leading
client dimension and one ``torch.func.vmap`` over ``functional_call`` runs all K clients in each
operation (a convolution becomes one grouped convolution, and so on).

The synchronized step needs the one thing vmap cannot express per client: BN statistics of the
union batch. A federated layer steps out of vmap for it (``_union_batch_norm`` takes the
physical ``(K, B, C, ...)`` tensor behind the per-client one), normalizes the union with torch's
own batch norm, applies each client's affine parameters, and hands the result back to vmap.
Autograd then differentiates the sum of the K clients' mean losses through that graph. With
equal client batches, client k's gradient of that sum is FedTAN's gradient for client k (shared
doc, section 2): dL/dx_k = gamma * invstd * (g_k - mean_union(g) - xhat * mean_union(g * xhat)),
where gamma is the same for every client because the synchronized step is the round's first,
taken from the global model. Steps 2..E are the same vmapped call with torch's BN, per client.

The stacked tensors are kept from round to round and reloaded from the global model
(``_ClientStacks``). One SGD optimizer (fresh per round, as every client makes) steps them all,
which is K independent SGD steps (SGD is elementwise). The round's result is the
sample-weighted average of the K states, computed as ``average_states`` computes it for the
threaded engine.

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

from common.fedtan.aggregation import weighted_row_mean

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

# The forward methods whose computation the batched layer reproduces (as bn_sync's twin does).
_KNOWN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
_BATCHED_DTYPES = (torch.float32, torch.float64)


def _union_batch_norm(
    layer: nn.modules.batchnorm._BatchNorm, x: Tensor, num_clients: int
) -> Tensor:
    """``layer``'s training forward over the union of the K clients' batches: union
    statistics, each client's own affine parameters. ``x`` and the layer's tensors are per
    client (under vmap); this steps out of vmap to see all clients at once.

    Out of vmap by hand, with ``torch._C._functorch``'s unwrap and wrap (private, pinned by
    this project's torch version and its exactness tests): the physical tensors of all clients
    are what an ``autograd.Function``'s vmap rule would be given, without that rule's Python
    dispatch per call. Plain torch operations on them are recorded and differentiated by
    autograd like any others.
    """
    if layer.track_running_stats and layer.running_mean is not None:
        layer.num_batches_tracked.add_(1)
    level = torch._C._functorch.maybe_current_level()
    samples_first = _samples_first(x, level, num_clients)  # (B, K, C, *spatial)
    samples, _, channels, *spatial = samples_first.shape
    xhat = _normalize_union(layer, samples_first.flatten(0, 1), level, num_clients)
    # The same memory seen as K * C client-channels: (B, K * C, *spatial).
    per_client = xhat.view(samples, num_clients * channels, *spatial)
    if layer.weight is not None:
        # Each client's own affine parameters, in one fused pass (forward and backward): BN in
        # its eval form over the client-channels, with mean 0 and variance 1 (eps 0), is
        # x * weight + bias, and its backward gives each client's own sums.
        per_client = F.batch_norm(
            per_client,
            per_client.new_zeros(num_clients * channels),
            per_client.new_ones(num_clients * channels),
            _all_clients(layer.weight, level, num_clients).view(-1),
            _all_clients(layer.bias, level, num_clients).view(-1),
            training=False,
            eps=0.0,
        )
    out = per_client.view(samples, num_clients, channels, *spatial)
    return torch._C._functorch._add_batch_dim(out, 1, level)


def _normalize_union(
    layer: nn.modules.batchnorm._BatchNorm, union: Tensor, level: int, num_clients: int
) -> Tensor:
    """``union`` (the K clients' samples, physical) normalized with its own statistics by
    torch's kernel, whose statistics and running-statistics update (unbiased over the union)
    are the centralized BN's; the clients' running statistics updated with them."""
    track = layer.track_running_stats and layer.running_mean is not None
    if not track:
        return F.batch_norm(union, None, None, training=True, eps=layer.eps)
    stacked = [_all_clients(t, level, num_clients) for t in (layer.running_mean, layer.running_var)]
    # Every client holds the same running statistics in the synchronized step (all start from
    # the global model and add the same union statistics): update a copy of client 0's (not its
    # own: autograd keeps it), then give it to all.
    mean, var = (clients[0].clone() for clients in stacked)
    xhat = F.batch_norm(
        union,
        mean,
        var,
        training=True,
        momentum=layer.momentum,  # not None: batching_obstacle
        eps=layer.eps,
    )
    with torch.no_grad():
        for clients, new in zip(stacked, (mean, var), strict=True):
            clients.copy_(new.expand_as(clients))
    return xhat


def _samples_first(x: Tensor, level: int, num_clients: int) -> Tensor:
    """The physical tensor behind per-client ``x`` under vmap, as a contiguous
    ``(B, K, C, *spatial)`` tensor: a view of what vmap's convolutions leave (the samples
    outside the clients in memory), a copy otherwise."""
    physical, dim = torch._C._functorch._unwrap_batched(x, level)
    if dim is None:  # the same input for every client
        return physical.unsqueeze(1).expand(-1, num_clients, *physical.shape[1:]).contiguous()
    return (physical if dim == 1 else physical.movedim(dim, 1)).contiguous()


def _all_clients(t: Tensor, level: int, num_clients: int) -> Tensor:
    """The physical tensor behind per-client ``t`` under vmap (at ``level``), the clients in
    dimension 0 (a view)."""
    physical, dim = torch._C._functorch._unwrap_batched(t, level)
    if dim is None:  # the same tensor for every client
        return physical.unsqueeze(0).expand(num_clients, *physical.shape)
    return physical if dim == 0 else physical.movedim(dim, 0)


class _BatchedBatchNorm:
    """Adds the union-batch training step to a torch BatchNorm class, for use under vmap."""

    union_of: int = 0  # K while the layer normalizes over the union of K clients' batches

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not self.union_of:
            return super().forward(input)
        self._check_input_dim(input)
        return _union_batch_norm(self, input, self.union_of)


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
# is large: bench_round.py (ResNet-20, 5 clients, one torch thread, wall time per round against
# a centralized step, 2026-12-02) measured batched 1.48x / threads 1.69x at 8 samples per
# client, and batched 1.53x / threads 1.02x at 32 (1.42x / 0.90x at 128): the crossover lies
# between 8 and 32, and this splits it.
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


class _ClientStacks:
    """The K clients' parameters and buffers, kept from round to round.

    Tensor ``name`` of client k is ``tensors[name][k]``. Each stacked tensor is contiguous:
    vmap's rules update a non-contiguous stacked buffer (BN's running statistics) in a copy that
    is then lost. A round loads the global model with one fused copy and averages each group of
    tensors (dtype, device) as one ``(K, N)`` matrix, instead of one operation per tensor and
    client. The trained parameters are leaves of autograd, stepped in place by the optimizer.
    """

    def __init__(self, model: nn.Module, num_clients: int) -> None:
        self.num_clients = num_clients
        sources = _named_tensors(model)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        self.tensors = {
            name: torch.empty(num_clients, *t.shape, dtype=t.dtype, device=t.device)
            for name, t in sources.items()
        }
        self.trained = [self.tensors[n].requires_grad_() for n in sources if n in trained]
        # Per group (dtype, device): its tensors' names, shapes, and each client's row of them.
        self._groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, t in sources.items():
            self._groups.setdefault((t.dtype, t.device), []).append(name)
        self._shapes = {name: t.shape for name, t in sources.items()}
        self._rows = [
            [self.tensors[n].view(num_clients, -1) for n in names]
            for names in self._groups.values()
        ]

    @torch.no_grad()
    def load(self, sources: dict[str, Tensor]) -> None:
        """Every client's tensors := ``sources`` (the model's current ones, by name)."""
        stacks = list(self.tensors.values())
        torch._foreach_copy_(stacks, [sources[n].expand_as(s) for n, s in self.tensors.items()])
        for t in self.trained:
            t.grad = None

    @torch.no_grad()
    def average(self, weights: Sequence[float], keys: dict[str, str]) -> dict[str, Tensor]:
        """The weighted average of the clients, as a ``state_dict`` (``keys``: each key's
        tensor name); its entries are views into one new buffer per group."""
        means: dict[str, Tensor] = {}
        for names, rows in zip(self._groups.values(), self._rows, strict=True):
            # Row k: client k's tensors of the group, one after the other (one copy).
            mean = weighted_row_mean(torch.cat(rows, dim=1).unbind(0), weights)
            sizes = [self._shapes[n].numel() for n in names]
            for name, chunk in zip(names, mean.split(sizes), strict=True):
                means[name] = chunk.view(self._shapes[name])
        return {key: means[name] for key, name in keys.items()}


class BatchedClients:
    """The batched engine for ``model``: a copy whose BN layers can normalize over the union
    batch, and the clients' stacked tensors. Made once per model and reused round after round;
    the copy's own tensors are never used (every call passes the stacked client tensors)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._build()

    def _build(self) -> None:
        self._network = copy.deepcopy(self.model)
        for layer in _batchnorm_layers(self._network):
            layer.__class__ = _batched_class(type(layer))
        self._union_layers: list[_BatchedBatchNorm] = _batchnorm_layers(self._network)  # type: ignore[assignment]
        self._layout = _layout(_named_tensors(self.model))
        self._keys = _state_names(self.model)
        self._aliases = _aliases(self.model)
        self._stacks: _ClientStacks | None = None

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
        # The model's tensors now: they may have been replaced since the last round.
        sources = _named_tensors(self.model)
        if _layout(sources) != self._layout:
            # Another device, dtype or shape: start again.
            self._build()
        num_clients = len(client_batches)
        if self._stacks is None or self._stacks.num_clients != num_clients:
            self._stacks = _ClientStacks(self.model, num_clients)
        stacks = self._stacks
        stacks.load(sources)  # every client starts from the global model
        # SGD is elementwise: one step over the stacks is K clients' steps. A fresh optimizer
        # per round, as every client makes; foreach: a few fused operations per step.
        optimizer = torch.optim.SGD(
            stacks.trained, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True
        )
        network = self._network.train()

        def client_loss(tensors: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            # Every name of every tensor given (_aliases): no search for tied tensors per call.
            return loss_fn(functional_call(network, tensors, (x,), tie_weights=False), y)

        # The inputs stacked with the samples outside the clients, the layout vmap's
        # convolutions work in: a view for them, not a copy.
        batched_loss = vmap(client_loss, in_dims=(0, 1, 1))
        tensors = {alias: stacks.tensors[name] for alias, name in self._aliases.items()}
        for step in range(len(client_batches[0])):
            inputs = torch.stack([batches[step][0] for batches in client_batches], dim=1)
            targets = torch.stack([batches[step][1] for batches in client_batches], dim=1)
            self._set_union(num_clients if step == 0 else 0)
            try:
                losses = batched_loss(tensors, inputs, targets)
            finally:
                self._set_union(0)
            optimizer.zero_grad(set_to_none=True)
            # Client k's gradient of the sum is its own loss's (its parameters reach the other
            # clients' losses only through the union statistics, as in FedTAN's backward).
            losses.sum().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        weights = [sum(len(targets) for _, targets in batches) for batches in client_batches]
        return stacks.average(weights, self._keys)

    def _set_union(self, num_clients: int) -> None:
        for layer in self._union_layers:
            layer.union_of = num_clients


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    # Non-persistent buffers too: the forward uses them.
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _state_names(model: nn.Module) -> dict[str, str]:
    """Each ``state_dict`` key with the name ``functional_call`` knows its tensor by (tied
    tensors appear under several keys but once among the named tensors)."""
    name_of = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return {key: name_of[id(t)] for key, t in model.state_dict(keep_vars=True).items()}


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter and buffer (a tied tensor has several), with the one name
    it has among the named tensors."""
    name_of = {id(t): n for n, t in _named_tensors(model).items()}
    return {
        alias: name_of[id(t)]
        for alias, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    }


def _layout(tensors: dict[str, Tensor]) -> list[tuple[str, torch.Size, torch.dtype, torch.device]]:
    return [(n, t.shape, t.dtype, t.device) for n, t in tensors.items()]


__all__ = ["BatchedClients", "batching_obstacle", "batching_pays_off"]
