"""The k8s bridge as it runs: ``membrane run k8s`` against the fake API server, with real
NATS, Redis, and the policy and lb services, each its own process.

What a watched object becomes is read back where ``membrane apply`` puts it (the policy and lb
services, the ``namespaces`` and ``pods`` buckets); a refused object comes back as an Event;
objects deleted while no bridge ran are gone after it starts again; of two replicas one holds
the Lease, and the other takes over when it dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from membrane.client import lb, policy
from membrane.servers import ServerProcess, terminate
from membrane.supervisor import die_with_parent
from shared import subjects
from shared.bus import Bus
from shared.messages import K8sStatus, NamespaceRecord, PodRecord
from tests.conftest import eventually, membrane_command, service_env
from tests.kubeapi.objects import cnp, pod
from tests.kubeapi.objects import namespace as ns
from tests.kubeapi.server import FakeKubeAPI, LoggedRequest

Obj = dict[str, Any]
RBAC = Path(__file__).resolve().parents[2] / "k8s" / "rbac.yaml"
Starter = Callable[..., subprocess.Popen[bytes]]
LEASE = {"lease_duration": "3", "renew_deadline": "2", "retry_period": "0.3"}


ALLOW_WEB = {
    "endpointSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}],
}
NETPOL = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "deny-all", "namespace": "shop"},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
}
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.50",
        "clusterIPs": ["10.96.0.50"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    },
}
SLICE = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-abc",
        "namespace": "shop",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}],
}


@pytest.fixture
def services(nats_server: ServerProcess, redis_server: ServerProcess) -> Iterator[None]:
    procs = [
        subprocess.Popen(
            membrane_command("run", name),
            env=service_env(nats_server, redis_server, replica=name),
            preexec_fn=die_with_parent,
        )
        for name in ("policy", "lb")
    ]
    yield
    terminate(procs)


@pytest.fixture
def bridges(
    kube_api: FakeKubeAPI,
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    tmp_path: Path,
) -> Iterator[Starter]:
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    started: list[subprocess.Popen[bytes]] = []

    def start(replica: str) -> subprocess.Popen[bytes]:
        env = service_env(
            nats_server,
            redis_server,
            replica=replica,
            kubeconfig=str(kubeconfig),
            watch_timeout="5",
            **LEASE,
        )
        proc = subprocess.Popen(membrane_command("run", "k8s"), env=env, preexec_fn=die_with_parent)
        started.append(proc)
        return proc

    yield start
    terminate(started)


async def synced(bus: Bus) -> K8sStatus:
    async def probe() -> K8sStatus:
        status = await bus.request(subjects.K8S_STATUS, msgspec.Struct(), K8sStatus, timeout=2)
        assert status.leader and status.synced and all(status.synced.values()), status
        return status

    return await eventually(probe, timeout=30, what="a synced leader", retry_on=(Exception,))


async def policy_keys(bus: Bus) -> set[str]:
    return {f"{p.kind}/{p.namespace}/{p.name}" for p in await policy.list_policies(bus)}


async def bucket(bus: Bus, name: str) -> dict[str, bytes]:
    return await Bus.snapshot(await bus.kv(name))


def lease_holder(kube_api: FakeKubeAPI) -> str:
    lease = kube_api.get("leases", "membrane", "membrane-k8s-bridge")
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


async def test_objects_reach_membrane_and_leave_it(
    kube_api: FakeKubeAPI, bus: Bus, services: None, bridges: Starter
) -> None:
    kube_api.create(ns("shop", team="payments"))
    kube_api.create(cnp("allow-web", "shop", ALLOW_WEB))
    kube_api.create(cnp("broken", "shop", {"endpointSelector": {}}))  # no rule list: refused
    kube_api.create(NETPOL)
    kube_api.create(SERVICE)
    kube_api.create(SLICE)
    kube_api.create(pod("web-1", "node-1", "shop", app="web", **{"pod-template-hash": "abc"}))
    bridge = bridges("bridge-a")
    status = await synced(bus)
    assert status.rejected == 1

    assert await policy_keys(bus) == {
        "CiliumNetworkPolicy/shop/allow-web",
        "NetworkPolicy/shop/deny-all",
    }
    web = await lb.get(bus, "shop", "web")
    assert web.source == "kubernetes"
    assert [(b.ip, b.port) for f in web.frontends for b in f.backends] == [("10.244.1.5", 8080)]
    namespaces = await bucket(bus, subjects.KV_NAMESPACES)
    shop = msgspec.json.decode(namespaces["shop"], type=NamespaceRecord)
    assert shop.labels["team"] == "payments"
    pods = await bucket(bus, subjects.KV_PODS)
    record = msgspec.json.decode(pods["shop.web-1"], type=PodRecord)
    assert (record.node, record.labels["app"]) == ("node-1", "web")

    # the refusal is on the object, where `kubectl describe cnp broken` shows it
    (event,) = [e for e in kube_api.items("events") if e["involvedObject"]["name"] == "broken"]
    assert event["type"] == "Warning" and event["reason"] == "Rejected"
    assert "ingress" in event["message"]

    # changes and deletes flow through the watch
    kube_api.apply(pod("web-1", "node-1", "shop", app="web", tier="front"))
    kube_api.delete("ciliumnetworkpolicies", "shop", "allow-web")

    async def followed() -> None:
        pods = await bucket(bus, subjects.KV_PODS)
        assert msgspec.json.decode(pods["shop.web-1"], type=PodRecord).labels.get("tier")
        assert await policy_keys(bus) == {"NetworkPolicy/shop/deny-all"}

    await eventually(followed, timeout=15, what="the watch's changes")

    # deleted while no bridge runs: gone once one runs again
    bridge.send_signal(signal.SIGKILL)
    bridge.wait()
    kube_api.delete("networkpolicies", "shop", "deny-all")
    kube_api.delete("services", "shop", "web")
    kube_api.delete("pods", "shop", "web-1")
    kube_api.compact()
    bridges("bridge-b")
    await synced(bus)

    async def forgotten() -> None:
        assert await policy_keys(bus) == set()
        assert "shop/web" not in {f"{s.namespace}/{s.name}" for s in await lb.list_services(bus)}
        assert "shop.web-1" not in await bucket(bus, subjects.KV_PODS)

    await eventually(forgotten, timeout=15, what="what vanished while no bridge ran gone")
    assert rbac_problems(kube_api.requests, load_rbac()) == []


def load_rbac() -> list[Obj]:
    return [d for d in yaml.safe_load_all(RBAC.read_text()) if d]


def rbac_problems(requests: list[LoggedRequest], rbac: list[Obj]) -> list[str]:
    """Every request the bridge made is granted by k8s/rbac.yaml, and every rule there is
    used: (group, resource, verb), and a Role's only in its namespace."""
    granted: dict[tuple[str, str, str], str] = {}  # -> "" (cluster-wide) or the namespace
    for doc in rbac:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        scope = doc["metadata"].get("namespace", "") if doc["kind"] == "Role" else ""
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted[(group, resource, verb)] = scope
    problems = []
    used = set()
    for request in requests:
        key = (request.group, request.resource, request.verb)
        scope = granted.get(key)
        if scope is None or (scope and request.namespace != scope):
            problems.append(f"not granted: {key} in {request.namespace or 'the cluster'}")
        used.add(key)
    problems += [f"granted but never used: {key}" for key in sorted(set(granted) - used)]
    return problems


