"""k8s/ as a whole: valid for the Kubernetes versions we support, every control-plane service
deployable and scalable on its own, and each container configured with its own settings."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from membrane.registry import SERVICES
from tests.unit.test_k8s_manifests import (
    K8S,
    containers,
    load_docs,
    pod_labels,
    selects,
    settings_env_problems,
)

ROOT = Path(__file__).resolve().parents[2]
# the oldest and newest minor versions the manifests are checked against
OLDEST, NEWEST = "1.29.0", "1.37.0"
Doc = dict[str, Any]
DOCS = load_docs(K8S)
# deployment name -> the service it runs; the bridge is leader-elected, so it has no HPA
CONTROL_PLANE = {
    "identity": "identity",
    "policy": "policy",
    "lb": "lb",
    "monitor": "monitor",
    "k8s-bridge": "k8s",
}
NO_HPA = {"k8s-bridge"}


def of_kind(kind: str) -> list[Doc]:
    return [d for d in DOCS if d["kind"] == kind]


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_every_manifest_validates_strictly(version: str) -> None:
    for doc in DOCS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_an_unknown_field() -> None:
    deployment = copy.deepcopy(of_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, NEWEST, strict=True)


@pytest.mark.parametrize("name", sorted(CONTROL_PLANE))
def test_each_service_is_deployed_exposed_protected_and_scaled(name: str) -> None:
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == name]
    labels = pod_labels(deployment)
    (container,) = containers(deployment)
    service = CONTROL_PLANE[name]
    assert container["args"] == ["run", service]
    assert settings_env_problems(container, SERVICES[service].settings) == []
    assert any(selects(s["spec"]["selector"], labels) for s in of_kind("Service"))
    assert any(
        selects(p["spec"]["selector"]["matchLabels"], labels)
        for p in of_kind("PodDisruptionBudget")
    )
    scalers = [
        h
        for h in of_kind("HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]
        == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    ]
    if name in NO_HPA:
        assert scalers == []
        return
    (scaler,) = scalers
    assert scaler["apiVersion"] == "autoscaling/v2"
    assert scaler["spec"]["minReplicas"] >= 2
    assert scaler["spec"]["maxReplicas"] > scaler["spec"]["minReplicas"]


def test_the_bridge_runs_with_its_service_account_and_a_token() -> None:
    (bridge,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "k8s-bridge"]
    spec = bridge["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "k8s-bridge"
    assert spec["automountServiceAccountToken"] is True
    assert bridge["spec"]["replicas"] == 2
    bindings = [b for b in DOCS if b["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert all(b["subjects"][0]["name"] == "k8s-bridge" for b in bindings)
    # no other workload can call the API
    for deployment in of_kind("Deployment"):
        if deployment is not bridge:
            assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_namespace_enforces_a_pod_security_level() -> None:
    (namespace,) = of_kind("Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] in ("restricted", "baseline", "privileged")


def host_path_of(workload: Doc, container: Doc, mount_path: str) -> str:
    """The host directory mounted at ``mount_path`` in ``container``."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    return str(volume["hostPath"]["path"])


def test_the_agent_runs_on_every_node_with_what_it_needs() -> None:
    (agent,) = of_kind("DaemonSet")
    spec = agent["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    container, proxy = spec["containers"]
    assert container["args"] == ["run", "datapath"]
    assert settings_env_problems(container, SERVICES["datapath"].settings) == []
    env = {e["name"]: e for e in container["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    conf_dir = env["MEMBRANE_CNI_CONF_DIR"]["value"]
    assert host_path_of(agent, container, conf_dir) == "/etc/cni/net.d"
    for path in ("/sys/fs/bpf", "/run/netns", "/run/membrane", "/lib/modules", "/usr/src"):
        assert host_path_of(agent, container, path) == path
    # the plugin the Dockerfile builds goes where the runtime looks for plugins
    init = {c["name"]: c for c in spec["initContainers"]}
    install = init["install-cni"]
    source, target = install["command"][1:]
    assert source in (ROOT / "Dockerfile").read_text()
    assert host_path_of(agent, install, str(Path(target).parent)) == "/opt/cni/bin"
    assert Path(target).name == "membrane-cni"
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    # a privileged non-root process has no capabilities: the agent must run as root
    assert container["securityContext"]["runAsUser"] == 0
    # the headers are linked before the agent starts, in the host's trees at the same paths
    headers = init["kernel-headers"]
    assert headers["command"] == ["/opt/membrane/bin/membrane-kernel-headers"]
    assert list(init) == ["kernel-headers", "install-cni"]
    for path in ("/lib/modules", "/usr/src"):
        assert host_path_of(agent, headers, path) == path
    # the node's L7 proxy beside it, in the host's namespace: L7 rules are enforced there (with
    # no proxy their connections are dropped); the agent's socket for learned DNS addresses
    assert proxy["args"] == ["run", "proxy"]
    assert settings_env_problems(proxy, SERVICES["proxy"].settings) == []
    proxy_env = {e["name"]: e for e in proxy["env"]}
    assert proxy_env["MEMBRANE_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert host_path_of(agent, proxy, "/run/membrane") == "/run/membrane"
    context = proxy["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert context["runAsUser"] == 0 and not context.get("privileged")
    assert proxy["readinessProbe"]["httpGet"]["port"] == "proxy-metrics"


def test_only_the_agent_is_privileged() -> None:
    for workload in [*of_kind("Deployment"), *of_kind("StatefulSet"), *of_kind("DaemonSet")]:
        spec = workload["spec"]["template"]["spec"]
        privileged = spec.get("hostNetwork") or any(
            (c.get("securityContext") or {}).get("privileged") for c in containers(workload)
        )
        assert bool(privileged) == (workload["kind"] == "DaemonSet"), workload["metadata"]["name"]
