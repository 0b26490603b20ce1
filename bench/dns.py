"""DNS proxy cost, side by side in one run: the same client and DNS server pods, queries to a
port with a plain L3/L4 allow (direct) and to a port with DNS rules, which the datapath steers
through the node's DNS proxy. Then the toFQDNs path: lookups of names never seen before, each
answered with a new address that a toFQDNs rule selects, whose answer the proxy releases only
once the address is in the pod's policy, each followed by the same name twice (nothing to wait
for). The DNS answer -> policy entry delay is what the proxy measures itself (the time it held
answers back, its ``membrane_proxy_fqdn_policy_wait_seconds`` histogram, read before and after);
the client's new - again is printed too, with repeat - again beside it: what that subtraction
shows when there is nothing to wait for. Measured twice in the same cluster: with the agent's
fqdn socket moved away (the proxy then waits for the cluster-wide path: fqdn bucket -> policy
service -> ipcache/selectors, as before the fast path), and with the fast path (the node's
agent installs the address and acknowledges).

Goals (issue 13): proxied throughput >= 30 % of direct; policy update p99 <= 5 ms.

    sudo .venv/bin/python bench/dns.py [--seconds 4] [--concurrency 16] [--names 200] [--gap MS]

The DNS server (answers every A query; ``kN.fqdn.bench`` gets its own address in 198.18.0.0/15)
and the load generator run inside the pods: ``bench/dns.py serve`` / ``load`` / ``lookups``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's directory comes first on the path and its name would hide
# dnspython's package "dns": the repository root instead
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import dns.message  # noqa: E402
import dns.rrset  # noqa: E402

from bench.datapath import Cluster  # noqa: E402
from shared import agent_api  # noqa: E402

DIRECT_PORT, PROXIED_PORT = 5353, 53
POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-dns}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-client}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: bench-dns}}}}]
    toPorts:
    - ports: [{{port: "{DIRECT_PORT}", protocol: UDP}}]
  - toEndpoints: [{{matchLabels: {{app: bench-dns}}}}]
    toPorts:
    - ports: [{{port: "{PROXIED_PORT}", protocol: UDP}}]
      rules:
        dns: [{{matchPattern: "*.bench"}}, {{matchPattern: "*.fqdn.bench"}}]
  - toFQDNs: [{{matchPattern: "*.fqdn.bench"}}]
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
"""


# --- inside the pods ---------------------------------------------------------------------------


def _address(name: str) -> str:
    """``kN.fqdn.bench`` -> the N-th address of 198.18.0.0/15 (from .1); anything else .1."""
    label = name.split(".", 1)[0]
    n = int(label[1:]) + 1 if label[:1] == "k" and label[1:].isdigit() else 1
    return f"198.18.{n // 250}.{n % 250 + 1}"


class _Server(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        name = query.question[0].name
        response.answer.append(
            dns.rrset.from_text_list(name, 300, "IN", "A", [_address(name.to_text())])
        )
        self.transport.sendto(response.to_wire(), addr)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    for port in (DIRECT_PORT, PROXIED_PORT):
        await loop.create_datagram_endpoint(_Server, local_addr=("0.0.0.0", port))
    print("ready", flush=True)
    await asyncio.Event().wait()


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        future = self.waiting.pop(int.from_bytes(data[:2], "big"), None)
        if future is not None and not future.done():
            future.set_result(data)

    async def ask(self, wire: bytes, query_id: int, timeout: float = 1.0) -> bytes:
        future = asyncio.get_running_loop().create_future()
        self.waiting[query_id] = future
        self.transport.sendto(query_id.to_bytes(2, "big") + wire[2:])
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(query_id, None)


async def _client(ip: str, port: int) -> _Client:
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        _Client, remote_addr=(ip, port)
    )
    return protocol


