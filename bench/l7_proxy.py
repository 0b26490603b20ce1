"""The HTTP/1.1 proxy alone, on loopback: no cluster, no datapath, no pods. The proxy's listener
protocol and handler run in this process (uvloop, an L7 allow rule), the server and ``bench/l7.py
load`` in their own processes; printed per run: requests/s, p50, and this process's CPU time per
request, which on the shared machine varies much less than ``bench/l7.py``'s side-by-side ratio
(its L3/L4 baseline moves with the machine's load).

    .venv/bin/python bench/l7_proxy.py [--runs 3] [--seconds 4] [--connections 4]
        [--mode keepalive|newconn] [--flows] [--no-pool] [--profile N]
    (root: SO_MARK)

``--mode newconn``: a new connection per request (``Connection: close``, which the server
honours, as ``bench/l7.py``'s does). ``--flows``: each request reported as the service reports
it (``FlowSink.add``: the flow, the metrics), the batches encoded every 50 ms as the bus would
send them (not sent). ``--no-pool``: no pool of upstream connections (services/proxy/pool.py),
each client connection opens its own upstream, as before the pool. ``--profile N``: cProfile
over the runs, the N functions of most own time printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import uvloop

# the repository, in place of this directory (its dns.py would shadow dnspython)
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.proxy.connection import Accepted
from services.proxy.exchange import Report
from services.proxy.pool import UpstreamPool
from services.proxy.service import FLUSH_S, FlowSink
from services.proxy.sockets import BACKLOG
from services.proxy.view import View
from shared import identities, l7_wire
from shared.l7_wire import L7Batch
from shared.messages import PolicyEntry, ResolvedPolicy

LOAD = str(Path(__file__).resolve().parent / "l7.py")
SERVER = """
import asyncio, uvloop
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nContent-Type: text/plain\\r\\n\\r\\nok"
CLOSE = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok"
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            close = b"connection: close" in head.lower()
            writer.write(CLOSE if close else ANSWER)
            if close:
                await writer.drain()
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def allowing_get() -> View:
    """Loopback is "world": its ingress allowed for ``GET /bench/.*`` only."""
    view = View()
    rule: dict[str, object] = {"http": {"method": "GET", "path": "/bench/.*"}}
    entry = PolicyEntry(peer=0, protocol=6, port=0, rule_id=1, l7=[rule])
    policy = ResolvedPolicy(
        identity=identities.WORLD, revision=1, ingress_enforced=True, ingress=[entry],
        rules={1: "bench/l7[0]"},
    )  # fmt: skip
    view.set_resolved(str(identities.WORLD), msgspec.json.encode(policy))
    return view


class _Encoded:
    """What the proxy's FlowSink.run does with a batch, without the bus: the metrics handed
    over, the flows encoded and dropped."""

    def __init__(self, sink: FlowSink) -> None:
        self.sink = sink

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if hasattr(self.sink, "account"):
                self.sink.account()
            if self.sink.flows:
                batch, self.sink.flows = self.sink.flows, []
                l7_wire.encode(L7Batch("bench", batch))


async def measure(upstream_port: int, args: argparse.Namespace) -> None:
    view = allowing_get()
    report: Report = lambda *_: None  # noqa: E731
    if args.flows:
        # no bus: its run() is not used
        sink = FlowSink(None, "bench")  # type: ignore[arg-type]
        report = sink.add
        encoder = asyncio.create_task(_Encoded(sink).run())

    failures: list[BaseException] = []

    class Towards(Accepted):
        """The service's listener protocol, the upstream being the server (on a node the
        upstream is the address the client asked for: here the proxy itself)."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.conn = dataclasses.replace(self.conn, dport=upstream_port)

    loop = asyncio.get_running_loop()
    pool = None if args.no_pool else UpstreamPool()
    proxy = await loop.create_server(
        lambda: Towards(view, report, failures.append, pool), "127.0.0.1", 0, backlog=BACKLOG
    )
    port = proxy.sockets[0].getsockname()[1]
    for _ in range(args.runs):
        cpu, times = time.process_time(), os.times()
        load = await asyncio.create_subprocess_exec(
            sys.executable, LOAD, "load", "127.0.0.1", str(port), args.mode,
            str(args.seconds), str(args.connections), stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await load.communicate()
        got = json.loads(out)
        spent, after = time.process_time() - cpu, os.times()
        per = 1e6 / max(got["requests"], 1)
        print(
            f"{got['rps']:8.0f} req/s  p50 {got['p50_ms']:.3f} ms  errors {got['errors']}  "
            f"proxy CPU {per * spent:.1f} us/req (user {per * (after.user - times.user):.1f}, "
            f"system {per * (after.system - times.system):.1f})"
            + (f"  upstreams reused {pool.reused}" if pool is not None else ""),
            flush=True,
        )
    proxy.close()
    assert not failures, failures
    if args.flows:
        encoder.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--flows", action="store_true", help="report flows as the service does")
    parser.add_argument(
        "--mode", choices=("keepalive", "newconn"), default="keepalive",
        help="keep-alive connections, or a new connection per request",
    )  # fmt: skip
    parser.add_argument(
        "--no-pool", action="store_true", help="no upstream pool: a new upstream per connection"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile, top N")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    profile = cProfile.Profile() if args.profile else None
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        if profile is not None:
            profile.enable()
        uvloop.run(measure(port, args))
    finally:
        if profile is not None:
            profile.disable()
        server.kill()
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
