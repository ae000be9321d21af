"""Transport "grpc", server side: one Flower train message per client and round.

The ServerApp owns a ``BNSyncService``; each attempt at a round it admits exactly the sampled
clients, each with a fresh credential that only travels inside Flower's own (authenticated)
train message. The clients then run their whole synced step over the service, their E-1 local
steps, and reply with their models as usual. The service knows who broke a round, so its
account decides who is at fault, not the Flower errors that merely echo it.

With run config ``rounds-per-message`` R > 1 the transport runs blocks of rounds instead
(``block.py``): one Flower message per available client starts R rounds, each of which is one
``RoundSync``: opening it publishes the round on the service, its ``averaged`` returns the
average of the clients' uploads. A block ends after its R-th round, with a failed round (the
strategy then retries from the last good model with a new block, without the culprits), with a
round opened ahead that is not wanted after all (``Transport.trains_ahead``), or with the run.

The server knows what a round allows before it starts: the layers and their shapes from one
traced step of the model (``trace_sync_shape``), each client's batch size from the round's
config. The service checks every contribution against that (``RoundSchedule``).

Security is all or nothing: TLS needs a certificate, its key and the CA certificate clients
verify it with (optionally a CA for client certificates: mutual TLS); a service bound to an
address beyond this machine without TLS is refused unless run config ``bn-sync-insecure-network``
says that network is trusted; clients are never told to dial a wildcard address.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from torch import Tensor, nn

from common.experiment.config import RunConfig
from common.fedtan.bn_channel import BNChannel, GradSums, Moments
from common.fedtan.bn_sync import convert_federated_batchnorm, synchronized
from common.protocol import (
    BN_SYNC_ADDRESS,
    BN_SYNC_BLOCK,
    BN_SYNC_BLOCK_WAIT,
    BN_SYNC_CREDENTIAL,
    BN_SYNC_PROTOCOL,
    BN_SYNC_ROOT_CERTIFICATES,
    BN_SYNC_ROUND,
    BN_SYNC_TIMEOUT,
    CONFIG_RECORD,
    MODEL_RECORD,
    TRAIN_FEDTAN_BLOCK,
    TrainSettings,
)
from common.state_records import record_to_state, state_to_record
from common.transports.averaging import average_updates
from common.transports.base import (
    FailureKind,
    RoundFailure,
    RoundPlan,
    RoundSync,
    Transport,
    preflight_plan,
)
from common.transports.exchange import exchange, receive
from common.transports.grpc.block import BlockProblem
from common.transports.grpc.service import (
    AbortKind,
    BNSyncService,
    LayerShape,
    Limits,
    RoundAbort,
    RoundSchedule,
    SyncShape,
)
from common.transports.grpc.wire import (
    StateSpec,
    block_request_size,
    encode_plan,
    encode_state,
    plan_size,
)

PREFLIGHT_ROUND = 0  # the service round of ``check``; training rounds are numbered from 1
PREFLIGHT_LAYER = "preflight"  # the one exchange of ``check``: one channel, one value
PREFLIGHT = RoundSchedule(SyncShape((PREFLIGHT_LAYER,), (), {PREFLIGHT_LAYER: LayerShape(1, 1)}), 1)

_SILENT_HINT = (
    " (all clients of a round must run at the same time; in a Ray simulation give it one "
    'actor per client, e.g. --federation-config "client-resources-num-cpus=1 '
    'init-args-num-cpus=K"; on a GPU node at most 1/K of a GPU per client, e.g. '
    "client-resources-num-gpus=0.2 for K = 5, so that all K clients run at once)"
)


class GrpcTransport(Transport):
    """The BN statistics travel over the ServerApp's BN sync service (started here).

    ``shape``: the exchanges of a step (``trace_sync_shape``). ``max_retries``: the strategy's,
    so that every attempt at a round has a service round id of its own (a late client of a
    failed attempt can never join the next one). ``state``: the model's state entries, what a
    client of a block uploads (needed when run config ``rounds-per-message`` > 1).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        shape: SyncShape,
        max_clients: int,
        max_retries: int,
        state: StateSpec = (),
    ) -> None:
        tls, self.root_certificates, client_ca = _tls_settings(cfg)
        _refuse_plaintext_beyond_this_machine(cfg, tls is not None)
        if not cfg.bn_sync_address:
            _dial_address(cfg.bn_sync_host, cfg.bn_sync_port)  # refuses a wildcard before binding
        self.shape = shape
        self.rounds_per_message = cfg.rounds_per_message
        if self.rounds_per_message > 1 and not state:
            raise ValueError("rounds-per-message > 1 needs the model's state entries (state)")
        self.state = state
        blocks = self.rounds_per_message > 1  # the service's size caps then fit a model state
        limits = Limits(
            max_channels=shape.max_channels,
            max_block_request=block_request_size(state) if blocks else 0,
            max_block_reply=plan_size(state) if blocks else 0,
        )
        self.block: GrpcBlock | None = None  # the open block of rounds, if any
        self.service = BNSyncService(
            cfg.bn_sync_host,
            cfg.bn_sync_port,
            tls=tls,
            client_ca=client_ca,
            timeout=cfg.bn_sync_timeout,
            max_clients=max_clients,
            limits=limits,
            protocol=cfg.bn_sync_protocol,
        )
        port = self.service.start()
        self.address = cfg.bn_sync_address or _dial_address(cfg.bn_sync_host, port)
        self.client_timeout = cfg.bn_sync_timeout * 2  # the service, which names culprits, first
        self.attempts_per_round = max_retries + 1
        log(
            INFO,
            "BN sync service listening on %s:%d (%s) with %s; clients dial %s",
            cfg.bn_sync_host,
            port,
            cfg.bn_sync_protocol,
            self.service.security,
            self.address,
        )

    def open_round(self, grid: Grid, plan: RoundPlan) -> RoundSync:
        round_id = plan.server_round * self.attempts_per_round + plan.attempt
        batch = TrainSettings.from_config(plan.config).batch_size
        schedule = RoundSchedule(self.shape, batch)
        if self.rounds_per_message == 1:
            return GrpcRound(self, round_id, plan, schedule)
        if self.block is None or not self.block.continues(plan):
            self.end_block("a new block starts")
            self.block = GrpcBlock(self, grid, plan, block_id=round_id)
        return BlockRound(self.block, round_id, plan, schedule)

    def trains_ahead(self) -> bool:
        return self.rounds_per_message > 1  # a block's round is published when it is opened

    def reachable_nodes(self) -> Sequence[int] | None:
        # Asking Flower is a round trip to the SuperLink deployed, and its CPU there and here
        # slows the round being trained; the block's members are there until it ends.
        block = self.block
        if block is None or block.rounds >= self.rounds_per_message:
            return None
        return block.members

    def end_block(self, reason: str, culprits: frozenset[int] = frozenset()) -> None:
        """End the open block, if any; its clients' Flower replies are collected and dropped
        (but the ``culprits``', which may never come)."""
        block, self.block = self.block, None
        if block is not None:
            block.end(reason, culprits)

    def check(self, grid: Grid, nodes: Sequence[int], timeout: float) -> None:
        """Before round 1: ``nodes`` join the service together once, or the run stops here.

        Catches at start what would otherwise fail every round: clients that cannot run at the
        same time (too few Ray actors), an address they cannot reach, a certificate they reject.
        """
        plan = preflight_plan(nodes, timeout)
        sync = GrpcRound(self, PREFLIGHT_ROUND, plan, PREFLIGHT)
        try:
            exchange(grid, sync.train_messages(), timeout=timeout)
            sync.finish()
        except RoundFailure as failure:  # the service's account names a client that never came
            problem = sync.abort(failure)
            raise RuntimeError(
                f"the BN sync channel check before round 1 failed: {problem}"
            ) from None

    def close(self) -> None:
        try:
            self.end_block("the run ended")
        finally:
            self.service.stop()