def test_rbac_check_catches_a_missing_and_an_unused_grant() -> None:
    rbac = load_rbac()
    for doc in rbac:
        if doc["kind"] == "ClusterRole":
            doc["rules"][0]["verbs"] = ["list", "watch", "delete"]
    requests = [LoggedRequest("create", "", "events", "default", "x")]
    problems = rbac_problems(requests, rbac)
    assert "granted but never used: ('', 'pods', 'delete')" in problems
    requests.append(LoggedRequest("patch", "", "pods", "default", "x"))
    assert "not granted: ('', 'pods', 'patch') in default" in rbac_problems(requests, rbac)
    requests = [LoggedRequest("get", "coordination.k8s.io", "leases", "default", "x")]
    assert any("not granted" in p for p in rbac_problems(requests, rbac))


async def test_one_lease_holder_and_failover(
    kube_api: FakeKubeAPI, bus: Bus, services: None, bridges: Starter
) -> None:
    first = bridges("bridge-1")
    second = bridges("bridge-2")
    await synced(bus)
    holder = lease_holder(kube_api)
    assert holder in ("bridge-1", "bridge-2")
    # the other replica waits: its reflectors never listed anything
    lists = [r for r in kube_api.requests if r.verb == "list" and r.resource == "namespaces"]
    assert len(lists) == 1
    dead, survivor = (first, "bridge-2") if holder == "bridge-1" else (second, "bridge-1")
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()

    async def taken_over() -> None:
        assert lease_holder(kube_api) == survivor

    await eventually(taken_over, timeout=15, what="the survivor holding the lease")
    kube_api.create(cnp("after-failover", "default", ALLOW_WEB))

    async def applied() -> None:
        assert "CiliumNetworkPolicy/default/after-failover" in await policy_keys(bus)

    await eventually(applied, timeout=20, what="the new leader applying")
    lease = kube_api.get("leases", "membrane", "membrane-k8s-bridge")
    assert lease is not None and lease["spec"]["leaseTransitions"] == 1
