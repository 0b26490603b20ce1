"""Kubernetes objects change real packets: the bridge (``membrane run k8s``) between the fake
API server and a local cluster.

Pods are wired the way the CNI plugin has them wired (``endpoint.add`` on the node's agent),
with labels in the call that are NOT the pod's: the identity must come from the API's labels.
Then a CiliumNetworkPolicy created in the API decides real TCP connections between pods, a
label changed in the API moves a pod's identity (and its verdict), and a Service with an
EndpointSlice created in the API answers on its ClusterIP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.servers import terminate
from membrane.state import StateDir
from membrane.supervisor import die_with_parent
from shared.bus import Bus
from tests.conftest import membrane_command
from tests.e2e.cluster import Cluster, pod_info, until
from tests.kubeapi.objects import cnp, namespace, pod
from tests.kubeapi.server import FakeKubeAPI

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def api() -> Iterator[FakeKubeAPI]:
    server = FakeKubeAPI(bookmark_interval=1.0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bridge(
    cluster: Cluster, api: FakeKubeAPI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    kubeconfig = api.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")
    env = {
        **cluster.env(),
        "MEMBRANE_NATS_URL": cluster.nats_url,
        "MEMBRANE_KUBECONFIG": str(kubeconfig),
        "MEMBRANE_LOG_FORMAT": "json",
        "MEMBRANE_LEASE_DURATION": "3",
        "MEMBRANE_RENEW_DEADLINE": "2",
        "MEMBRANE_RETRY_PERIOD": "0.3",
    }
    proc = subprocess.Popen(membrane_command("run", "k8s"), env=env, preexec_fn=die_with_parent)
    yield proc
    terminate([proc])


def serve(cluster: Cluster, name: str, port: int) -> subprocess.Popen[str]:
    proc = cluster.background(name, "whoami", "tcp", str(port))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def connects(cluster: Cluster, client: str, ip: str, port: int) -> bool:
    return cluster.probe(client, "tcp", ip, str(port)).returncode == 0


def test_api_objects_decide_real_packets(
    cluster: Cluster, api: FakeKubeAPI, bridge: subprocess.Popen[bytes]
) -> None:
    node1, node2 = cluster.nodes
    api.create(namespace("default", team="k8s"))
    api.create(pod("k-srv", node1, app="web"))
    api.create(pod("k-cli", node2, app="client"))
    api.create(pod("k-other", node2, app="other"))

    def recorded() -> None:
        kv = _bucket_keys(cluster, "pods")
        assert {"default.k-srv", "default.k-cli", "default.k-other"} <= kv, kv

    until(recorded, "the bridge's pod records", timeout=60)
    # wired as the CNI plugin wires them: the call's labels are not the pod's
    for name, node in (("k-srv", node1), ("k-cli", node2), ("k-other", node2)):
        cluster.run("pod", "create", name, "--node", node, "--labels", "app=from-cni")
    srv = pod_info(cluster, "k-srv")
    assert srv["labels"] == {"app": "web"}  # the API's labels, not the CNI call's
    assert pod_info(cluster, "k-cli")["labels"] == {"app": "client"}

    server = serve(cluster, "k-srv", 8080)
    try:
        api.create(
            cnp(
                "web-from-client",
                spec={
                    "endpointSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [
                        {
                            "fromEndpoints": [{"matchLabels": {"app": "client"}}],
                            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}],
                        }
                    ],
                },
            )
        )

        def enforced() -> None:
            assert not connects(cluster, "k-other", srv["ip"], 8080)
            assert connects(cluster, "k-cli", srv["ip"], 8080)

        until(enforced, "the CNP from the API deciding connections", timeout=60)

        # a label changed in the API moves the pod's identity, and its verdict
        before = pod_info(cluster, "k-other")["identity"]
        api.apply(pod("k-other", node2, app="client"))

        def relabelled() -> None:
            other = pod_info(cluster, "k-other")
            assert other["labels"] == {"app": "client"} and other["identity"] != before
            assert connects(cluster, "k-other", srv["ip"], 8080)

        until(relabelled, "k-other's new identity allowed", timeout=60)

        # a Service and its EndpointSlice from the API answer on the ClusterIP
        info = StateDir(cluster.state).read_cluster()
        assert info is not None
        vip = str(ipaddress.IPv4Network(info.service_cidr)[77])
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "k-web", "namespace": "default"},
                "spec": {
                    "clusterIP": vip,
                    "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}],
                },
            }
        )
        api.create(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "k-web-1",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "k-web"},
                },
                "addressType": "IPv4",
                "ports": [{"port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [srv["ip"]], "conditions": {"ready": True}}],
            }
        )

        def answers() -> None:
            result = cluster.probe("k-cli", "tcp", vip, "80")
            assert result.returncode == 0 and srv["ip"] in result.stdout, result.stdout

        until(answers, "the ClusterIP answering", timeout=60)
    finally:
        server.terminate()
        server.wait()
        for name in ("k-srv", "k-cli", "k-other"):
            cluster.run("pod", "delete", name, check=False)


def _bucket_keys(cluster: Cluster, bucket: str) -> set[str]:
    async def keys() -> set[str]:
        bus = await Bus.connect(cluster.nats_url, "test", retry_for=5)
        try:
            return set(await Bus.snapshot(await bus.kv(bucket)))
        finally:
            await bus.close()

    return asyncio.run(keys())


PLUGIN = Path(__file__).resolve().parents[2] / "build" / "membrane-cni"


def test_compiled_cni_plugin_wires_a_pod_with_its_api_labels(
    cluster: Cluster, api: FakeKubeAPI, bridge: subprocess.Popen[bytes]
) -> None:
    """The static plugin (cni/membrane-cni.c, built by make setup) forwards ADD/CHECK/DEL to a
    real agent; the pod is named by CNI_ARGS and labelled from the API."""
    assert PLUGIN.is_file(), "build/membrane-cni is built by `make setup`"
    node = cluster.nodes[0]
    api.apply(pod("k-cni", node, app="cni-web"))
    until(lambda: _has_key(cluster, "pods", "default.k-cni"), "the pod's record", timeout=60)
    netns_name = f"{cluster.name}-kcni"
    subprocess.run(["ip", "netns", "add", netns_name], check=True)
    # the node's agent wrote its conflist once it served; the runtime hands the plugin its entry
    conflist = json.loads((cluster.state / "cni" / node / "05-membrane.conflist").read_text())
    (entry,) = conflist["plugins"]
    assert entry["agentSocket"] == f"/run/membrane/{node}/agent.sock"
    config = json.dumps({"cniVersion": conflist["cniVersion"], "name": conflist["name"], **entry})
    base = {
        "PATH": os.environ["PATH"],  # nothing of the virtualenv: the runtime's environment
        "CNI_CONTAINERID": "k0ffee",
        "CNI_NETNS": f"/run/netns/{netns_name}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=k-cni",
        "CNI_PATH": "/opt/cni/bin",
        "MEMBRANE_AGENT_SOCKET": f"/run/membrane/{node}/agent.sock",
    }

    def plugin(command: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(PLUGIN)],
            input=config,
            env={**base, "CNI_COMMAND": command, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        version = plugin("VERSION")
        assert (
            version.returncode == 0 and "1.0.0" in json.loads(version.stdout)["supportedVersions"]
        )
        added = plugin("ADD")
        assert added.returncode == 0, added.stdout + added.stderr
        address = json.loads(added.stdout)["ips"][0]["address"]
        wired = pod_info(cluster, "k-cni")
        assert wired["ip"] == address.split("/")[0]
        assert wired["labels"] == {"app": "cni-web"}  # from the API, the call carried none
        assert plugin("CHECK").returncode == 0
        wrong = plugin("CHECK", CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=other")
        assert wrong.returncode == 1 and json.loads(wrong.stdout)["code"] == 100
        invalid = plugin("ADD", CNI_NETNS="")
        assert invalid.returncode == 1 and json.loads(invalid.stdout)["code"] == 4
        assert plugin("DEL").returncode == 0
        assert plugin("DEL").returncode == 0  # idempotent
        assert "k-cni" not in [p["name"] for p in cluster.json("pod", "list", "-A")]
        away = plugin("ADD", MEMBRANE_AGENT_SOCKET="/run/membrane/nowhere/agent.sock")
        assert away.returncode == 1 and json.loads(away.stdout)["code"] == 11
    finally:
        plugin("DEL")
        subprocess.run(["ip", "netns", "del", netns_name], check=False)


def _has_key(cluster: Cluster, bucket: str, key: str) -> None:
    assert key in _bucket_keys(cluster, bucket)


def test_conflist_exists_only_while_the_agent_serves(cluster: Cluster) -> None:
    """A node's agent stopped (SIGTERM, the supervisor paused so that none replaces it) removes
    its conflist before it exits, so the runtime stops calling the plugin; the next agent writes
    it again only once its socket answers. Runs last: it restarts a node's agent."""
    node = cluster.nodes[-1]
    conflist = cluster.state / "cni" / node / "05-membrane.conflist"
    agent_socket = f"/run/membrane/{node}/agent.sock"
    assert conflist.is_file() and _answers(agent_socket)
    supervisor = StateDir(cluster.state).supervisor_pid()
    agent = next(p.pid for p in StateDir(cluster.state).processes() if p.name == f"datapath-{node}")
    assert supervisor and agent
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(agent, signal.SIGTERM)
        # a child of the stopped supervisor: it stays a zombie until the supervisor reaps it
        until(lambda: _exited(agent), "the agent's exit", timeout=60)
        assert not conflist.exists(), "the conflist outlived its agent"
        assert not _answers(agent_socket)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    # the replacement: from the first moment its conflist exists, its socket answers
    deadline = time.monotonic() + 180
    while not conflist.exists():
        assert time.monotonic() < deadline, "no new agent wrote the conflist"
        time.sleep(0.01)
    assert _answers(agent_socket), "the conflist was written before the agent served"


def _exited(pid: int) -> None:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return
    assert state == "Z", f"state {state}"


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        try:
            client.connect(path)
        except OSError:
            return False
    return True
