"""A compromised node cannot shadow a peer's pod in the ipcache (issue 18), on `membrane up`.

Node 1's own agent credential (from the state directory) writes, under node 1's keys -- the
only ones nats-server lets it write --, an ipcache entry for the server pod of node 2, naming
node 1 and the client's identity. Its key sorts before node 2's, so a reader picking the
smallest key would believe it. Every agent's BPF ipcache keeps node 2's entry, every agent,
proxy and monitor counts the forged entry in ``membrane_ipcache_entries_refused_total`` and the
agents log it with node and address; the client still reaches the server.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

import msgspec
import pytest

from membrane import credentials
from membrane.state import StateDir
from shared import roles, subjects
from shared.bus import Bus
from shared.messages import IPCacheEntry, Node
from tests.conftest import eventually, scrape
from tests.e2e.cluster import Cluster, create_pod

pytestmark = [pytest.mark.e2e, pytest.mark.root]

READERS = {
    "membrane-datapath": "datapath",
    "membrane-proxy": "proxy",
    "membrane-monitor": "monitor",
}


def ipcache_row(cluster: Cluster, address: str) -> dict[str, tuple[int, str]]:
    """node -> (identity, tunnel endpoint) of ``address`` in its BPF ipcache."""
    return {
        table["node"]: (int(row["identity"]), str(row["tunnel_endpoint"]))
        for table in cluster.json("bpf", "ipcache")
        for row in table["rows"]
        if row["cidr"] == f"{address}/32"
    }


async def refused(bus: Bus) -> dict[str, float]:
    """Each reader process's count of entries refused for lying outside the pod CIDR."""
    counts: dict[str, float] = {}
    for info in await bus.discover(timeout=0.5):
        reader = READERS.get(info.name)
        if reader is None:
            continue
        samples = await scrape(info.metadata["metrics"])
        key = ("membrane_ipcache_entries_refused_total", (reader, "outside_pod_cidr"))
        counts[f"{info.name}/{info.id}"] = samples.get(key, 0.0)
    return counts


def agent_url(cluster: Cluster, node: str) -> str:
    state = StateDir(cluster.state)
    info = state.read_cluster()
    assert info is not None
    cred = credentials.load(state)[
        credentials.service_user(roles.role_of_service("datapath"), node)
    ]
    return credentials.url_for(info, cred)


async def test_a_node_cannot_shadow_a_peers_pod(cluster: Cluster) -> None:
    node1, node2 = cluster.nodes
    client = create_pod(cluster, "ia-client", "app=ia-client", node=1)
    server = create_pod(cluster, "ia-server", "app=ia-server", node=2)
    address = str(server["ip"])
    listener = cluster.background("ia-server", "serve", "tcp", "80")
    admin = await Bus.connect(cluster.nats_url, "test-admin", retry_for=5)
    forger = await Bus.connect(agent_url(cluster, node1), "test-forger", retry_for=5)
    forged_key = subjects.ipcache_key(IPv4Address(address), node1)
    try:
        nodes = await admin.kv(subjects.KV_NODES)
        underlay: dict[str, str] = {
            n: msgspec.json.decode((await nodes.get(n)).value or b"", type=Node).underlay_ip
            for n in (node1, node2)
        }

        async def believed() -> dict[str, tuple[int, str]]:
            rows = ipcache_row(cluster, address)
            assert rows == {n: (int(server["identity"]), underlay[node2]) for n in (node1, node2)}
            return rows

        await eventually(believed, timeout=30, what="the server in every agent's ipcache")
        assert cluster.probe("ia-client", "tcp", address, "80").returncode == 0
        before = await refused(admin)
        assert len([r for r in before if "datapath" in r]) == 2, before
        assert len([r for r in before if "proxy" in r]) == 2, before
        assert any("monitor" in r for r in before), before

        # node 1's agent credential: its own key, node 2's pod address, the client's identity
        forged = IPCacheEntry(f"{address}/32", int(client["identity"]), node1, underlay[node1])
        await (await forger.kv(subjects.KV_IPCACHE)).put(forged_key, msgspec.json.encode(forged))

        async def counted() -> None:
            assert await refused(admin) == {r: count + 1 for r, count in before.items()}

        await eventually(counted, timeout=30, what="every reader to count the forged entry")
        await asyncio.sleep(0.5)  # nothing else comes of it
        await believed()
        for node in (node1, node2):
            log = (StateDir(cluster.state).logs / f"datapath-{node}.log").read_text()
            assert any(
                "ipcache entry ignored" in line and address in line and node1 in line
                for line in log.splitlines()
            ), f"no log line of {node}'s agent names the node and the address"
        assert cluster.probe("ia-client", "tcp", address, "80").returncode == 0
    finally:
        await (await forger.kv(subjects.KV_IPCACHE)).delete(forged_key)
        await forger.close()
        await admin.close()
        listener.kill()
        cluster.run("pod", "delete", "ia-client", "ia-server", check=False)
