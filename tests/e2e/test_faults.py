"""Faults under traffic: the bus (nats-server) killed with SIGKILL while packets flow on an
allowed and on a denied path, as the agent-restart test does for the agent. Figures are printed
(`pytest -s`) as well as asserted: packets lost, packets wrongly let through, recovery time."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from membrane.registry import SERVICES
from membrane.state import StateDir
from shared import roles, subjects
from shared.bus import MEMBRANE_CODE_HEADER, Bus
from shared.errors import Unavailable
from shared.messages import AllocateReply, AllocateRequest, Empty, ListReply
from tests.conftest import REPO, scrape
from tests.e2e.cluster import Cluster, counted, create_pod, started_in_pod, until

pytestmark = [pytest.mark.e2e, pytest.mark.root]

PACKETS = 500  # 10 ms apart: 5 s of traffic on each path


def _pid(cluster: Cluster, name: str) -> int:
    for proc in StateDir(cluster.state).processes():
        if proc.name == name and proc.running:
            return proc.pid
    return 0


def policy(name: str, ports: list[int]) -> str:
    port_list = ", ".join(f'{{port: "{p}", protocol: UDP}}' for p in ports)
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: f-b}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: f-a}}}}]
    toPorts: [{{ports: [{port_list}]}}]
"""


async def kv_counts(bus: Bus) -> dict[str, int]:
    return {b: len(await Bus.snapshot(await bus.kv(b))) for b in roles.ALL_BUCKETS}


async def all_services_answer(bus: Bus, nodes: int) -> bool:
    """Every service the local cluster runs answers discovery (per-node ones on each node)."""
    names = [s.name for s in await bus.discover(timeout=0.5)]
    for entry in SERVICES.values():
        if entry.kubernetes_only or not (entry.per_node or entry.default_replicas):
            continue
        if names.count(entry.micro_name) < (nodes if entry.per_node else 1):
            return False
    return True


async def test_nats_sigkill_under_traffic(cluster: Cluster, tmp_path: Path) -> None:
    create_pod(cluster, "f-a", "app=f-a")
    b = create_pod(cluster, "f-b", "app=f-b", node=2)
    create_pod(cluster, "f-c", "app=f-c")
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(policy("f-allow", [9000]))
    cluster.run("apply", "-f", str(manifest))
    bus = await Bus.connect(cluster.nats_url, "test-faults", retry_for=5)
    before = await kv_counts(bus)
    await bus.close()
    await asyncio.sleep(1.0)  # the policy reaches the agents
    bip = str(b["ip"])
    counters = [cluster.background("f-b", "count", str(p), "eof") for p in (9000, 9001)]
    senders = [
        cluster.background("f-a", "stream", bip, "9000", str(PACKETS), "10"),
        cluster.background("f-c", "stream", bip, "9001", str(PACKETS), "10"),
    ]
    try:
        for sender in senders:  # streaming, not still looking their pods up on the bus
            await asyncio.to_thread(started_in_pod, sender)
        await asyncio.sleep(0.5)
        victim = _pid(cluster, "nats-server")
        assert victim
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while _pid(cluster, "nats-server") in (0, victim):
            assert time.monotonic() - killed < 30, "the supervisor did not restart nats-server"
            await asyncio.sleep(0.1)
        bus = await Bus.connect(cluster.nats_url, "test-faults", retry_for=20)
        try:
            while not await all_services_answer(bus, cluster.node_count):
                assert time.monotonic() - killed < 60, "services did not come back on the bus"
            recovered = time.monotonic() - killed
            allowed, denied = counted(senders, counters)
            print(
                f"\nnats-server SIGKILL: allowed lost {PACKETS - allowed}/{PACKETS}, "
                f"denied let through {denied}/{PACKETS}, services back in {recovered:.1f}s"
            )
            assert allowed == PACKETS, f"allowed path lost {PACKETS - allowed} datagrams"
            assert denied == 0, f"denied path let {denied} datagrams through"
            assert await kv_counts(bus) == before  # no KV entry lost
        finally:
            await bus.close()
        # a policy change after recovery takes effect: 9001 opens
        manifest.write_text(policy("f-allow", [9000, 9001]))
        cluster.run("apply", "-f", str(manifest))
        deadline = time.monotonic() + 20
        while True:
            counter = cluster.background("f-b", "count", "9001", "eof")
            sender = cluster.background("f-a", "stream", bip, "9001", "50", "10")
            sender.communicate(timeout=20)
            got = int(counter.communicate(timeout=20)[0].split()[-1])
            if got:
                break
            assert time.monotonic() < deadline, "the policy change after recovery never applied"
    finally:
        for proc in senders + counters:
            proc.kill()
        cluster.run("delete", "-f", str(manifest), check=False)
        cluster.run("pod", "delete", "f-a", "f-b", "f-c", check=False)


