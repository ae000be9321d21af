"""How FedTAN's BN statistics travel between the clients: one subpackage (or, for the
in-process one, a module) per transport, each implementing ``base.Transport`` (server side) and
a ``BNChannel`` (client side)."""

NAMES = ("messages", "grpc", "inprocess")  # run config ``transport``; server/app.py: make_transport
