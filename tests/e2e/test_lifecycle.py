"""What a user sees matches what exists: `pod exec` as documented, processes started in a pod
die with it, and `down`/`up` with fewer nodes leave no ghost node or pod behind."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator
from ipaddress import IPv4Network
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from membrane.servers import LOOPBACK, NatsServer, ServerProcess
from membrane.state import Plan, StateDir
from shared import subjects
from shared.bus import Bus, flush_connection
from shared.messages import Endpoint, Node
from tests.conftest import membrane_command
from tests.e2e.cluster import Cluster, up

pytestmark = pytest.mark.e2e


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_pod_exec_takes_its_options_after_the_pod_name(cluster: Cluster) -> None:
    cluster.run("pod", "create", "ex1", "-n", "lifecycle", "--labels", "app=ex")
    after = cluster.run("pod", "exec", "ex1", "-n", "lifecycle", "--", "cat", "/proc/net/dev")
    before = cluster.run("pod", "exec", "-n", "lifecycle", "ex1", "--", "cat", "/proc/net/dev")
    assert "eth0" in after.stdout and after.stdout == before.stdout
    unknown = cluster.run("pod", "exec", "ex1", "--bogus", "--", "true", check=False)
    assert unknown.returncode == 1 and "'--bogus'" in unknown.stderr
    cluster.run("pod", "delete", "ex1", "-n", "lifecycle")


def test_processes_started_with_pod_exec_die_with_the_pod(cluster: Cluster) -> None:
    cluster.run("pod", "create", "ex2", "--labels", "app=ex2")
    # a server left running in the background, as a user starts one, and a foreground one
    started = cluster.run(
        "pod", "exec", "ex2", "--", "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"
    )
    background = int(started.stdout.strip())
    foreground = subprocess.Popen(
        membrane_command("pod", "exec", "ex2", "--", "sleep", "300"), env=cluster.env()
    )
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{foreground.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "pod exec did not start its command"
            time.sleep(0.05)
        assert alive(background)
        cluster.run("pod", "delete", "ex2")
        assert foreground.wait(timeout=10) == -9
        deadline = time.monotonic() + 10
        while alive(background):
            assert time.monotonic() < deadline, "a process started in the pod outlived it"
            time.sleep(0.05)
    finally:
        foreground.kill()
        foreground.wait()


async def test_services_run_as_their_roles_and_a_subscriber_only_reads(cluster: Cluster) -> None:
    state = StateDir(cluster.state)
    plan = msgspec.json.decode(state.plan_file.read_bytes(), type=Plan)
    users = {
        p.name: urllib.parse.urlsplit(p.env["MEMBRANE_NATS_URL"]).username
        for p in plan.processes
        if "MEMBRANE_NATS_URL" in p.env
    }
    assert users == {
        "identity-1": "identity",
        "policy-1": "policy",
        "lb-1": "lb",
        "monitor-1": "monitor",
        "ui-1": "ui",
        **{f"datapath-{node}": f"datapath-{node}" for node in cluster.nodes},
        **{f"proxy-{node}": f"proxy-{node}" for node in cluster.nodes},
    }
    assert (cluster.state / "credentials.json").stat().st_mode & 0o077 == 0
    created = cluster.json("credentials", "create", "dash", "--role", "subscriber")
    assert created["role"] == "subscriber"
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    # the URL of a TLS cluster names its CA (?ca=), which nats-py alone does not read
    url, _, query = created["url"].partition("?")
    assert url.startswith("tls://")
    ca = ssl.create_default_context(cafile=urllib.parse.parse_qs(query)["ca"][0])
    nc = await nats.connect(url, error_cb=on_error, inbox_prefix="_INBOX.dash", tls=ca)
    try:
        flows: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_flow(msg: Msg) -> None:
            flows.put_nowait(msg.data)

        await nc.subscribe(subjects.EVENTS_FLOW_BATCHES_ALL, cb=on_flow)
        await flush_connection(nc)  # nats.py's own flush may overtake the SUB
        cluster.run("pod", "create", "sub1", "--labels", "app=sub1")
        target = cluster.json("pod", "create", "sub2", "--labels", "app=sub2")["ip"]
        cluster.run("pod", "exec", "sub1", "--", "ping", "-c1", "-W1", target, check=False)
        batch = await asyncio.wait_for(flows.get(), 15)
        flow = msgspec.json.decode(batch.splitlines()[0])
        assert flow["verdict"] in ("FORWARDED", "DROPPED")
        with pytest.raises(nats.errors.Error):
            await nc.request(subjects.IDENTITY_ALLOCATE, b"{}", timeout=1)
        await nc.publish("$KV.resolved.256", b"{}")
        await flush_connection(nc)
        for _ in range(100):  # the server's error comes on the client's own task
            if any('publish to "$kv.resolved.256"' in e for e in errors):
                break
            await asyncio.sleep(0.05)
        assert any('publish to "$kv.resolved.256"' in e for e in errors), errors
        assert "dash" in cluster.run("credentials", "list").stdout
        cluster.run("credentials", "revoke", "dash")
        deadline = time.monotonic() + 10
        while not nc.is_closed and not nc.is_reconnecting:
            assert time.monotonic() < deadline, "a revoked credential kept its connection"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
        cluster.run("pod", "delete", "sub1", "sub2", check=False)


@contextlib.asynccontextmanager
async def stored_bus(state: Path) -> AsyncIterator[Bus]:
    """The cluster's NATS data, served by a nats-server of the test's own on loopback (the
    cluster's listened on the bridge that `down` removed)."""
    info = StateDir(state).read_cluster()
    assert info is not None
    server = ServerProcess(
        "nats-server", NatsServer(state / "nats", host=LOOPBACK, password=info.nats_password)
    )
    server.start()
    try:
        bus = await Bus.connect(server.url, "test-lifecycle", retry_for=5)
        try:
            yield bus
        finally:
            await bus.close()
    finally:
        server.stop()


async def test_down_deregisters_and_up_with_fewer_nodes_forgets_the_rest(
    cluster: Cluster,
) -> None:
    """Runs last: it leaves the module's cluster with one node."""
    node2 = cluster.nodes[1]
    cluster.run("pod", "create", "ghost", "--labels", "app=ghost", "--node", node2)
    cluster.run("down")
    async with stored_bus(cluster.state) as bus:
        for bucket in (subjects.KV_NODES, subjects.KV_ENDPOINTS, subjects.KV_HEALTH):
            assert await Bus.snapshot(await bus.kv(bucket)) == {}, bucket
        # what a `down` of an earlier version left: node-2 registered, alive, with a pod
        ghost_node = Node(
            name=node2,
            underlay_ip="172.31.0.12",
            pod_cidr="10.1.2.0/24",
            router_ip="10.1.2.1",
            heartbeat=time.time() + 600,
        )
        await (await bus.kv(subjects.KV_NODES)).put(node2, msgspec.json.encode(ghost_node))
        ghost_pod = Endpoint(
            namespace="default", name="ghost", node=node2, ip="10.1.2.5", identity=300, labels={}
        )
        await (await bus.kv(subjects.KV_ENDPOINTS)).put(
            subjects.endpoint_key(node2, "default", "ghost"), msgspec.json.encode(ghost_pod)
        )

    info = StateDir(cluster.state).read_cluster()
    assert info is not None
    octet = IPv4Network(info.underlay_cidr).network_address.packed[2]
    cluster.node_count = 1
    await asyncio.to_thread(up, cluster, octet)
    status = cluster.json("status")
    assert [n["name"] for n in status["nodes"]] == [cluster.nodes[0]]
    assert [p["name"] for p in cluster.json("pod", "list", "-A")] == []
    created = cluster.json("pod", "create", "again", "--labels", "app=again")
    assert created["node"] == cluster.nodes[0]
