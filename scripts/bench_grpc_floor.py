"""Benchmark (not a test): gRPC Python's own cost per BN exchange, without FedTAN's code.

K client processes and one server process on this machine; each exchange is a barrier of the
K, as a BN all-reduce is: every client sends 600 bytes, and all get 600 bytes back once all
have sent. Five ways, measured side by side in one run:

* ``call``: a call per exchange (the BN sync service's way: a request-streaming handler, one
  message in, one out);
* ``stream``: one bidirectional stream per client and round of 6 exchanges (small_cnn's 2L),
  each exchange a message each way on it;
* ``aio-call``: a call per exchange, served by gRPC's asyncio server (``grpc.aio``) instead of
  the thread pool (the clients stay synchronous, as FedTAN's are);
* ``uds-call``: a call per exchange over a Unix domain socket instead of TCP on 127.0.0.1 (what
  a service could offer clients on its own host, as in a Ray simulation);
* ``socket``: no RPC framework at all, the floor under any of them: a TCP connection per
  client, each message a 4-byte length and its bytes, a server thread per connection.

It prints the wall time per exchange and the CPU time of the server and of the clients per
message: what a round of many exchanges costs a machine whose cores the clients already fill.

    python scripts/bench_grpc_floor.py --clients 5 --exchanges 600
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import queue
import resource
import socket
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

PAYLOAD = b"x" * 600
EXCHANGES_PER_ROUND = 6
# way -> (server, method)
WAYS = {
    "call": ("threads", "/bench.Floor/Call"),
    "stream": ("threads", "/bench.Floor/Stream"),
    "aio-call": ("aio", "/bench.Floor/Call"),
    "uds-call": ("uds", "/bench.Floor/Call"),
    "socket": ("socket", ""),
}


class _Barrier:
    """Releases every waiter once ``k`` have arrived; reusable, one generation after another."""

    def __init__(self, k: int) -> None:
        self.k, self.arrived, self.generation = k, 0, 0
        self.cond = threading.Condition()

    def wait(self) -> None:
        with self.cond:
            generation = self.generation
            self.arrived += 1
            if self.arrived == self.k:
                self.arrived, self.generation = 0, generation + 1
                self.cond.notify_all()
            while self.generation == generation:
                self.cond.wait()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server(clients: int, ports: mp.Queue, control: mp.Queue, unix_path: str = "") -> None:
    """The thread-pool server, on 127.0.0.1 or, given ``unix_path``, on that Unix socket; puts
    the address clients dial on ``ports``."""
    barrier = _Barrier(clients)

    def call(requests, context):
        next(requests)
        barrier.wait()
        return PAYLOAD

    def stream(requests, context):
        for _ in requests:
            barrier.wait()
            yield PAYLOAD

    server = grpc.server(futures.ThreadPoolExecutor(4 * clients))
    server.add_registered_method_handlers(
        "bench.Floor",
        {
            "Call": grpc.stream_unary_rpc_method_handler(call),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    if unix_path:
        server.add_insecure_port(f"unix:{unix_path}")
        ports.put(f"unix:{unix_path}")
    else:
        ports.put(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
    server.start()
    while control.get() == "measure":
        before = _cpu_seconds()
        control.get()  # "done"
        ports.put(_cpu_seconds() - before)
    server.stop(0)


def _socket_server(clients: int, ports: mp.Queue, control: mp.Queue) -> None:
    """The ``socket`` way's server: a thread per client connection, framed messages."""
    barrier = _Barrier(clients)
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(f"127.0.0.1:{listener.getsockname()[1]}")

    def serve(conn: socket.socket) -> None:
        with conn:
            while _receive(conn) is not None:
                barrier.wait()
                _send(conn, PAYLOAD)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the run is over
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    while control.get() == "measure":
        before = _cpu_seconds()
        control.get()  # "done"
        ports.put(_cpu_seconds() - before)
    listener.close()


def _send(conn: socket.socket, data: bytes) -> None:
    conn.sendall(len(data).to_bytes(4, "big") + data)


def _receive(conn: socket.socket) -> bytes | None:
    """The next message, or None once the other end has closed."""
    head = _receive_exactly(conn, 4)
    return None if head is None else _receive_exactly(conn, int.from_bytes(head, "big"))


def _receive_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _aio_server(clients: int, ports: mp.Queue, control: mp.Queue) -> None:
    asyncio.run(_serve_aio(clients, ports, control))