class GrpcRound(RoundSync):
    """One service round: opened here, closed by ``finish`` or ``abort``."""

    def __init__(
        self, transport: GrpcTransport, round_id: int, plan: RoundPlan, schedule: RoundSchedule
    ) -> None:
        self.transport = transport
        self.round_id = round_id
        self.plan = plan
        nodes = [str(n) for n in plan.nodes]
        self.credentials = transport.service.open_round(round_id, nodes, schedule)
        self.closed = False

    def train_messages(self) -> list[Message]:
        plan, transport = self.plan, self.transport
        return [
            Message(
                RecordDict(
                    {
                        MODEL_RECORD: plan.arrays,
                        CONFIG_RECORD: ConfigRecord(
                            {
                                **plan.config,
                                BN_SYNC_ADDRESS: transport.address,
                                BN_SYNC_PROTOCOL: transport.service.protocol,
                                BN_SYNC_ROUND: self.round_id,
                                BN_SYNC_CREDENTIAL: self.credentials[str(node)],
                                BN_SYNC_ROOT_CERTIFICATES: transport.root_certificates,
                                BN_SYNC_TIMEOUT: transport.client_timeout,
                            }
                        ),
                    }
                ),
                dst_node_id=node,
                message_type=plan.message_type,
                group_id=plan.group_id,
            )
            for node in plan.nodes
        ]

    def finish(self) -> None:
        """Close the service round; raise if the service aborted it."""
        if (abort := self._close()) is not None:
            raise _failure(abort)

    def abort(self, failure: RoundFailure) -> RoundFailure:
        """Close the service round; if the service aborted it, its account names the culprits
        (the other clients' Flower errors only echo the abort)."""
        abort = self._close()
        return failure if abort is None else _failure(abort)

    def _close(self) -> RoundAbort | None:
        if self.closed:
            return None
        self.closed = True
        return self.transport.service.close_round(self.round_id)


