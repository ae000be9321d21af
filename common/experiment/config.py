"""The experiment's settings: Flower run config (kebab-case keys) parsed into one typed object.

The defaults here are the app's, ``pyproject.toml``'s ``[tool.flwr.app.config]`` (a test holds
them equal); ``configs/*.toml`` hold ready experiments. A wrong key or value fails at start
with a message that names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common import transports
from common.experiment import data, device, methods, models, partition
from common.protocol import BN_SYNC_PROTOCOLS

# Each key's choices, from the module that defines them.
CHOICES = {
    "method": tuple(methods.METHODS),
    "transport": transports.NAMES,
    "dataset": data.DATASET_NAMES,
    "partition": partition.SCHEMES,
    "model": models.MODEL_NAMES,
    "norm": models.NORMS,
    "on-failure": ("retry", "stop"),  # RoundStrategy's on_failure
    "precision": tuple(device.PRECISIONS),
    "bn-sync-protocol": BN_SYNC_PROTOCOLS,
}


@dataclass(frozen=True)
class RunConfig:
    method: str = "fedtan"
    transport: str = "messages"  # how the BN statistics travel during the synced step
    dataset: str = "digits"
    data_dir: str = "data"
    partition: str = "sorted"
    dirichlet_alpha: float = 0.5
    num_clients: int = 5  # nodes the server waits for before the first round
    clients_per_round: int = 0  # 0: every connected node, every round
    batch_size: int = 32
    local_steps: int = 1  # E: the first is synchronized, the others are plain local steps
    lr: float = 0.1
    lr_milestones: str = ""  # comma-separated rounds at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    num_rounds: int = 5
    model: str = "small_cnn"
    norm: str = "batch"
    seed: int = 0
    eval_interval: int = 1
    output_dir: str = "outputs/digits-fedtan"
    on_failure: str = "retry"  # retry the round with the clients that answered, or stop
    max_retries: int = 2
    reply_timeout: float = 600.0  # seconds to wait for the replies of one exchange
    # method = "fixbn": rounds 1..S are FedAvg with BN, later rounds freeze the BN statistics;
    # 0 means S = half the rounds.
    fixbn_switch_round: int = 0
    # transport = "grpc": the ServerApp's BN sync service; clients dial bn_sync_address
    # (default: host:port as bound). TLS when certfile and keyfile are set.
    bn_sync_host: str = "127.0.0.1"
    bn_sync_port: int = 0
    bn_sync_address: str = ""
    bn_sync_timeout: float = 60.0
    bn_sync_certfile: str = ""
    bn_sync_keyfile: str = ""
    bn_sync_ca_certfile: str = ""
    # What carries the service's calls: "grpc", or "socket" (framed messages on TCP, TLS the
    # same; about a tenth of gRPC Python's CPU per call, for clients sharing a few cores).
    bn_sync_protocol: str = "grpc"
    # seconds the server waits for num-clients SuperNodes to connect before the run fails
    min_nodes_timeout: float = 120.0
    # transport = "grpc": plaintext beyond loopback only if the network is trusted; mutual TLS
    # (clients present certificates this CA signed) when set.
    bn_sync_insecure_network: bool = False
    bn_sync_client_ca_certfile: str = ""
    # Where clients and the server's evaluation compute ("auto": the local GPU if any), autocast
    # of the forward pass and loss, and channels-last images (common/experiment/device.py).
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    # The output folder (server/results.py): continue the run in it from its last completed
    # round, or clear it first; a model checkpoint every N rounds (0: none), the last few kept.
    resume: bool = False
    overwrite: bool = False
    checkpoint_interval: int = 0
    checkpoint_keep: int = 3
    # transport = "grpc", method = "fedtan": R rounds per Flower train message (a block); inside
    # a block the BN sync service also averages the states (common/transports/grpc/block.py).
    rounds_per_message: int = 1
    milestones: tuple[int, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            value = getattr(self, key.replace("-", "_"))
            if value not in allowed:
                raise ValueError(f"run config '{key}': {value!r} is not one of {list(allowed)}")
        positive = (
            "batch_size",
            "local_steps",
            "num_rounds",
            "eval_interval",
            "num_clients",
            "rounds_per_message",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"run config '{_key(name)}' must be >= 1, got {getattr(self, name)}"
                )
        for name in (
            "clients_per_round",
            "max_retries",
            "seed",
            "fixbn_switch_round",
            "checkpoint_interval",
            "checkpoint_keep",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"run config '{_key(name)}' must be >= 0, got {getattr(self, name)}"
                )
        device.check_device_name(self.device)
        if self.resume and self.overwrite:
            raise ValueError("run config 'resume' and 'overwrite' exclude each other")
        if self.resume and methods.METHODS[self.method].keep != "none":
            # Those BN entries live only in the clients' Flower context, which a new run starts
            # empty: a "resumed" run would silently restart them from the initial model.
            raise ValueError(
                f"run config 'resume': method {self.method!r} keeps BN layers on the clients, "
                "which a new run cannot restore; start the run again instead"
            )
        if bool(self.bn_sync_certfile) != bool(self.bn_sync_keyfile):
            raise ValueError("run config 'bn-sync-certfile' and 'bn-sync-keyfile' go together")
        for name in ("lr", "dirichlet_alpha", "reply_timeout", "lr_gamma", "bn_sync_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"run config '{_key(name)}' must be > 0, got {getattr(self, name)}"
                )
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"run config '{_key(name)}' must be >= 0, got {getattr(self, name)}"
                )
        needed = methods.METHODS[self.method].norm
        if needed is not None and self.norm != needed:
            raise ValueError(
                f"run config 'method' {self.method!r} needs 'norm' = {needed!r}, got {self.norm!r}"
            )
        if self.transport != "messages" and self.method != "fedtan":
            raise ValueError(
                f"run config 'transport' {self.transport!r} applies to method 'fedtan' only"
            )
        if self.rounds_per_message > 1 and (self.method, self.transport) != ("fedtan", "grpc"):
            raise ValueError(
                f"run config 'rounds-per-message' = {self.rounds_per_message} needs method "
                f"'fedtan' and transport 'grpc' (the BN sync service runs the block's rounds), "
                f"got method {self.method!r} and transport {self.transport!r}"
            )
        if self.fixbn_switch_round > self.num_rounds:
            raise ValueError(
                f"run config 'fixbn-switch-round' ({self.fixbn_switch_round}) "
                f"exceeds 'num-rounds' ({self.num_rounds})"
            )
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"run config 'clients-per-round' ({self.clients_per_round}) "
                f"exceeds 'num-clients' ({self.num_clients})"
            )
        try:
            milestones = tuple(int(m) for m in self.lr_milestones.split(",") if m.strip())
        except ValueError:
            raise ValueError(
                f"run config 'lr-milestones': expected comma-separated round "
                f"numbers, got {self.lr_milestones!r}"
            ) from None
        if list(milestones) != sorted(milestones) or any(m < 1 for m in milestones):
            raise ValueError(
                f"run config 'lr-milestones' must be increasing rounds >= 1, "
                f"got {self.lr_milestones!r}"
            )
        object.__setattr__(self, "milestones", milestones)
        if not self.min_nodes_timeout > 0:
            raise ValueError(
                f"run config 'min-nodes-timeout' must be > 0, got {self.min_nodes_timeout}"
            )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Parse Flower's run config; unknown keys and wrong types are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                valid = ", ".join(sorted(_key(n) for n in fields))
                raise ValueError(f"unknown run config key '{key}'; valid keys: {valid}")
            kwargs[name] = _coerce(key, value, fields[name].type)
        return cls(**kwargs)

    def to_flower(self) -> dict[str, object]:
        """The run config with Flower's key names: what ``from_flower`` reads back."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def lr_at(self, server_round: int) -> float:
        """Step schedule: lr times lr_gamma for every milestone reached."""
        return self.lr * self.lr_gamma ** sum(server_round >= m for m in self.milestones)

    @property
    def fixbn_switch(self) -> int:
        """FixBN's last round with BN statistics in use; later rounds freeze them."""
        return self.fixbn_switch_round or max(1, self.num_rounds // 2)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: object, type_name: str) -> object:
    # Flower parses TOML, so ints may arrive where floats are expected; nothing else is coerced.
    if type_name == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"run config '{key}': expected true or false, got {value!r}")
        return value
    expected = {"str": str, "int": int, "float": float}[type_name]
    if not isinstance(value, expected) or isinstance(value, bool):
        raise ValueError(f"run config '{key}': expected {type_name}, got {value!r}")
    return value