async def _load(ip: str, port: int, seconds: float, concurrency: int) -> None:
    client = await _client(ip, port)
    wire = dns.message.make_query("api.bench", "A").to_wire()
    await client.ask(wire, 1, timeout=3)  # learned once: the load measures the proxy's path
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    next_id = 2

    async def worker() -> None:
        nonlocal errors, next_id
        while time.perf_counter() < deadline:
            query_id = next_id = (next_id + 1) % 65536
            started = time.perf_counter()
            try:
                await client.ask(wire, query_id)
            except TimeoutError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    print(json.dumps({
        "qps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        "errors": errors,
    }))  # fmt: skip


async def _lookups(ip: str, port: int, count: int, first: int, gap: float) -> None:
    """Each name once (new: the proxy waits for its address in the policy), then at once again
    (the same path without the wait, under the same load: the cluster-wide work of the names
    just learned runs meanwhile, as during the next new name), and a third time (``repeat``:
    again minus repeat is what the subtraction shows when there is nothing to wait for);
    ``gap`` seconds between lookups (0: back to back)."""
    client = await _client(ip, port)
    times: dict[str, list[float]] = {"new": [], "again": [], "repeat": []}
    for n in range(first, first + count):
        wire = dns.message.make_query(f"k{n}.fqdn.bench", "A").to_wire()
        for round_name in times:
            started = time.perf_counter()
            await client.ask(wire, n % 65536, timeout=5)
            times[round_name].append(1000 * (time.perf_counter() - started))
            if gap:
                await asyncio.sleep(gap)
    print(json.dumps(times))


# --- the driver ----------------------------------------------------------------------------------


WAIT_METRIC = "membrane_proxy_fqdn_policy_wait_seconds_bucket"


def _proxy_waits(cluster: Cluster) -> dict[float, float]:
    """The proxy's own histogram of the answer -> policy entry wait (the time its answers were
    held back): upper bound in seconds -> count so far. Read from inside the node."""
    status = json.loads(cluster.run("status", "-o", "json").stdout)
    (proxy,) = [s for s in status["services"] if s["name"] == "membrane-proxy"]
    url = f"http://{proxy['metadata']['metrics']}/metrics"
    read = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    text = subprocess.run(["ip", "netns", "exec", cluster.node, sys.executable, "-c", read],
                          check=True, capture_output=True, text=True).stdout  # fmt: skip
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(WAIT_METRIC + "{"):
            labels, value = line.rsplit(" ", 1)
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(value)
    return buckets


