"""Transport "grpc", server side: one Flower train message per client and round.

The ServerApp owns a ``BNSyncService``; each attempt at a round it admits exactly the sampled
clients, each with a fresh credential that only travels inside Flower's own (authenticated)
train message. The clients then run their whole synced step over the service, their E-1 local
steps, and reply with their models as usual. The service knows who broke a round, so its
account decides who is at fault, not the Flower errors that merely echo it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.experiment.config import RunConfig
from common.protocol import (
    BN_SYNC_ADDRESS,
    BN_SYNC_CREDENTIAL,
    BN_SYNC_ROOT_CERTIFICATES,
    BN_SYNC_ROUND,
    BN_SYNC_TIMEOUT,
    CONFIG_RECORD,
    MODEL_RECORD,
    QUERY_BN_SYNC_PREFLIGHT,
)
from common.transports.base import FailureKind, RoundFailure, RoundPlan, RoundSync, Transport
from common.transports.exchange import exchange
from common.transports.grpc.service import AbortKind, BNSyncService, RoundAbort

PREFLIGHT_ROUND = 0  # the service round of ``check``; training rounds are numbered from 1

_SILENT_HINT = (
    " (all clients of a round must run at the same time; in a Ray simulation give it one "
    'actor per client, e.g. --federation-config "client-resources-num-cpus=1 '
    'init-args-num-cpus=K"; on a GPU node at most 1/K of a GPU per client, e.g. '
    "client-resources-num-gpus=0.2 for K = 5, so that all K clients run at once)"
)


class GrpcTransport(Transport):
    """The BN statistics travel over the ServerApp's BN sync service (started here).

    ``max_retries``: the strategy's, so that every attempt at a round has a service round id
    of its own (a late client of a failed attempt can never join the next one).
    """

    def __init__(self, cfg: RunConfig, *, max_clients: int, max_retries: int) -> None:
        tls = None
        if cfg.bn_sync_certfile:
            tls = (Path(cfg.bn_sync_certfile).read_bytes(), Path(cfg.bn_sync_keyfile).read_bytes())
        self.root_certificates = (
            Path(cfg.bn_sync_ca_certfile).read_text() if cfg.bn_sync_ca_certfile else ""
        )
        self.service = BNSyncService(
            cfg.bn_sync_host,
            cfg.bn_sync_port,
            tls=tls,
            timeout=cfg.bn_sync_timeout,
            max_clients=max_clients,
        )
        port = self.service.start()
        self.address = cfg.bn_sync_address or f"{cfg.bn_sync_host}:{port}"
        self.client_timeout = cfg.bn_sync_timeout * 2  # the service, which names culprits, first
        self.attempts_per_round = max_retries + 1

    def open_round(self, grid: Grid, plan: RoundPlan) -> GrpcRound:
        round_id = plan.server_round * self.attempts_per_round + plan.attempt
        return GrpcRound(self, round_id, plan)

    def check(self, grid: Grid, nodes: Sequence[int], timeout: float) -> None:
        """Before round 1: ``nodes`` join the service together once, or the run stops here.

        Catches at start what would otherwise fail every round: clients that cannot run at the
        same time (too few Ray actors), an address they cannot reach, a certificate they reject.
        """
        plan = RoundPlan(
            server_round=PREFLIGHT_ROUND,
            attempt=0,
            nodes=nodes,
            arrays=ArrayRecord(),
            config=ConfigRecord(),
            message_type=QUERY_BN_SYNC_PREFLIGHT,
            group_id="fedtan-bn-sync-preflight",
            timeout=timeout,
        )
        sync = GrpcRound(self, PREFLIGHT_ROUND, plan)
        try:
            exchange(grid, sync.train_messages(), timeout=timeout)
            sync.finish()
        except RoundFailure as failure:  # the service's account names a client that never came
            problem = sync.abort(failure)
            raise RuntimeError(
                f"the BN sync channel check before round 1 failed: {problem}"
            ) from None

    def close(self) -> None:
        self.service.stop()


class GrpcRound(RoundSync):
    """One service round: opened here, closed by ``finish`` or ``abort``."""

    def __init__(self, transport: GrpcTransport, round_id: int, plan: RoundPlan) -> None:
        self.transport = transport
        self.round_id = round_id
        self.plan = plan
        self.credentials = transport.service.open_round(round_id, [str(n) for n in plan.nodes])
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


def _failure(abort: RoundAbort) -> RoundFailure:
    hint = _SILENT_HINT if abort.kind is AbortKind.SILENT else ""
    culprits = {int(client) for client in abort.culprits}
    return RoundFailure(
        f"BN sync round aborted ({abort.kind.value}): {abort.message}{hint}",
        FailureKind.SYNC_ABORTED,
        culprits,
        {node: abort.kind.value for node in culprits},
    )
