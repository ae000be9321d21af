"""One FedTAN round: the client's local work, and the in-process engine that runs K of them.

A round: every client starts from the global model; its first local step is synchronized (its BN
layers act as one BN over the union of all clients' batches, through a ``BNChannel``); steps
2..E are plain local steps; then the server averages the clients' full model states, weighted by
the number of samples each trained on.

``synced_round`` runs the K clients batched, as one vmapped computation (``batched.py``), when the
round allows it (equal client batch sizes, float32/64, no autocast) and it is the faster engine
(on an accelerator; on the CPU for small batches), and otherwise as threads of this process over
an ``InProcessHub``. Both give the same model; with one batch per client it
equals one step of ``torch.optim.SGD`` on the concatenated batches. Pass it a ``ClientReplicas``
to run many rounds: the client models are then made once, instead of once per round.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from common.fedtan.aggregation import average_states
from common.fedtan.batched import BatchedClients, batching_obstacle, batching_pays_off
from common.fedtan.bn_channel import BNChannel, BNSyncError
from common.fedtan.bn_sync import convert_federated_batchnorm, has_batchnorm, synchronized
from common.fedtan.inprocess import InProcessHub

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def train_client(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    channel: BNChannel | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """A client's local work in one round; returns the loss of each step.

    ``autocast_dtype``: the forward pass and the loss run under ``torch.autocast`` to it
    (bfloat16, float16); the backward and the optimizer step run outside, as torch advises.

    ``model`` must already have federated BN layers when ``channel`` is given: the first step
    synchronizes through it, the others are plain local steps. A fresh SGD optimizer per round,
    as in the reference implementation.
    """
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    # Kept as tensors: reading each one (.item()) would wait for the device at every step.
    losses: list[Tensor] = []
    for step, (inputs, targets) in enumerate(batches):
        sync = synchronized(model, channel) if step == 0 and channel is not None else nullcontext()
        with sync:
            with torch.autocast(
                inputs.device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            # Run this backward in the calling thread: on CUDA, autograd's shared device thread
            # would otherwise block in one client's BN sync while the others wait for it.
            with torch.autograd.set_multithreading_enabled(False):
                loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


class ClientReplicas:
    """The K client models of a run of in-process rounds, made once and reloaded every round.

    Each replica is a deep copy of ``model`` with federated BN layers. ``for_round`` overwrites
    every replica's parameters and buffers with ``model``'s current ones in one fused copy, so a
    round starts from the global model as with fresh copies, without building K models.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._replicas: list[nn.Module] = []
        self._tensors: list[dict[str, Tensor]] = []  # each replica's parameters and buffers
        self._states: list[dict[str, Tensor]] = []  # live views of each replica's state
        self._batched: BatchedClients | None = None

    def batched(self) -> BatchedClients:
        """The batched engine's structure for ``model``, made on first use."""
        if self._batched is None:
            self._batched = BatchedClients(self.model)
        return self._batched

    def for_round(self, num_clients: int) -> list[tuple[nn.Module, dict[str, Tensor]]]:
        """``num_clients`` replicas, each loaded with ``model``'s state, with their state dicts."""
        source = _parameters_and_buffers(self.model)
        if self._tensors and not _same_layout(source, self._tensors[0]):
            # The model's tensors changed (another device, dtype or shape): start again.
            self._replicas, self._tensors, self._states = [], [], []
        while len(self._replicas) < num_clients:
            replica = convert_federated_batchnorm(copy.deepcopy(self.model))
            self._replicas.append(replica)
            self._tensors.append(_parameters_and_buffers(replica))
            self._states.append(replica.state_dict())
        with torch.no_grad():
            targets = [t for tensors in self._tensors[:num_clients] for t in tensors.values()]
            torch._foreach_copy_(targets, list(source.values()) * num_clients)
        return list(zip(self._replicas[:num_clients], self._states[:num_clients], strict=True))