def _wait_summary(before: dict[float, float], after: dict[float, float]) -> str:
    """The waits between two readings: the share within 5 ms and the bucket holding the p99."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts[float("inf")]
    if not total:
        return "no answer held"
    p99 = next(le for le, n in counts.items() if n >= 0.99 * total)
    within = counts.get(0.005, 0.0) / total
    return (f"{int(total)} answers held, {within:.1%} within 5 ms: p99 <= {p99 * 1000:g} ms "
            f"(goal <= 5 ms): {'met' if within >= 0.99 else 'NOT met'}")  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run(args: argparse.Namespace) -> int:
    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="membrane-bench-dns-") as tmp:
        cluster = Cluster(Path(tmp) / "state")
        cluster.up()
        server = None
        try:
            for pod, app in (("dns", "bench-dns"), ("client", "bench-client")):
                cluster.run("pod", "create", pod, "--labels", f"app={app}", "--node", cluster.node)
            policy = Path(tmp) / "policy.yaml"
            policy.write_text(POLICY)
            cluster.run("apply", "-f", str(policy))
            server = subprocess.Popen(
                cluster.command("pod", "exec", "dns", "--", sys.executable, me, "serve"),
                env=cluster.env(), stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            ip = cluster.pod_ip("dns")
            time.sleep(1.0)  # the policy in the datapath and the proxy

            def in_client(*argv: str, timeout: float = 120) -> str:
                return cluster.run("pod", "exec", "client", "--", sys.executable, me, *argv,
                                   timeout=timeout).stdout  # fmt: skip

            # before: the proxy finds no agent socket and waits for the cluster-wide path;
            # first, while no answer has gone through the proxy: it keeps its connection to
            # the agent's socket open once it has one
            sock = agent_api.fqdn_socket(agent_api.default_socket(cluster.node))
            away = sock.with_name("fqdn.sock.bench-off")
            sock.rename(away)
            waits = [_proxy_waits(cluster)]
            try:
                before = json.loads(in_client("lookups", ip, str(PROXIED_PORT), str(args.names),
                                              "20000", str(args.gap / 1000)))  # fmt: skip
            finally:
                away.rename(sock)
            waits.append(_proxy_waits(cluster))
            results: dict[str, dict[str, float]] = {}
            for path, port in (("direct", DIRECT_PORT), ("proxied", PROXIED_PORT)) * args.rounds:
                got = json.loads(in_client("load", ip, str(port), str(args.seconds),
                                           str(args.concurrency)))  # fmt: skip
                if path not in results or got["qps"] > results[path]["qps"]:
                    results[path] = got
            waits.append(_proxy_waits(cluster))
            lookups = json.loads(in_client("lookups", ip, str(PROXIED_PORT), str(args.names), "0",
                                           str(args.gap / 1000)))  # fmt: skip
            waits.append(_proxy_waits(cluster))
            print(f"\nDNS through the proxy vs direct, {args.concurrency} queries in flight, "
                  f"{args.seconds:g} s per run, best of {args.rounds} (one node)")  # fmt: skip
            print(f"{'path':8} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
            for path in ("direct", "proxied"):
                r = results[path]
                print(f"{path:8} {r['qps']:10.0f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
                      f"{r['errors']:7d}")  # fmt: skip
            share = results["proxied"]["qps"] / results["direct"]["qps"]
            print(f"  proxied throughput {share:.0%} of direct (goal >= 30%): "
                  f"{'met' if share >= 0.3 else 'NOT met'}")  # fmt: skip
            for title, got, held in (
                ("cluster-wide path only (before)", before, _wait_summary(waits[0], waits[1])),
                ("agent fast path (after)", lookups, _wait_summary(waits[2], waits[3])),
            ):
                new, again, repeat = got["new"], got["again"], got["repeat"]
                added = [a - b for a, b in zip(new, again, strict=True)]
                noise = [a - b for a, b in zip(repeat, again, strict=True)]
                print(f"\ntoFQDNs, {title}: {args.names} lookups of new names (each a new "
                      "address a toFQDNs rule selects), each followed by the same name twice, "
                      f"{args.gap:g} ms apart")  # fmt: skip
                for label, values in (("new name", new), ("again", again), ("repeat", repeat),
                                      ("added", added), ("noise", noise)):  # fmt: skip
                    p50, p99 = _pct(values, 0.5), _pct(values, 0.99)
                    print(f"  {label:9} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")
                p99 = _pct(added, 0.99)
                print(
                    f"  policy update (answer -> policy entry on the node), new - again: p99 "
                    f"{p99:.3f} ms (goal <= 5 ms): {'met' if p99 <= 5 else 'NOT met'}; "
                    f"with nothing to wait for (repeat - again) p99 {_pct(noise, 0.99):.3f} ms"
                )
                print(f"  the proxy's own measure of the wait: {held}")
            load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"\nload average (1/5/15 min) at the end: {load}")
            return 0
        finally:
            if server is not None:
                server.kill()
            cluster.down()


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in ("serve", "load", "lookups"):
        import uvloop

        argv = sys.argv[2:]
        if command == "serve":
            uvloop.run(_serve())
        elif command == "load":
            uvloop.run(_load(argv[0], int(argv[1]), float(argv[2]), int(argv[3])))
        else:
            uvloop.run(_lookups(argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--names", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="milliseconds between lookups (0: back to back, each new name's cluster-wide "
        "work then overlaps the next lookups)",
    )
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
