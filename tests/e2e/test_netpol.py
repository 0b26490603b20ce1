"""NetworkPolicy conformance on real packets: Kubernetes' netpol e2e cases on a 2-node cluster.

The pods, ports and probing are in ``netpol_world.py``; one cluster and one set of probe agents
serve the whole module, and every case deletes its policies when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.netpol_world import Reachability, World, manifest, world_pods

pytestmark = [pytest.mark.e2e, pytest.mark.root]

TCP80 = [("TCP", 80)]


@pytest.fixture(scope="module")
def world(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    scratch = tmp_path_factory.mktemp("netpol")
    pods = scratch / "pods.yaml"
    pods.write_text(manifest(cluster.nodes))
    cluster.run("apply", "-f", str(pods), timeout=120)
    w = World(cluster, world_pods(cluster))
    assert {p.node for p in w.pods} == set(cluster.nodes)
    try:
        w.start_agents(scratch)
        w.settle(Reachability(w.pods, True), [("TCP", 80), ("UDP", 80)], "before any policy")
        yield w
    finally:
        w.stop_agents()


def apply(world: World, tmp_path: Path, name: str, yaml: str) -> Path:
    """``membrane apply -f`` of ``yaml`` with ``$x_a``-style pod addresses filled in."""
    values = {f"{p.ns}_{p.name}": p.ip for p in world.pods}
    path = tmp_path / f"{name}.yaml"
    path.write_text(Template(yaml).substitute(values))
    world.cluster.run("apply", "-f", str(path))
    return path


def ipcache(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every node's ipcache map: node -> {cidr: (identity, tunnel endpoint)}."""
    tables = cluster.json("bpf", "ipcache")
    return {
        t["node"]: {r["cidr"]: (r["identity"], r["tunnel_endpoint"]) for r in t["rows"]}
        for t in tables
    }


# --- the regression of issue 14 ----------------------------------------------------------------


def test_an_except_naming_another_pods_address_never_takes_that_address(
    world: World, tmp_path: Path
) -> None:
    # A policy in x whose except names y/b (on the other node) rewrote y/b's ipcache entry into
    # a CIDR identity without a tunnel endpoint on x/a's node: from then on y/b could not talk
    # to any pod of that node, in any namespace, and deleting the policy deleted the entry.
    before = ipcache(world.cluster)
    y_b = world.pod("y/b")
    assert y_b.node != world.pod("x/a").node
    path = apply(
        world,
        tmp_path,
        "except-y-b",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-all-but-y-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{ipBlock: {cidr: 0.0.0.0/0, except: [$y_b/32]}}]
""",
    )
    # x/a is isolated (ipBlock selects no pod addresses in Cilium's meaning); nothing else is
    want = Reachability(world.pods, True).expect_all_ingress("x/a", False)
    world.settle(want, [("TCP", 80), ("UDP", 81)], "with the except naming y/b")
    assert ipcache(world.cluster) == before, "a policy changed who an address belongs to"
    world.cluster.run("delete", "-f", str(path))
    world.settle(Reachability(world.pods, True), TCP80, "after deleting the policy")
    assert ipcache(world.cluster) == before, "deleting the policy did not restore the ipcache"
