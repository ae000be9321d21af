"""FedTAN's algorithm, free of Flower: federated BN layers, the channel they talk through, the
in-process engine. ``from common.fedtan import synced_round`` is the one-call entry point."""

from common.fedtan.engine import Batch, ClientReplicas, LossFn, synced_round, train_client

__all__ = ["Batch", "ClientReplicas", "LossFn", "synced_round", "train_client"]