class GrpcBlock:
    """An open block of rounds: the service's ``Block`` and the Flower messages that started it
    (one per member, for up to R rounds)."""

    def __init__(self, transport: GrpcTransport, grid: Grid, plan: RoundPlan, block_id: int):
        self.transport, self.grid, self.id = transport, grid, block_id
        # Every node the run may use, sampled for this round or not.
        self.members = sorted((set(grid.get_node_ids()) - plan.excluded) | set(plan.nodes))
        settings = TrainSettings.from_config(plan.config)
        self.settings = dataclasses.replace(settings, lr=0.0)  # all but lr hold for the block
        self.rounds, self.next_round, self.timeout = 0, plan.server_round, plan.timeout
        # The ArrayRecord the block's last round returned, and the state it was made from: the
        # strategy hands it back as the next round's model, which then need not be decoded.
        self._last_average: tuple[ArrayRecord, dict[str, torch.Tensor]] | None = None
        self.block, credentials = transport.service.open_block(
            block_id,
            [str(node) for node in self.members],
            transport.state,
            max_examples=settings.batch_size * settings.local_steps,
        )
        messages = [
            Message(
                RecordDict(
                    {
                        CONFIG_RECORD: ConfigRecord(
                            {
                                **plan.config,
                                BN_SYNC_ADDRESS: transport.address,
                                BN_SYNC_PROTOCOL: transport.service.protocol,
                                BN_SYNC_BLOCK: block_id,
                                BN_SYNC_CREDENTIAL: credentials[str(node)],
                                BN_SYNC_ROOT_CERTIFICATES: transport.root_certificates,
                                BN_SYNC_TIMEOUT: transport.client_timeout,
                                BN_SYNC_BLOCK_WAIT: plan.timeout,
                            }
                        )
                    }
                ),
                dst_node_id=node,
                message_type=TRAIN_FEDTAN_BLOCK,
                group_id=f"{plan.group_id}-block-{block_id}",
            )
            for node in self.members
        ]
        # Pushed, not waited for: the replies come when the block ends.
        self.message_ids = dict(zip(grid.push_messages(messages), self.members, strict=True))
        if plan.traffic is not None:
            plan.traffic.round_trips += 1  # the round that opens a block pays its Flower message
        log(
            INFO,
            "Block %d: %d clients, up to %d rounds",
            block_id,
            len(self.members),
            transport.rounds_per_message,
        )

    def continues(self, plan: RoundPlan) -> bool:
        """Whether ``plan`` is this block's next round."""
        return (
            self.rounds < self.transport.rounds_per_message
            and plan.server_round == self.next_round
            and set(plan.nodes) <= set(self.members)
            and dataclasses.replace(TrainSettings.from_config(plan.config), lr=0.0) == self.settings
        )

    def start_round(self, plan: RoundPlan, round_id: int, schedule: RoundSchedule) -> int:
        """Publish round ``plan`` to the members: the sampled ones start training it. Returns the
        size of the model it sends each member."""
        seq, self.rounds, self.next_round = self.rounds, self.rounds + 1, plan.server_round + 1
        sampled = [str(node) for node in plan.nodes]
        credentials = self.transport.service.open_round(round_id, sampled, schedule)
        state = encode_state(self._state_of(plan.arrays))
        lr = TrainSettings.from_config(plan.config).lr
        plans = {
            member: encode_plan(
                seq,
                plan.server_round,
                lr,
                round_id if member in credentials else None,
                credentials.get(member, ""),
                state,
            )
            for member in (str(node) for node in self.members)
        }
        self.block.publish(seq, sampled, plans)
        return len(state)

    def finish_round(
        self, plan: RoundPlan, round_id: int, state_size: int
    ) -> tuple[ArrayRecord, MetricRecord]:
        """The published round ``plan``: its uploads collected and averaged; the block ends
        after its last round or a failed one."""
        service = self.transport.service
        try:
            try:
                updates = self.block.collect(plan.timeout)
            except BlockProblem as problem:
                # The BN sync round's account first: the others' give-ups only echo its abort.
                abort = service.close_round(round_id)
                raise (_failure(abort) if abort is not None else _block_failure(problem)) from None
            if (abort := service.close_round(round_id)) is not None:
                raise _failure(abort)
            with _one_torch_thread():
                averaged, metrics = average_updates(updates)
        except RoundFailure as failure:
            self.transport.end_block(f"round {plan.server_round} failed", failure.culprits)
            raise
        if plan.traffic is not None:  # the model down to every member, and up from the sampled
            plan.traffic.model_bytes += state_size * (len(self.members) + len(updates))
        if self.rounds == self.transport.rounds_per_message:
            self.transport.end_block("the block's last round is done")
        arrays = state_to_record(averaged)
        self._last_average = (arrays, averaged)
        return arrays, MetricRecord(metrics)

    def abandon(self, round_id: int, reason: str) -> None:
        """End the block in the middle of its published round ``round_id``, whose result is
        not wanted (the round before it failed after all)."""
        service = self.transport.service
        service.end_block(self.id, reason)  # a member asking for a plan is told at once
        service.close_round(round_id)  # members inside the round's BN exchanges are released
        if self.transport.block is self:
            self.transport.end_block(reason)  # the members' Flower replies are collected

    def _state_of(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """``arrays`` as tensors: the block's own last average needs no decoding."""
        if self._last_average is not None and self._last_average[0] is arrays:
            return self._last_average[1]
        return record_to_state(arrays)

    def end(self, reason: str, culprits: frozenset[int] = frozenset()) -> None:
        """Tell the members the block ended; collect their Flower replies (not the culprits')."""
        service = self.transport.service
        service.end_block(self.id, reason)
        wanted = {i for i, node in self.message_ids.items() if node not in culprits}
        try:
            replies = receive(self.grid, wanted, timeout=self.timeout)
        finally:
            service.forget_block(self.id)  # a member's late call is refused from now on
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        silent = sorted(self.message_ids[i] for i in wanted - answered)
        failed = sorted(
            f"{r.metadata.src_node_id} ({r.error.reason})" for r in replies if r.has_error()
        )
        if silent or failed:
            log(
                WARNING,
                "Block %d (%s): no reply from nodes %s, errors from nodes %s",
                self.id,
                reason,
                silent,
                failed,
            )


class BlockRound(RoundSync):
    """One round of an open block, published to its members when opened: no train messages;
    ``averaged`` collects and averages the uploads."""

    def __init__(
        self, block: GrpcBlock, round_id: int, plan: RoundPlan, schedule: RoundSchedule
    ) -> None:
        self.block, self.round_id, self.plan = block, round_id, plan
        self.state_size = block.start_round(plan, round_id, schedule)
        self.collected = False

    def train_messages(self) -> list[Message]:
        return []

    def averaged(self) -> tuple[ArrayRecord, MetricRecord]:
        self.collected = True
        return self.block.finish_round(self.plan, self.round_id, self.state_size)

    def abort(self, failure: RoundFailure) -> RoundFailure:
        if not self.collected:  # opened ahead, and not wanted after all
            self.collected = True
            self.block.abandon(
                self.round_id,
                f"round {self.plan.server_round}, opened ahead, was abandoned: {failure}",
            )
        return failure


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch on one thread meanwhile: averaging a few small states is a few dozen tiny
    operations, each of which costs milliseconds with intra-op threads on a loaded machine (in a
    simulation the clients are that load) and microseconds without. Elementwise, so the bits
    are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_failure(problem: BlockProblem) -> RoundFailure:
    culprits = {int(client) for client in problem.culprits}
    kind = FailureKind.BAD_REPLY if problem.bad_state else FailureKind.EXCHANGE
    reasons = {int(client): why for client, why in problem.culprits.items()}
    return RoundFailure(f"block round failed: {problem}", kind, culprits, reasons)


def _failure(abort: RoundAbort) -> RoundFailure:
    hint = _SILENT_HINT if abort.kind is AbortKind.SILENT else ""
    culprits = {int(client) for client in abort.culprits}
    return RoundFailure(
        f"BN sync round aborted ({abort.kind.value}): {abort.message}{hint}",
        FailureKind.SYNC_ABORTED,
        culprits,
        {node: abort.kind.value for node in culprits},
    )


def trace_sync_shape(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable[..., Tensor]
) -> SyncShape:
    """The exchanges of one synced step of ``model``, from one step on a copy as one client:
    the layers in order, their channels and values per sample, the statistics' dtype."""
    tracer = _ShapeTracer(len(inputs))
    traced = convert_federated_batchnorm(copy.deepcopy(model)).train()
    with synchronized(traced, tracer):
        loss_fn(traced(inputs), targets).backward()
    limit = float(torch.finfo(tracer.dtype).max)
    return SyncShape(tuple(tracer.forward), tuple(tracer.backward), tracer.layers, limit)


class _ShapeTracer(BNChannel):
    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.forward: list[str] = []
        self.backward: list[str] = []
        self.layers: dict[str, LayerShape] = {}
        self.dtype = torch.float64

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        self.forward.append(layer)
        self.layers[layer] = LayerShape(len(local.mean), local.count // self.batch)
        self.dtype = local.mean.dtype  # the statistics' dtype: float32 at least (bn_sync)
        return local

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        self.backward.append(layer)
        return local


def _tls_settings(cfg: RunConfig) -> tuple[tuple[bytes, bytes] | None, str, bytes | None]:
    """(server certificate chain and key, CA certificate for the clients, CA of the clients'
    certificates) from run config; all or nothing, each file readable, or ``ValueError``."""
    files = {
        "bn-sync-certfile": cfg.bn_sync_certfile,
        "bn-sync-keyfile": cfg.bn_sync_keyfile,
        "bn-sync-ca-certfile": cfg.bn_sync_ca_certfile,
    }
    given = [key for key, path in files.items() if path]
    if given and len(given) != len(files):
        missing = [key for key in files if key not in given]
        raise ValueError(
            f"run config: TLS for the BN sync service needs {', '.join(files)} together; "
            f"{', '.join(missing)} missing (clients would otherwise dial in plaintext)"
        )
    if cfg.bn_sync_client_ca_certfile and not given:
        raise ValueError(
            "run config 'bn-sync-client-ca-certfile' (mutual TLS) needs TLS: set "
            "'bn-sync-certfile', 'bn-sync-keyfile' and 'bn-sync-ca-certfile' too"
        )
    if not given:
        return None, "", None
    read = {key: _read(key, path) for key, path in files.items()}
    client_ca = (
        _read("bn-sync-client-ca-certfile", cfg.bn_sync_client_ca_certfile)
        if cfg.bn_sync_client_ca_certfile
        else None
    )
    root = read["bn-sync-ca-certfile"]
    if b"BEGIN CERTIFICATE" not in root:
        raise ValueError(f"run config 'bn-sync-ca-certfile': {cfg.bn_sync_ca_certfile} is not PEM")
    tls = (read["bn-sync-certfile"], read["bn-sync-keyfile"])
    return tls, root.decode("ascii", errors="replace"), client_ca


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"run config '{key}': cannot read {path}: {error.strerror}") from None


def _refuse_plaintext_beyond_this_machine(cfg: RunConfig, tls: bool) -> None:
    """Credentials and statistics must not cross a network in the clear unless told to."""
    if tls or cfg.bn_sync_insecure_network or _is_loopback(cfg.bn_sync_host):
        return
    raise ValueError(
        f"run config 'bn-sync-host' = {cfg.bn_sync_host!r} is reachable from other machines, "
        "and the BN sync service has no TLS: set 'bn-sync-certfile', 'bn-sync-keyfile' and "
        "'bn-sync-ca-certfile', or 'bn-sync-insecure-network' = true if that network is trusted"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _dial_address(host: str, port: int) -> str:
    """What clients dial when run config does not say: the bound address, but never a
    wildcard (0.0.0.0 or ::), which names no machine to dial."""
    bare = host.strip("[]")
    try:
        wildcard = ipaddress.ip_address(bare).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        raise ValueError(
            f"run config 'bn-sync-host' = {host!r} binds every interface: set 'bn-sync-address' "
            "to the host:port clients dial (e.g. the server's public name and this port)"
        )
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
