"""Faults under traffic: the bus (nats-server) killed with SIGKILL while packets flow on an
allowed and on a denied path, as the agent-restart test does for the agent. Figures are printed
(`pytest -s`) as well as asserted: packets lost, packets wrongly let through, recovery time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from membrane.registry import SERVICES
from membrane.state import StateDir
from shared import roles, subjects
from shared.bus import Bus
from shared.errors import Unavailable
from shared.messages import AllocateReply, AllocateRequest, Empty, ListReply
from tests.e2e.cluster import Cluster, counted, create_pod

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
        await asyncio.sleep(1.0)
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
            counter = cluster.background("f-b", "count", "9001", "2")
            sender = cluster.background("f-a", "stream", bip, "9001", "50", "10")
            got = int(counter.communicate(timeout=20)[0].split()[-1])
            sender.communicate(timeout=20)
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