def _parameters_and_buffers(model: nn.Module) -> dict[str, Tensor]:
    # Non-persistent buffers too: a fresh copy would have them.
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _same_layout(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return list(a) == list(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
        for x, y in zip(a.values(), b.values(), strict=True)
    )


def synced_round(
    model: nn.Module,
    client_batches: Sequence[Sequence[Batch]],
    loss_fn: LossFn,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    *,
    allow_no_batchnorm: bool = False,
    timeout: float | None = 300.0,
    replicas: ClientReplicas | None = None,
    batched: bool | None = None,
) -> dict[str, Tensor]:
    """One FedTAN round with K in-process clients; returns the new global ``state_dict``.

    ``client_batches[k]`` lists the ``(inputs, targets)`` batches client k trains on this round
    (one per local step). ``loss_fn`` must average over the samples of a batch. ``model`` is not
    modified. A model without BatchNorm layers is refused unless ``allow_no_batchnorm``, in which
    case the round is plain federated averaging. ``replicas`` (made from this ``model``) keeps the
    client models between rounds; without it the round makes fresh ones.

    ``batched``: None runs the clients batched when ``batching_obstacle`` allows it and
    ``batching_pays_off`` (on an accelerator; on the CPU for small batches), and as threads
    otherwise (also when the batched round fails or gives non-finite values, so
    that the threaded engine's checks name the client and layer at fault); True insists on it
    (ValueError naming the obstacle); False always uses threads.
    """
    check_client_batches(client_batches)
    _check_mean_reduction(loss_fn)
    if not has_batchnorm(model) and not allow_no_batchnorm:
        raise ValueError(
            "the model has no BatchNorm layers, so FedTAN has nothing to "
            "synchronize; pass allow_no_batchnorm=True to run plain FedAvg"
        )

    if replicas is not None and replicas.model is not model:
        raise ValueError("replicas were made from another model than the one given")
    if batched is not False:
        state = _batched_round(
            model, client_batches, loss_fn, lr, momentum, weight_decay, batched, replicas
        )
        if state is not None:
            return state
    if replicas is None:
        replicas = ClientReplicas(model)
    clients, states = zip(*replicas.for_round(len(client_batches)), strict=True)
    hub = InProcessHub(len(clients), timeout=timeout) if has_batchnorm(model) else None
    errors: list[BaseException | None] = [None] * len(clients)

    def run(rank: int) -> None:
        try:
            train_client(
                clients[rank],
                client_batches[rank],
                loss_fn,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                channel=hub.channel(rank) if hub is not None else None,
            )
        except BaseException as error:  # noqa: BLE001 - re-raised below, after all threads end
            errors[rank] = error
            if hub is not None:
                hub.abort(error)

    threads = [
        threading.Thread(target=run, args=(k,), name=f"fedtan-client-{k}")
        for k in range(len(clients))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if hub is not None:
        # The values exchanged, checked once for the whole round: an unusable contribution is
        # the cause of whatever else failed after it, named by client and layer.
        hub.verify()
    # Raise the cause, not its echoes: a client released by another's failure holds a
    # BNSyncError whose __cause__ is that failure. A failed exchange is re-raised as the
    # BNSyncError it is (it names the client and layer at fault).
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        echoes = {id(e) for _, e in failed if any(e.__cause__ is other for _, other in failed)}
        rank, error = next((r, e) for r, e in failed if id(e) not in echoes)
        if isinstance(error, BNSyncError):
            raise error
        raise RuntimeError(f"client {rank} failed: {error}") from error

    weights = [sum(len(targets) for _, targets in batches) for batches in client_batches]
    return average_states(states, weights)


def _batched_round(
    model: nn.Module,
    client_batches: Sequence[Sequence[Batch]],
    loss_fn: LossFn,
    lr: float,
    momentum: float,
    weight_decay: float,
    required: bool | None,
    replicas: ClientReplicas | None,
) -> dict[str, Tensor] | None:
    """The round run batched, or None where the threaded engine must run it."""
    if required is None and not batching_pays_off(client_batches):
        return None
    obstacle = batching_obstacle(model, client_batches)
    if obstacle is not None:
        if required:
            raise ValueError(f"this round cannot run batched: {obstacle}")
        return None
    engine = replicas.batched() if replicas is not None else BatchedClients(model)
    sgd = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    if required:
        return engine.round(client_batches, loss_fn, **sgd)
    try:
        state = engine.round(client_batches, loss_fn, **sgd)
    except Exception as error:  # noqa: BLE001 - the threaded engine reruns it and names a fault
        warnings.warn(
            f"the batched engine failed ({type(error).__name__}: {error}); "
            "running the clients as threads",
            stacklevel=3,
        )
        return None
    floats = [v.reshape(-1) for v in state.values() if v.is_floating_point()]
    # One check over all entries (one copy), and one read of the device.
    if floats and not bool(torch.cat(floats).isfinite().all()):
        return None
    return state


def check_client_batches(client_batches: Sequence[Sequence[Batch]]) -> None:
    """Refuse a round that cannot be synchronized, naming the client at fault."""
    if len(client_batches) == 0:
        raise ValueError("no clients: client_batches is empty")
    first_shape = None
    for k, batches in enumerate(client_batches):
        if len(batches) == 0:
            raise ValueError(f"client {k} has no batches (it needs at least the synced step)")
        for step, (inputs, targets) in enumerate(batches):
            if len(inputs) == 0:
                raise ValueError(f"client {k}, step {step}: empty batch")
            if len(inputs) != len(targets):
                raise ValueError(
                    f"client {k}, step {step}: {len(inputs)} inputs but {len(targets)} targets"
                )
        shape = tuple(batches[0][0].shape[1:])
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape:
            raise ValueError(
                f"client {k}: input shape {shape} differs from client 0's "
                f"{first_shape}; the synced step needs one shape for all clients"
            )


def _check_mean_reduction(loss_fn: LossFn) -> None:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise ValueError(
            f"loss_fn must average over the batch (reduction='mean'), got reduction={reduction!r}"
        )
