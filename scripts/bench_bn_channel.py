"""Benchmark of the BN sync channel on loopback (not a test), over each carrier of its calls
(``--protocols``: gRPC, and framed messages on a socket).

1. Round-trip latency of one exchange: K clients all-reduce Moments of ``--channels`` floats per
   vector, ``--exchanges`` times in a row; per-call median and p95 in ms (target: < 5 ms), and
   the exchange rate; the in-process hub for reference. Clients are threads of this process,
   and with ``--processes`` also separate processes, as in a deployment.
2. One synchronized FedTAN step of a small CNN (``--bn-layers`` BN layers, so 2x that many
   exchanges) by K client threads: over the service vs over the InProcessHub, and a plain local
   step without synchronization for reference; median of ``--repeats``, and the ratios.

    python scripts/bench_bn_channel.py [--clients 5] [--tls] [--processes] [--protocols grpc]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from common.fedtan import train_client  # noqa: E402
from common.fedtan.bn_channel import BNChannel, Moments  # noqa: E402
from common.fedtan.bn_sync import convert_federated_batchnorm  # noqa: E402
from common.fedtan.inprocess import InProcessHub  # noqa: E402
from common.transports.grpc.client import GrpcBNChannel  # noqa: E402
from common.transports.grpc.service import BNSyncService  # noqa: E402

NAMES = {"grpc": "gRPC", "socket": "socket"}  # bn-sync-protocol: the rows' names


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def exchange_loop(channel: BNChannel, args) -> tuple[list[float], float]:
    """Durations of the timed calls, and the wall time of all of them, in seconds."""
    local = Moments(32, torch.randn(args.channels, dtype=torch.float64), torch.rand(args.channels))
    times = []
    for i in range(args.warmup + args.exchanges):
        if i == args.warmup:
            first = time.perf_counter()
        start = time.perf_counter()
        channel.reduce_moments(f"bn{i}", local)
        times.append(time.perf_counter() - start)
    return times[args.warmup :], time.perf_counter() - first


def latency_client(
    address: str, round_id: int, client_id: str, credential: str, root: bytes | None, args,
    protocol: str,
) -> tuple[list[float], float]:
    with GrpcBNChannel(
        address, round_id=round_id, client_id=client_id, credential=credential,
        root_certificates=root, protocol=protocol,
    ) as channel:  # fmt: skip
        return exchange_loop(channel, args)


def _process_client(queue: mp.Queue, *params) -> None:
    queue.put((params[2], latency_client(*params)))


def run_threads(jobs: dict[str, Callable[[], object]]) -> dict[str, object]:
    results: dict[str, object] = {}
    threads = [
        threading.Thread(target=lambda n=n, j=j: results.__setitem__(n, j()))
        for n, j in jobs.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def report(title: str, per_client: dict[str, tuple[list[float], float]], args) -> None:
    calls = [t * 1e3 for times, _ in per_client.values() for t in times]
    wall = max(w for _, w in per_client.values())
    print(
        f"  {title:32s} median {statistics.median(calls):6.3f} ms  p95 "
        f"{percentile(calls, 0.95):6.3f} ms  max {max(calls):7.3f} ms  "
        f"{args.exchanges / wall:6.0f} exchanges/s"
    )


def bench_latency(services: dict[str, BNSyncService], root: bytes | None, args) -> None:
    ids = [f"c{k}" for k in range(args.clients)]
    print(
        f"exchange latency: K={args.clients} clients, {args.channels} floats per vector, "
        f"{args.exchanges} timed exchanges (+{args.warmup} warm-up), {'TLS' if root else 'plain'}"
    )
    hub = InProcessHub(args.clients, timeout=60)
    per_client = run_threads(
        {c: lambda k=k: exchange_loop(hub.channel(k), args) for k, c in enumerate(ids)}
    )
    report("in-process hub, threads", per_client, args)
    for protocol, service in services.items():
        address, name = f"127.0.0.1:{service.port}", NAMES[protocol]
        credentials = service.open_round(1, ids)
        params = {c: (address, 1, c, credentials[c], root, args, protocol) for c in ids}
        per_client = run_threads({c: lambda p=p: latency_client(*p) for c, p in params.items()})
        assert service.close_round(1) is None
        report(f"{name}, client threads", per_client, args)
        if args.processes:
            # Separate processes, as deployed: each pays its torch import before its timed loop.
            credentials = service.open_round(2, ids)
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_process_client,
                    args=(queue, address, 2, c, credentials[c], root, args, protocol),
                )
                for c in ids
            ]
            for proc in procs:
                proc.start()
            per_client = dict(queue.get(timeout=600) for _ in procs)
            for proc in procs:
                proc.join()
            assert service.close_round(2) is None
            report(f"{name}, client processes", per_client, args)


class SmallCNN(nn.Sequential):
    def __init__(self, bn_layers: int, width: int = 16) -> None:
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
        for i in range(bn_layers - 1):
            layers += [nn.BatchNorm2d(width), nn.ReLU()]
            if i < bn_layers - 2:
                layers.append(nn.Conv2d(width, width, 3, padding=1, bias=False))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 32), nn.BatchNorm1d(32)]
        layers += [nn.ReLU(), nn.Linear(32, 10)]
        super().__init__(*layers)


def timed_step(
    model: nn.Module, batches, channels: Callable[[int], BNChannel | None], clients: int
) -> float:
    """Wall time of one synchronized step by K client threads (channel setup included)."""
    copies = [convert_federated_batchnorm(copy.deepcopy(model)) for _ in range(clients)]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            channel = channels(k)
            try:
                train_client(
                    copies[k], [batches[k]], nn.CrossEntropyLoss(), lr=0.1, channel=channel
                )
            finally:
                if isinstance(channel, GrpcBNChannel):
                    channel.close()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def bench_step(services: dict[str, BNSyncService], root: bytes | None, args) -> None:
    torch.manual_seed(0)
    model = SmallCNN(args.bn_layers)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch, 3, args.image, args.image, generator=g) + k,
         torch.randint(0, 10, (args.batch,), generator=g))
        for k in range(args.clients)
    ]  # fmt: skip
    round_ids, last_round = iter(range(1000, 10**6)), [0]

    def service_channels(protocol: str) -> Callable[[], Callable[[int], BNChannel]]:
        service = services[protocol]

        def channels() -> Callable[[int], BNChannel]:
            rid, ids = next(round_ids), [f"c{k}" for k in range(args.clients)]
            last_round[0] = rid
            creds = service.open_round(rid, ids)
            return lambda k: GrpcBNChannel(
                f"127.0.0.1:{service.port}", round_id=rid, client_id=ids[k],
                credential=creds[ids[k]], root_certificates=root, protocol=protocol,
            )  # fmt: skip

        return channels

    def hub_channels() -> Callable[[int], BNChannel]:
        hub = InProcessHub(args.clients, timeout=60)
        return hub.channel

    modes = {
        "local (no sync)": lambda: lambda k: None,
        "in-process hub": hub_channels,
        **{NAMES[p]: service_channels(p) for p in services},
    }
    protocol_of = {NAMES[p]: p for p in services}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for rep in range(args.repeats + 1):  # the first repetition warms up and is dropped
        for name, make in modes.items():  # interleaved, so that drifts hit all modes alike
            elapsed = timed_step(model, batches, make(), args.clients)
            if name in protocol_of:
                assert services[protocol_of[name]].close_round(last_round[0]) is None
            if rep:
                times[name].append(elapsed)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    exchanges = 2 * args.bn_layers
    print(
        f"synced step: small CNN with {args.bn_layers} BN layers ({exchanges} exchanges), "
        f"K={args.clients} client threads x batch {args.batch} of 3x{args.image}x{args.image}, "
        f"median of {args.repeats}"
    )
    for name, value in median.items():
        print(f"  {name:16s} {value:8.1f} ms")
    hub = median["in-process hub"]
    for name in protocol_of:
        ms = median[name]
        print(
            f"  {name} / in-process = {ms / hub:.2f}x;  {name} overhead {ms - hub:.1f} ms "
            f"= {(ms - hub) / exchanges:.2f} ms per exchange"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--exchanges", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--processes", action="store_true", help="clients as processes")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--bn-layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument(
        "--protocols", nargs="+", choices=list(NAMES), default=list(NAMES), help="carriers"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    tls, root = None, None
    if args.tls:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from certs import make_certs

        certs = make_certs(Path(tempfile.mkdtemp(prefix="bn-bench-certs-")))
        tls, root = (certs.server_chain, certs.server_key), certs.ca_cert
    with ExitStack() as stack:
        services = {
            p: stack.enter_context(BNSyncService("127.0.0.1", 0, tls=tls, timeout=60, protocol=p))
            for p in args.protocols
        }
        bench_latency(services, root, args)
        if not args.skip_step:
            bench_step(services, root, args)


if __name__ == "__main__":
    main()
