"""The synced step over the BN sync service: one Flower train message per client and round.

The ServerApp owns a ``BNSyncService``; each round it admits exactly the sampled clients, each
with a fresh credential that only travels inside Flower's own (authenticated) train message.
The clients then run their whole synced step over the service, their E-1 local steps, and reply
with their models as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.experiment.config import RunConfig
from common.transports.exchange import MODEL_KEY, RoundFailure, exchange
from common.transports.grpc.service import BNSyncService

PREFLIGHT_ROUND = 0  # rounds are numbered from 1


class GrpcSync:
    """Opens one service round per training attempt and turns its failure into RoundFailure."""

    def __init__(self, cfg: RunConfig, max_clients: int) -> None:
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
        self.round_id: int | None = None

    def train_messages(
        self,
        round_id: int,
        nodes: Sequence[int],
        arrays: ArrayRecord,
        config: ConfigRecord,
        group_id: str,
        message_type: str = "train.fedtan",
    ) -> list[Message]:
        self.round_id = round_id
        credentials = self.service.open_round(round_id, [str(node) for node in nodes])
        return [
            Message(
                RecordDict(
                    {
                        MODEL_KEY: arrays,
                        "config": ConfigRecord(
                            {
                                **config,
                                "bn-sync-address": self.address,
                                "bn-sync-round": round_id,
                                "bn-sync-credential": credentials[str(node)],
                                "bn-sync-root-certificates": self.root_certificates,
                                "bn-sync-timeout": self.client_timeout,
                            }
                        ),
                    }
                ),
                dst_node_id=node,
                message_type=message_type,
                group_id=group_id,
            )
            for node in nodes
        ]

    def finish_round(self) -> None:
        """Close the attempt's service round; raise if the service aborted it."""
        if self.round_id is None:
            return
        round_id, self.round_id = self.round_id, None
        failure = self.service.close_round(round_id)
        if failure is not None:
            if "sent nothing" in failure:
                failure += (
                    " (all clients of a round must run at the same time; in a Ray "
                    "simulation give it one actor per client, e.g. --federation-config "
                    '"client-resources-num-cpus=1 init-args-num-cpus=K")'
                )
            raise RoundFailure(f"BN sync round aborted: {failure}")

    def preflight(self, grid: Grid, nodes: Sequence[int], timeout: float) -> None:
        """Before round 1: ``nodes`` join the service together once, or the run stops here.

        Catches at start what would otherwise fail every round: clients that cannot run at the
        same time (too few Ray actors), an address they cannot reach, a certificate they reject.
        """
        messages = self.train_messages(
            PREFLIGHT_ROUND,
            nodes,
            ArrayRecord(),
            ConfigRecord(),
            "fedtan-bn-sync-preflight",
            "query.bn_sync_preflight",
        )
        problem = None
        try:
            exchange(grid, messages, timeout=timeout)
        except RoundFailure as failure:
            problem = str(failure)
        try:
            self.finish_round()
        except RoundFailure as failure:  # the service's account names a client that never came
            problem = str(failure)
        if problem is not None:
            raise RuntimeError(f"the BN sync channel check before round 1 failed: {problem}")

    def stop(self) -> None:
        self.service.stop()
