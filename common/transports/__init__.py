"""How FedTAN's BN statistics travel between the clients: one subpackage per transport, each
implementing ``base.Transport`` (server side) and a ``BNChannel`` (client side)."""

NAMES = ("messages", "grpc")  # run config ``transport``; server/app.py: make_transport