async def test_redis_sigkill_allocations_unavailable_identities_kept(cluster: Cluster) -> None:
    """The supervisor is paused (SIGSTOP) while redis-server is dead, so that the gap is as
    long as the test needs; then it restarts Redis on its AOF."""
    bus = await Bus.connect(cluster.nats_url, "test-faults", retry_for=5)
    try:
        existing = await bus.request(
            subjects.IDENTITY_ALLOCATE, AllocateRequest(labels=["app=kept"]), AllocateReply
        )
        before = await bus.request(subjects.IDENTITY_LIST, Empty(), ListReply)
        supervisor = StateDir(cluster.state).supervisor_pid()
        assert supervisor
        victim = _pid(cluster, "redis-server")
        os.kill(supervisor, signal.SIGSTOP)
        try:
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            for labels in (["app=new-in-gap"], ["app=kept"]):
                with pytest.raises(Unavailable):
                    await bus.request(
                        subjects.IDENTITY_ALLOCATE, AllocateRequest(labels=labels), AllocateReply
                    )
            answered_in = time.monotonic() - killed
        finally:
            os.kill(supervisor, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:
            try:
                again = await bus.request(
                    subjects.IDENTITY_ALLOCATE, AllocateRequest(labels=["app=kept"]), AllocateReply
                )
                break
            except Unavailable:
                assert time.monotonic() < deadline, "identities did not come back after Redis"
                await asyncio.sleep(0.2)
        recovered = time.monotonic() - killed
        print(
            f"\nredis-server SIGKILL: allocations in the gap answered unavailable "
            f"(2 requests in {answered_in:.1f}s); allocation works {recovered:.1f}s after the kill"
        )
        assert again.identity == existing.identity and not again.new
        after = await bus.request(subjects.IDENTITY_LIST, Empty(), ListReply)
        assert after.identities == before.identities
    finally:
        await bus.close()


async def test_each_service_sigkilled_in_turn_under_traffic(
    cluster: Cluster, tmp_path: Path
) -> None:
    create_pod(cluster, "s-a", "app=f-a")
    b = create_pod(cluster, "s-b", "app=f-b", node=2)
    create_pod(cluster, "s-c", "app=f-c")
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(policy("s-allow", [9000]))
    cluster.run("apply", "-f", str(manifest))
    await asyncio.sleep(1.0)
    bip = str(b["ip"])
    victims = ["identity-1", "policy-1", "lb-1", "monitor-1", f"proxy-{cluster.nodes[1]}"]
    counters = [cluster.background("s-b", "count", str(p), "eof") for p in (9000, 9001)]
    senders = [
        cluster.background("s-a", "stream", bip, "9000", "800", "10"),
        cluster.background("s-c", "stream", bip, "9001", "800", "10"),
    ]
    bus = await Bus.connect(cluster.nats_url, "test-faults", retry_for=5)
    try:
        await asyncio.sleep(0.5)
        killed = time.monotonic()
        for name in victims:
            pid = _pid(cluster, name)
            assert pid, name
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
        while not await all_services_answer(bus, cluster.node_count):
            assert time.monotonic() - killed < 90, "services did not come back"
        recovered = time.monotonic() - killed
        allowed, denied = counted(senders, counters)
        print(
            f"\n{', '.join(victims)} SIGKILLed 0.5 s apart: allowed lost {800 - allowed}/800, "
            f"denied let through {denied}/800, all back {recovered:.1f}s after the first kill"
        )
        assert allowed == 800, f"allowed path lost {800 - allowed} datagrams"
        assert denied == 0, f"denied path let {denied} datagrams through"
    finally:
        await bus.close()
        for proc in senders + counters:
            proc.kill()
        cluster.run("delete", "-f", str(manifest), check=False)
        cluster.run("pod", "delete", "s-a", "s-b", "s-c", check=False)


FUZZ_SEED = 18


def fuzz_payloads(rng: random.Random) -> list[tuple[str, bytes]]:
    """Payloads no request type accepts (every payload is an object with an integer ``v``)."""
    return [
        ("random bytes", b"\xff" + rng.randbytes(200)),
        ("a list", b"[1, 2, 3]"),
        ("a number", b"42"),
        ("null", b"null"),
        ("wrong field types", b'{"v": "one", "labels": 5, "documents": "x", "name": 7}'),
        ("truncated", b'{"labels": ["k8s:app=x", "k8s:'),
        ("deep nesting", b"[" * 5000 + b"]" * 5000),
        ("oversized", b"[" + b"0," * 700_000 + b"0]"),  # 1.4 MB: past the bulk threshold
    ]


async def malformed_counts(bus: Bus) -> dict[str, float]:
    """membrane_bus_malformed_messages_total per service (its replicas summed)."""
    totals: dict[str, float] = {}
    for info in await bus.discover(timeout=0.5):
        if not info.endpoints:
            continue
        samples = await scrape(info.metadata["metrics"])
        totals[info.name] = totals.get(info.name, 0.0) + sum(
            value
            for (name, labels), value in samples.items()
            if name == "membrane_bus_malformed_messages_total" and labels[1] == info.name
        )
    return totals


async def test_malformed_requests_and_entries_under_traffic(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Fixed-seed junk to every endpoint of every service and into every bucket the services
    read, while packets flow: each request is answered invalid_argument and counted, no service
    exits, enforcement does not move, and no good entry changes."""
    create_pod(cluster, "z-a", "app=f-a")
    b = create_pod(cluster, "z-b", "app=f-b", node=2)
    create_pod(cluster, "z-c", "app=f-c")
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(policy("z-allow", [9000]))
    cluster.run("apply", "-f", str(manifest))
    await asyncio.sleep(1.0)
    bus = await Bus.connect(cluster.nats_url, "test-fuzz", retry_for=5)
    rng = random.Random(FUZZ_SEED)
    junk_keys = {
        bucket: key
        for bucket, key in (
            (subjects.KV_IDENTITIES, subjects.identity_key(65000)),
            (subjects.KV_RESOLVED, subjects.identity_key(65000)),
            (subjects.KV_SELECTORS, subjects.selector_key(999999)),
            (subjects.KV_NODES, "fuzz-node"),
            (subjects.KV_HEALTH, "fuzz-node"),
            (subjects.KV_ENDPOINTS, subjects.endpoint_key("fuzz-node", "default", "fuzz")),
            (subjects.KV_IPCACHE, subjects.ipcache_key(IPv4Address("10.250.0.9"), "fuzz-node")),
            (subjects.KV_NAMESPACES, "fuzz"),
            (subjects.KV_PODS, subjects.pod_key("default", "fuzz")),
            (subjects.KV_SERVICES, subjects.service_key("default", "fuzz")),
        )
    }
    bip = str(b["ip"])
    counters = [cluster.background("z-b", "count", str(p), "eof") for p in (9000, 9001)]
    senders = [
        cluster.background("z-a", "stream", bip, "9000", "300", "10"),
        cluster.background("z-c", "stream", bip, "9001", "300", "10"),
    ]
    try:
        before = await kv_counts(bus)
        malformed = await malformed_counts(bus)
        endpoints = {
            str(e["subject"]): info.name
            for info in await bus.discover(timeout=0.5)
            for e in info.endpoints
        }
        assert len(endpoints) >= 20, endpoints  # identity, policy, lb, monitor
        sent: dict[str, int] = {}
        for subject, service in sorted(endpoints.items()):
            for what, payload in fuzz_payloads(rng):
                reply = await bus.nc.request(subject, payload, timeout=10)
                headers = reply.headers or {}
                assert headers.get(MEMBRANE_CODE_HEADER) == "invalid_argument", (
                    subject,
                    what,
                    headers,
                    reply.data[:200],
                )
                sent[service] = sent.get(service, 0) + 1
        for bucket, key in junk_keys.items():
            await (await bus.kv(bucket)).put(key, b"\xff" + rng.randbytes(64))
        await asyncio.sleep(1.0)  # the watchers have read the junk
        assert await all_services_answer(bus, cluster.node_count)
        after = await malformed_counts(bus)
        assert {s: after[s] - malformed.get(s, 0) for s in sent} == sent
        allowed, denied = counted(senders, counters)
        print(
            f"\nfuzz (seed {FUZZ_SEED}): {sum(sent.values())} malformed requests to "
            f"{len(endpoints)} endpoints, all answered invalid_argument and counted; junk in "
            f"{len(junk_keys)} buckets; allowed lost {300 - allowed}/300, denied let through "
            f"{denied}/300"
        )
        assert allowed == 300 and denied == 0
        for bucket, key in junk_keys.items():
            await (await bus.kv(bucket)).delete(key)
        assert await kv_counts(bus) == before
    finally:
        await bus.close()
        for proc in senders + counters:
            proc.kill()
        cluster.run("delete", "-f", str(manifest), check=False)
        cluster.run("pod", "delete", "z-a", "z-b", "z-c", check=False)


def test_short_churn_soak_leaves_nothing_behind(cluster: Cluster) -> None:
    """bench/soak.py, briefly (the full 1,000 cycles are `make bench`): pods, policies and
    services created and deleted under traffic; every count back where it was, no datagram
    lost, no process restarted, no file descriptor kept."""
    result = subprocess.run(
        [
            *(sys.executable, str(REPO / "bench" / "soak.py"), "--state", str(cluster.state)),
            *("--cycles", "12", "--seconds", "40", "--warmup", "3", "--no-memory-check"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = json.loads(result.stdout)
    traffic = report["traffic"]
    print(
        f"\nsoak: {report['cycles']} cycles in {report['seconds']} s; moved {report['moved']}; "
        f"datagrams {traffic['received']}/{traffic['sent']}; restarts {report['restarts']}"
    )
    assert report["cycles"] >= 6, report
    assert report["moved"] == {}, report["moved"]
    assert report["fds_grown"] == {} and report["restarts"] == 0, report
    assert traffic["received"] == traffic["sent"], traffic
    assert result.returncode == 0, result.stderr[-2000:]


async def test_underlay_link_down_for_30s_under_traffic(cluster: Cluster, tmp_path: Path) -> None:
    """Node 2's underlay link (its bridge port) down for 30 s while a client probes an allowed
    path to its pod every 100 ms and another pod streams to a denied port: node 2 is marked
    dead within the documented time (heartbeat expiry, 15 s), traffic resumes once the link is
    back, nothing of node 2 is garbage-collected (the grace is 60 s) and nothing denied passes."""
    create_pod(cluster, "l-a", "app=f-a")
    b = create_pod(cluster, "l-b", "app=f-b", node=2)
    create_pod(cluster, "l-c", "app=f-c")
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(policy("l-allow", [9000]))
    cluster.run("apply", "-f", str(manifest))
    bip = str(b["ip"])
    server = cluster.background("l-b", "serve", "udp", "9000")
    counter = cluster.background("l-b", "count", "9001", "eof")
    denied_stream = cluster.background("l-c", "stream", bip, "9001", "4000", "10")
    port = f"{cluster.name}-u2"
    bus = await Bus.connect(cluster.nats_url, "test-link", retry_for=5)

    def answered() -> bool:
        return cluster.probe("l-a", "udp", bip, "9000", timeout=10).returncode == 0

    def node2_alive() -> bool:
        (node,) = [n for n in cluster.json("status")["nodes"] if n["name"] == cluster.nodes[1]]
        return bool(node["alive"])

    try:
        until(lambda: _true(answered()), "the allowed path answering before the fault")
        before = await kv_counts(bus)
        await asyncio.to_thread(set_link, port, "down")
        down = time.monotonic()
        try:
            while node2_alive():
                assert time.monotonic() - down < 25, "node 2 was not marked dead"
                await asyncio.sleep(0.5)
            marked = time.monotonic() - down
            assert not answered()
            await asyncio.sleep(max(0.0, 30 - (time.monotonic() - down)))
        finally:
            await asyncio.to_thread(set_link, port, "up")
        up_at = time.monotonic()
        while not answered():
            assert time.monotonic() - up_at < 30, "traffic did not resume after the link"
        resumed = time.monotonic() - up_at
        until(lambda: _true(node2_alive()), "node 2 alive again")
        denied_stream.communicate(timeout=60)
        denied = int(counter.communicate("", timeout=30)[0].split()[-1])
        after = await kv_counts(bus)
        print(
            f"\nunderlay link of node 2 down 30 s: marked dead after {marked:.1f}s, traffic "
            f"resumed {resumed:.1f}s after the link came back, denied let through {denied}/4000"
        )
        assert after == before, "entries were garbage-collected or left behind"
        assert cluster.json("pod", "get", "l-b")["ip"] == bip
        assert denied == 0
    finally:
        await bus.close()
        await asyncio.to_thread(set_link, port, "up")
        for proc in (server, counter, denied_stream):
            proc.kill()
        cluster.run("delete", "-f", str(manifest), check=False)
        cluster.run("pod", "delete", "l-a", "l-b", "l-c", check=False)


def set_link(name: str, state: str) -> None:
    subprocess.run(["ip", "link", "set", name, state], check=True)


def _true(condition: bool) -> None:
    assert condition