async def _serve_aio(clients: int, ports: mp.Queue, control: mp.Queue) -> None:
    arrived, generation = 0, 0
    changed = asyncio.Condition()

    async def call(requests, context):
        nonlocal arrived, generation
        async for _ in requests:
            break
        async with changed:
            mine = generation
            arrived += 1
            if arrived == clients:
                arrived, generation = 0, mine + 1
                changed.notify_all()
            await changed.wait_for(lambda: generation != mine)
        return PAYLOAD

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Floor", {"Call": grpc.stream_unary_rpc_method_handler(call)}
    )
    server.add_generic_rpc_handlers([handler])
    ports.put(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
    await server.start()
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, control.get) == "measure":
        before = _cpu_seconds()
        await loop.run_in_executor(None, control.get)  # "done"
        ports.put(_cpu_seconds() - before)
    await server.stop(0)


def _client(address: str, way: str, exchanges: int, start: mp.Event, out: mp.Queue) -> None:
    if way == "socket":
        _socket_client(address, exchanges, start, out)
        return
    channel = grpc.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)])
    start.wait()
    wall, cpu = time.perf_counter(), time.process_time()
    _, method = WAYS[way]
    if method.endswith("/Call"):
        call = channel.unary_unary(method, _registered_method=True)
        for _ in range(exchanges):
            call(PAYLOAD, timeout=30)
    else:
        stub = channel.stream_stream(method, _registered_method=True)
        for _ in range(exchanges // EXCHANGES_PER_ROUND):
            requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
            replies = stub(iter(requests.get, None), timeout=30)
            for _ in range(EXCHANGES_PER_ROUND):
                requests.put(PAYLOAD)
                next(replies)
            requests.put(None)
            for _ in replies:
                pass
    out.put((time.perf_counter() - wall, time.process_time() - cpu))
    channel.close()


def _socket_client(address: str, exchanges: int, start: mp.Event, out: mp.Queue) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start.wait()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(exchanges):
            _send(conn, PAYLOAD)
            if _receive(conn) is None:
                raise ConnectionError("the socket server closed the connection")
        out.put((time.perf_counter() - wall, time.process_time() - cpu))


def measure(
    way: str, address: str, clients: int, exchanges: int, results: mp.Queue, control: mp.Queue
) -> None:
    """One way's row: ``clients`` processes, ``exchanges`` each; the server reports its CPU
    time on ``results``."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(address, way, exchanges, start, out), daemon=True)
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    time.sleep(2.0)  # the clients' imports, before the server's clock starts
    control.put("measure")
    start.set()
    timings = [out.get() for _ in procs]
    control.put("done")
    server_cpu = results.get()
    for proc in procs:
        proc.join()
    wall = max(t[0] for t in timings) / exchanges
    messages = exchanges * clients
    client_cpu = sum(t[1] for t in timings) / messages
    print(
        f"{way:8} {wall * 1e3:8.2f} {server_cpu / messages * 1e3:12.3f} "
        f"{client_cpu * 1e3:12.3f} {(server_cpu / messages + client_cpu) * 1e3:12.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--exchanges", type=int, default=600, help="per client and way")
    parser.add_argument("--repeats", type=int, default=2, help="each way, alternating")
    args = parser.parse_args()
    if args.exchanges % EXCHANGES_PER_ROUND:
        parser.error(f"--exchanges must be a multiple of {EXCHANGES_PER_ROUND}")
    ctx = mp.get_context("spawn")
    folder = tempfile.TemporaryDirectory()  # the Unix socket's
    servers = {}  # kind -> (process, its queue of addresses and CPU times, its control queue)
    try:
        for kind, target, extra in (
            ("threads", _server, ()),
            ("aio", _aio_server, ()),
            ("uds", _server, (str(Path(folder.name) / "floor.sock"),)),
            ("socket", _socket_server, ()),
        ):
            ports, control = ctx.Queue(), ctx.Queue()
            process = ctx.Process(
                target=target, args=(args.clients, ports, control, *extra), daemon=True
            )
            process.start()
            servers[kind] = (process, ports, control)
        print(f"{args.clients} client processes, {args.exchanges} exchanges each way and repeat")
        print(f"{'way':8} {'ms/exch':>8} {'server ms/msg':>12} {'client ms/msg':>12}", end="")
        print(f" {'sum ms/msg':>12}")
        address = {kind: ports.get() for kind, (_, ports, _) in servers.items()}
        for _ in range(args.repeats):
            for way, (kind, _) in WAYS.items():
                _, ports, control = servers[kind]
                measure(way, address[kind], args.clients, args.exchanges, ports, control)
    finally:
        for _, _, control in servers.values():
            control.put("stop")
        for process, _, _ in servers.values():
            process.join(10)
            if process.is_alive():
                process.kill()
        folder.cleanup()


if __name__ == "__main__":
    main()
