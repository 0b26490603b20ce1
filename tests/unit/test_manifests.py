"""shared.manifests: parsing, Kubernetes validation and Deployment expansion, on plain text."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from shared import kube_yaml
from shared.errors import InvalidArgument
from shared.manifests import (
    NAMESPACE_NAME_LABEL,
    POD_TEMPLATE_HASH_LABEL,
    DeploymentDoc,
    ManifestError,
    NamespaceDoc,
    PodDoc,
    Reader,
    RoutedDoc,
    _suffix,
    expand_deployment,
    load,
    pieces,
    template_hash,
)
from shared.messages import ContainerPort

SAFE = "bcdfghjklmnpqrstvwxz2456789"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

MULTI = """\
apiVersion: v1
kind: Namespace
metadata:
  name: prod
  labels: {team: payments}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: prod
  labels: {app: web, app.kubernetes.io/part-of: shop}
spec:
  serviceAccountName: web-sa
  nodeName: node-1
  containers:
  - name: nginx
    image: nginx
    ports:
    - {containerPort: 80, name: http}
    - {containerPort: 53, protocol: UDP, name: dns}
  - name: sidecar
    ports:
    - containerPort: 9090
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: prod}
spec:
  replicas: 3
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels: {app: api, tier: backend}
    spec:
      containers:
      - name: api
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-web, namespace: prod}
spec: {endpointSelector: {matchLabels: {app: web}}}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cluster-wide}
spec: {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all}
spec: {podSelector: {}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec: {ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: prod}
addressType: IPv4
endpoints: []
"""


def pod(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
    }
    doc.update(overrides)
    return doc


def deployment(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "api"}},
        "template": {
            "metadata": {"labels": {"app": "api"}},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]},
        },
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api"},
        "spec": spec,
    }


def dump(*docs: Any) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def edit(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with the dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    out = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


DELETE = object()


def load_error(text: str, source: str = "-") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        load(text, source)
    return info.value


def load_one(doc: dict[str, Any]) -> Any:
    (result,) = load(dump(doc), "-")
    return result


# --- loading what is valid --------------------------------------------------------------------


def test_multi_document_file_gives_one_typed_document_each_in_order() -> None:
    docs = load(MULTI, "manifest.yaml")
    assert [type(d).__name__ for d in docs] == [
        "NamespaceDoc",
        "PodDoc",
        "DeploymentDoc",
        *["RoutedDoc"] * 5,
    ]


def test_namespace_gets_its_name_label() -> None:
    ns = load(MULTI, "-")[0]
    assert ns == NamespaceDoc(
        name="prod", labels={"team": "payments", NAMESPACE_NAME_LABEL: "prod"}
    )


def test_namespace_name_label_overrides_the_users_value() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "prod", "labels": {NAMESPACE_NAME_LABEL: "other"}},
    }
    assert load_one(doc).labels == {NAMESPACE_NAME_LABEL: "prod"}


def test_pod_fields() -> None:
    web = load(MULTI, "-")[1]
    assert web == PodDoc(
        namespace="prod",
        name="web",
        labels={"app": "web", "app.kubernetes.io/part-of": "shop"},
        service_account="web-sa",
        ports=(
            ContainerPort(port=80, protocol="TCP", name="http"),
            ContainerPort(port=53, protocol="UDP", name="dns"),
            ContainerPort(port=9090, protocol="TCP", name=""),
        ),
        node_name="node-1",
        owner="",
    )


def test_pod_defaults() -> None:
    doc = pod(spec={"containers": [{"name": "c"}]})
    del doc["metadata"]["labels"]
    assert load_one(doc) == PodDoc(
        namespace="default", name="web", labels={}, service_account="default", ports=()
    )


def test_deprecated_service_account_is_used_when_service_account_name_is_absent() -> None:
    doc = edit(pod(), "spec.serviceAccount", "legacy")
    assert load_one(doc).service_account == "legacy"
    both = edit(doc, "spec.serviceAccountName", "current")
    assert load_one(both).service_account == "current"


def test_null_label_value_is_the_empty_string_as_in_kubernetes() -> None:
    text = (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: w\n  labels: {flag: }\n"
        "spec: {containers: [{name: c}]}\n"
    )
    (doc,) = load(text, "-")
    assert isinstance(doc, PodDoc)
    assert doc.labels == {"flag": ""}


def test_deployment_fields() -> None:
    api = load(MULTI, "-")[2]
    assert api == DeploymentDoc(
        namespace="prod",
        name="api",
        replicas=3,
        selector={"app": "api"},
        template=PodDoc(
            namespace="prod",
            name="",
            labels={"app": "api", "tier": "backend"},
            service_account="default",
            ports=(ContainerPort(port=8080, protocol="TCP", name="http"),),
        ),
    )


def test_deployment_replicas_default_to_one_and_zero_is_allowed() -> None:
    doc = deployment()
    del doc["spec"]["replicas"]
    assert load_one(doc).replicas == 1
    assert load_one(edit(doc, "spec.replicas", None)).replicas == 1
    assert load_one(edit(doc, "spec.replicas", 0)).replicas == 0


def test_deployment_template_namespace_and_name_are_ignored() -> None:
    doc = edit(deployment(), "metadata.namespace", "prod")
    doc = edit(doc, "spec.template.metadata.namespace", "elsewhere")
    doc = edit(doc, "spec.template.metadata.name", "ignored")
    result = load_one(doc)
    assert result.template.namespace == "prod"
    assert result.template.name == ""


def test_deployment_selector_with_match_expressions_that_match() -> None:
    doc = edit(
        deployment(),
        "spec.selector.matchExpressions",
        [{"key": "app", "operator": "In", "values": ["api", "web"]}],
    )
    assert load_one(doc).selector == {"app": "api"}
    only_expressions = edit(doc, "spec.selector.matchLabels", DELETE)
    assert load_one(only_expressions).selector == {}


@pytest.mark.parametrize(
    ("index", "service", "kind", "api_version", "namespace", "name"),
    [
        (3, "policy", "CiliumNetworkPolicy", "cilium.io/v2", "prod", "allow-web"),
        (4, "policy", "CiliumClusterwideNetworkPolicy", "cilium.io/v2", "", "cluster-wide"),
        (5, "policy", "NetworkPolicy", "networking.k8s.io/v1", "default", "deny-all"),
        (6, "lb", "Service", "v1", "prod", "web"),
        (7, "lb", "EndpointSlice", "discovery.k8s.io/v1", "prod", "web-abc"),
    ],
)
def test_routed_kinds(
    index: int, service: str, kind: str, api_version: str, namespace: str, name: str
) -> None:
    doc = load(MULTI, "-")[index]
    assert isinstance(doc, RoutedDoc)
    assert (doc.service, doc.kind, doc.api_version, doc.namespace, doc.name) == (
        service,
        kind,
        api_version,
        namespace,
        name,
    )
    assert doc.body == list(yaml.safe_load_all(MULTI))[index]


def test_routed_body_is_not_validated_beyond_routing() -> None:
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p", "labels": {"version": 1}, "bogus": True},
        "spec": "whatever the policy service makes of it",
        "extra": [1, 2],
    }
    assert load_one(doc).body == doc


def test_cluster_scoped_routed_kind_ignores_a_namespace() -> None:
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "p", "namespace": "Not_Valid"},
    }
    assert load_one(doc).namespace == ""


def test_timestamps_stay_strings_as_kubectl_reads_them() -> None:
    text = (
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n"
        "  creationTimestamp: 2024-01-02T03:04:05Z\n"
    )
    (doc,) = load(text, "-")
    assert isinstance(doc, RoutedDoc)
    assert doc.body["metadata"]["creationTimestamp"] == "2024-01-02T03:04:05Z"


def test_empty_text_and_empty_documents_give_nothing() -> None:
    assert load("", "-") == []
    assert load("---\n# only a comment\n---\n...\n", "-") == []


def test_list_items_are_read_in_place() -> None:
    items = [pod(), edit(pod(), "metadata.name", "db")]
    text = dump({"apiVersion": "v1", "kind": "List", "items": items}, deployment())
    docs = load(text, "-")
    assert [type(d).__name__ for d in docs] == ["PodDoc", "PodDoc", "DeploymentDoc"]
    assert [d.name for d in docs] == ["web", "db", "api"]


def test_empty_list_gives_nothing() -> None:
    assert load(dump({"apiVersion": "v1", "kind": "List", "items": []}), "-") == []


def test_same_name_in_other_namespace_or_kind_is_no_duplicate() -> None:
    docs = [
        pod(),
        edit(pod(), "metadata.namespace", "prod"),
        edit(deployment(), "metadata.name", "web"),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}},
    ]
    assert len(load(dump(*docs), "-")) == 4


# --- errors -----------------------------------------------------------------------------------


def test_error_message_names_source_document_field_and_reason() -> None:
    bad = edit(pod(), "spec.containers.0.ports.0.containerPort", 70000)
    error = load_error(dump(pod(metadata={"name": "ok"}), bad))
    assert error.message == (
        "-: document 2 (Pod/web): spec.containers[0].ports[0].containerPort: "
        "must be an integer in 1..65535, got 70000"
    )
    assert error.field == "spec.containers[0].ports[0].containerPort"


def test_error_is_a_manifest_error_whose_str_does_not_repeat_the_field() -> None:
    error = load_error(dump(edit(pod(), "metadata.name", "Bad")), "pods.yaml")
    assert isinstance(error, ManifestError)
    assert error.code == "invalid_argument"
    assert str(error) == error.message
    assert str(error).startswith("pods.yaml: document 1 (Pod/Bad): metadata.name: ")


def test_empty_documents_still_count_in_the_index() -> None:
    text = "---\n---\n---\n" + dump(edit(pod(), "metadata.name", "Bad"))
    assert "document 3 (Pod/Bad)" in load_error(text).message


def test_label_names_kind_only_when_the_name_is_missing() -> None:
    error = load_error(dump(edit(pod(), "metadata.name", DELETE)))
    assert error.message.startswith("-: document 1 (Pod): metadata.name: is required")


def test_first_error_wins() -> None:
    first = edit(pod(), "spec.containers.0.ports.0.containerPort", 0)
    second = edit(pod(), "kind", "Nope")
    error = load_error(dump(pod(metadata={"name": "a"}), first, second))
    assert error.field == "spec.containers[0].ports[0].containerPort"
    assert "document 2" in error.message


POD_ERRORS: list[tuple[str, Any, str, str]] = [
    # (path to edit, new value, expected field, expected words in the message)
    ("metadata.name", DELETE, "metadata.name", "is required"),
    ("metadata.name", "", "metadata.name", "is required"),
    ("metadata.name", 7, "metadata.name", "must be a string, got integer"),
    ("metadata.name", "Web", "metadata.name", "DNS-1123 subdomain"),
    ("metadata.name", "web_1", "metadata.name", "DNS-1123 subdomain"),
    ("metadata.name", "-web", "metadata.name", "DNS-1123 subdomain"),
    ("metadata.name", "web.", "metadata.name", "DNS-1123 subdomain"),
    ("metadata.name", "a" * 254, "metadata.name", "DNS-1123 subdomain"),
    ("metadata.namespace", "Prod", "metadata.namespace", "DNS-1123 label"),
    ("metadata.namespace", "a.b", "metadata.namespace", "DNS-1123 label"),
    ("metadata.namespace", "a" * 64, "metadata.namespace", "DNS-1123 label"),
    ("metadata.namespace", 5, "metadata.namespace", "must be a string"),
    ("metadata.labels", ["app=web"], "metadata.labels", "must be a mapping"),
    ("metadata.labels", "app=web", "metadata.labels", "must be a mapping"),
    ("metadata.labels.version", 1, "metadata.labels['version']", "got integer 1"),
    ("metadata.labels.enabled", True, "metadata.labels['enabled']", "got boolean True"),
    ("metadata.labels.ratio", 0.5, "metadata.labels['ratio']", "got number 0.5"),
    ("metadata.labels.app", ["x"], "metadata.labels['app']", "got list"),
    ("metadata.labels.-app", "x", "metadata.labels['-app']", "must start and end"),
    ("metadata.labels.Bad/app", "x", "metadata.labels['Bad/app']", "prefix"),
    ("metadata.labels." + "k" * 64, "x", f"metadata.labels['{'k' * 64}']", "longer than 63"),
    ("metadata.labels.app", "v" * 64, "metadata.labels['app']", "longer than 63"),
    ("metadata.labels.app", "a b", "metadata.labels['app']", "must start and end"),
    ("metadata.lables", {"app": "web"}, "metadata.lables", "did you mean 'labels'"),
    ("specs", {}, "specs", "did you mean 'spec'"),
    ("spec", DELETE, "spec", "is required"),
    ("spec", [], "spec", "must be a mapping"),
    ("spec.containers", DELETE, "spec.containers", "at least one container"),
    ("spec.containers", [], "spec.containers", "at least one container"),
    ("spec.containers", {"name": "c"}, "spec.containers", "must be a list"),
    ("spec.containers.0", "nginx", "spec.containers[0]", "must be a mapping"),
    ("spec.containers.0.name", DELETE, "spec.containers[0].name", "is required"),
    ("spec.containers.0.name", 3, "spec.containers[0].name", "must be a string"),
    ("spec.containers.0.name", "Nginx", "spec.containers[0].name", "DNS-1123 label"),
    ("spec.containers.0.ports", {"containerPort": 80}, "spec.containers[0].ports", "list"),
    ("spec.containers.0.ports.0", 80, "spec.containers[0].ports[0]", "must be a mapping"),
    ("spec.serviceAccountName", "Web SA", "spec.serviceAccountName", "DNS-1123 subdomain"),
    ("spec.serviceAccountName", 1, "spec.serviceAccountName", "must be a string"),
    ("spec.serviceAccount", "Web SA", "spec.serviceAccount", "DNS-1123 subdomain"),
    ("spec.nodeName", "Node_1", "spec.nodeName", "DNS-1123 subdomain"),
    ("apiVersion", "apps/v1", "apiVersion", "Pod is served as apiVersion 'v1', got 'apps/v1'"),
    ("apiVersion", DELETE, "apiVersion", "got none"),
    ("kind", DELETE, "kind", "is required"),
    ("kind", 3, "kind", "must be a string"),
    ("kind", "StatefulSet", "kind", "unknown kind 'StatefulSet'"),
    ("kind", "pod", "kind", "unknown kind 'pod'"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), POD_ERRORS)
def test_pod_errors(path: str, value: Any, field: str, words: str) -> None:
    error = load_error(dump(edit(pod(), path, value)))
    assert error.field == field
    assert words in error.message
    assert error.message.startswith("-: document 1")
    assert f": {field}: " in error.message


PORT = "spec.containers.0.ports.0"
PORT_FIELD = "spec.containers[0].ports[0]"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("containerPort", DELETE, "is required"),
        ("containerPort", 0, "got 0"),
        ("containerPort", 65536, "got 65536"),
        ("containerPort", -1, "got -1"),
        ("containerPort", "80", "got string '80'"),
        ("containerPort", True, "got boolean True"),
        ("containerPort", 80.5, "got number 80.5"),
        ("protocol", "tcp", "must be one of TCP, UDP, SCTP, got 'tcp'"),
        ("protocol", "HTTP", "got 'HTTP'"),
        ("protocol", 6, "must be a string"),
        ("name", "a" * 16, "longer than 15"),
        ("name", "Http", "lowercase"),
        ("name", "http_alt", "lowercase"),
        ("name", "-http", "lowercase"),
        ("name", "http-", "lowercase"),
        ("name", "http--alt", "without '--'"),
        ("name", "8080", "at least one letter"),
        ("name", 8080, "must be a string"),
        ("port", 80, "unknown field"),
        ("containerport", 80, "unknown field (did you mean 'containerPort'?)"),
    ],
)
def test_port_errors(key: str, value: Any, words: str) -> None:
    error = load_error(dump(edit(pod(), f"{PORT}.{key}", value)))
    assert error.field == f"{PORT_FIELD}.{key}"
    assert words in error.message


@pytest.mark.parametrize("name", ["http", "h", "web-8080", "a" * 15, "1a"])
def test_valid_port_names(name: str) -> None:
    assert load_one(edit(pod(), f"{PORT}.name", name)).ports[0].name == name


@pytest.mark.parametrize("protocol", ["TCP", "UDP", "SCTP"])
def test_valid_protocols(protocol: str) -> None:
    assert load_one(edit(pod(), f"{PORT}.protocol", protocol)).ports[0].protocol == protocol


@pytest.mark.parametrize(
    "name", ["web", "web.prod", "a" * 253, "0web", "w-e-b.example.com", "a.b" + ".c" * 100]
)
def test_valid_pod_names(name: str) -> None:
    assert load_one(edit(pod(), "metadata.name", name)).name == name


@pytest.mark.parametrize(
    "key", ["app", "app.kubernetes.io/name", "example.com/A_b.c-1", "a" * 63, "x/" + "y" * 63]
)
def test_valid_label_keys(key: str) -> None:
    doc = pod()
    doc["metadata"]["labels"][key] = "v"
    assert load_one(doc).labels[key] == "v"


def test_duplicate_port_names_across_containers() -> None:
    doc = pod(
        spec={
            "containers": [
                {"name": "a", "ports": [{"containerPort": 80, "name": "http"}]},
                {"name": "b", "ports": [{"containerPort": 81, "name": "http"}]},
            ]
        }
    )
    error = load_error(dump(doc))
    assert error.field == "spec.containers[1].ports[0].name"
    assert "duplicate port name 'http' (also spec.containers[0].ports[0].name)" in error.message


def test_duplicate_container_names() -> None:
    doc = pod(spec={"containers": [{"name": "a"}, {"name": "a"}]})
    error = load_error(dump(doc))
    assert error.field == "spec.containers[1].name"
    assert "duplicate container name 'a'" in error.message


def test_label_key_that_is_not_a_string() -> None:
    text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: w\n  labels: {1: x}\nspec: {}\n"
    error = load_error(text)
    assert error.field == "metadata.labels[1]"
    assert "label key must be a string, got integer 1" in error.message


def test_generate_name_gets_a_hint() -> None:
    doc = edit(edit(pod(), "metadata.name", DELETE), "metadata.generateName", "web-")
    assert "generateName is not supported" in load_error(dump(doc)).message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("- a\n- b\n", "got list"),
        ("just a string\n", "got string"),
        ("42\n", "got integer"),
    ],
)
def test_document_that_is_not_a_mapping(text: str, words: str) -> None:
    error = load_error(text)
    assert error.field is None
    assert error.message.startswith("-: document 1: a document must be a mapping")
    assert words in error.message


@pytest.mark.parametrize(
    ("kind", "api_version"),
    [
        ("Namespace", "v1"),
        ("Deployment", "apps/v1"),
        ("CiliumNetworkPolicy", "cilium.io/v2"),
        ("CiliumClusterwideNetworkPolicy", "cilium.io/v2"),
        ("NetworkPolicy", "networking.k8s.io/v1"),
        ("Service", "v1"),
        ("EndpointSlice", "discovery.k8s.io/v1"),
    ],
)
def test_known_kind_with_the_wrong_api_version(kind: str, api_version: str) -> None:
    doc = {"apiVersion": "example.com/v9", "kind": kind, "metadata": {"name": "x"}}
    error = load_error(dump(doc))
    assert error.field == "apiVersion"
    assert f"{kind} is served as apiVersion {api_version!r}, got 'example.com/v9'" in error.message


def test_unknown_kind_lists_what_is_accepted() -> None:
    error = load_error(dump({"apiVersion": "apps/v1", "kind": "DaemonSet"}))
    assert error.field == "kind"
    assert "Deployment" in error.message and "CiliumNetworkPolicy" in error.message


@pytest.mark.parametrize(
    ("name", "ok"),
    [("prod", True), ("a" * 63, True), ("a" * 64, False), ("prod.eu", False), ("Prod", False)],
)
def test_namespace_name_is_a_dns_label(name: str, ok: bool) -> None:
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    if ok:
        assert load_one(doc).name == name
    else:
        assert load_error(dump(doc)).field == "metadata.name"


def test_namespace_unknown_spec_field() -> None:
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}, "spec": {"x": 1}}
    assert load_error(dump(doc)).field == "spec.x"


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"metadata": {}}, "metadata.name", "is required"),
        ({"metadata": {"name": "Web"}}, "metadata.name", "DNS-1035 label"),
        ({"metadata": {"name": "1web"}}, "metadata.name", "DNS-1035 label"),
        ({"metadata": {"name": "web", "namespace": "a_b"}}, "metadata.namespace", "label"),
        ({"metadata": "web"}, "metadata", "must be a mapping"),
    ],
)
def test_routed_errors(doc: dict[str, Any], field: str, words: str) -> None:
    error = load_error(dump({"apiVersion": "v1", "kind": "Service", **doc}))
    assert error.field == field
    assert words in error.message


def test_routed_policy_name_is_a_dns_subdomain() -> None:
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {}}
    assert load_one(edit(doc, "metadata.name", "1.allow")).name == "1.allow"
    assert load_error(dump(edit(doc, "metadata.name", "Allow"))).field == "metadata.name"


DEPLOYMENT_ERRORS: list[tuple[str, Any, str, str]] = [
    ("spec", DELETE, "spec", "is required"),
    ("spec.replicas", -1, "spec.replicas", "got -1"),
    ("spec.replicas", 2**31, "spec.replicas", "got 2147483648"),
    ("spec.replicas", "3", "spec.replicas", "got string '3'"),
    ("spec.replicas", True, "spec.replicas", "got boolean True"),
    ("spec.replicas", 1.5, "spec.replicas", "got number 1.5"),
    ("spec.replica", 3, "spec.replica", "did you mean 'replicas'"),
    ("spec.selector", DELETE, "spec.selector", "is required"),
    ("spec.selector", {}, "spec.selector", "must not be empty"),
    ("spec.selector", {"matchLabels": {}}, "spec.selector", "must not be empty"),
    ("spec.selector", "app=api", "spec.selector", "must be a mapping"),
    ("spec.selector.matchLabels", ["app"], "spec.selector.matchLabels", "must be a mapping"),
    ("spec.selector.matchLabels.app", 1, "spec.selector.matchLabels['app']", "got integer 1"),
    ("spec.selector.matchLabels.k8s:app", "api", "spec.selector.matchLabels['k8s:app']", "key"),
    ("spec.selector.matchLabels.app", "web", "spec.template.metadata.labels", "does not match"),
    ("spec.selector.matchLabels.tier", "db", "spec.template.metadata.labels", "does not match"),
    ("spec.selector.matchLabelz", {}, "spec.selector", "unknown field(s) matchLabelz"),
    (
        "spec.selector.matchExpressions",
        [{"key": "app", "operator": "Is", "values": ["api"]}],
        "spec.selector.matchExpressions[0].operator",
        "'Is' is not one of",
    ),
    (
        "spec.selector.matchExpressions",
        [{"key": "app", "operator": "NotIn", "values": ["api"]}],
        "spec.template.metadata.labels",
        "selector does not match template labels",
    ),
    ("spec.template", DELETE, "spec.template", "is required"),
    ("spec.template.spec", DELETE, "spec.template.spec", "is required"),
    ("spec.template.metadata.labels", DELETE, "spec.template.metadata.labels", "does not match"),
    ("spec.template.metadata.labels.v", 2, "spec.template.metadata.labels['v']", "integer 2"),
    ("spec.template.metadata.lables", {}, "spec.template.metadata.lables", "did you mean"),
    ("spec.template.specs", {}, "spec.template.specs", "did you mean 'spec'"),
    ("spec.template.spec.containers", [], "spec.template.spec.containers", "at least one"),
    (
        "spec.template.spec.containers.0.ports.0.containerPort",
        70000,
        "spec.template.spec.containers[0].ports[0].containerPort",
        "must be an integer in 1..65535, got 70000",
    ),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), DEPLOYMENT_ERRORS)
def test_deployment_errors(path: str, value: Any, field: str, words: str) -> None:
    error = load_error(dump(edit(deployment(), path, value)))
    assert error.field == field
    assert words in error.message
    assert error.message.startswith(f"-: document 1 (Deployment/api): {field}: ")


def test_selector_mismatch_message_shows_both_sides() -> None:
    error = load_error(dump(edit(deployment(), "spec.selector.matchLabels.app", "web")))
    assert "(selector app=web, template labels app=api)" in error.message


def test_deployment_metadata_is_validated_too() -> None:
    assert load_error(dump(edit(deployment(), "metadata.name", "API"))).field == "metadata.name"
    doc = edit(deployment(), "metadata.labels", {"v": 1})
    assert load_error(dump(doc)).field == "metadata.labels['v']"


# --- lists and duplicates ---------------------------------------------------------------------


def test_error_inside_a_list_names_the_item() -> None:
    bad = edit(pod(), "metadata.name", "db")
    bad = edit(bad, "spec.containers.0.ports.0.protocol", "ICMP")
    text = dump(
        pod(), {"apiVersion": "v1", "kind": "List", "items": [pod(metadata={"name": "a"}), bad]}
    )
    error = load_error(text)
    assert error.message.startswith("-: document 2 items[1] (Pod/db): ")
    assert error.field == "spec.containers[0].ports[0].protocol"


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"apiVersion": "v2", "kind": "List", "items": []}, "apiVersion", "got 'v2'"),
        ({"apiVersion": "v1", "kind": "List", "items": {}}, "items", "must be a list"),
        ({"apiVersion": "v1", "kind": "List", "itemz": []}, "itemz", "did you mean 'items'"),
        (
            {"apiVersion": "v1", "kind": "List", "items": [{"kind": "List", "items": []}]},
            "items[0]",
            "a List inside a List",
        ),
    ],
)
def test_list_errors(doc: dict[str, Any], field: str, words: str) -> None:
    error = load_error(dump(doc))
    assert error.field == field
    assert words in error.message
    assert error.message.startswith("-: document 1 (List): ")


def test_list_item_that_is_not_a_mapping() -> None:
    error = load_error(dump({"apiVersion": "v1", "kind": "List", "items": [pod(), "x"]}))
    assert error.message.startswith("-: document 1 items[1]: a document must be a mapping")


def test_duplicate_names_both_documents() -> None:
    error = load_error(dump(pod(), deployment(), pod()), "app.yaml")
    assert error.message == (
        "app.yaml: document 3 (Pod/web): metadata.name: "
        "Pod default/web is defined twice, first by document 1 (Pod/web)"
    )
    assert error.field == "metadata.name"


def test_explicit_default_namespace_duplicates_the_implicit_one() -> None:
    error = load_error(dump(pod(), edit(pod(), "metadata.namespace", "default")))
    assert "first by document 1" in error.message


def test_duplicate_cluster_scoped_and_within_a_list() -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}
    error = load_error(dump({"apiVersion": "v1", "kind": "List", "items": [ns, ns]}))
    assert "Namespace prod is defined twice, first by document 1 items[0]" in error.message
    assert error.message.startswith("-: document 1 items[1] (Namespace/prod)")


# --- YAML syntax ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n   bad: x\n", 5, "mapping values"),
        ("a: 1\n---\nb: [1, 2\n", 4, "expected ','"),
        ("a: 1\n---\nkind: Pod\nkind: Pod\n", 4, "duplicate key 'kind'"),
        ("a:\n  b: 1\n  b: 2\n", 3, "duplicate key 'b'"),
        ("a: 1\nb: \x07\n", 2, "unacceptable character #x0007"),
    ],
)
def test_yaml_errors_name_source_and_line(text: str, line: int, words: str) -> None:
    error = load_error(text, "bad.yaml")
    assert error.message.startswith(f"bad.yaml: invalid YAML at line {line}")
    assert words in error.message
    assert error.field is None


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: w\n"
        "  labels: {<<: {app: web, tier: x}, app: api}\nspec: {containers: [{name: c}]}\n"
    )
    (doc,) = load(text, "-")
    assert isinstance(doc, PodDoc)
    assert doc.labels == {"app": "api", "tier": "x"}


@pytest.mark.parametrize("text", ["a: !!int abc\n", "[" * 2000 + "]" * 2000 + "\n"])
def test_yaml_values_that_do_not_construct(text: str) -> None:
    assert load_error(text, "x.yaml").message.startswith("x.yaml: invalid YAML")


def test_yaml_does_not_build_python_objects() -> None:
    error = load_error("a: !!python/object/apply:os.system [echo hi]\n")
    assert "invalid YAML" in error.message


# --- Deployment expansion ---------------------------------------------------------------------


def api_deployment(replicas: int = 4, **spec: Any) -> DeploymentDoc:
    doc = load_one(edit(deployment(**spec), "spec.replicas", replicas))
    assert isinstance(doc, DeploymentDoc)
    return doc


def test_expand_names_labels_and_owner() -> None:
    dep = api_deployment(3)
    phash = template_hash(dep.template)
    pods = expand_deployment(dep, ["n1"])
    assert len(pods) == 3
    assert len(phash) == 10 and set(phash) <= set(SAFE)
    for p in pods:
        assert re.fullmatch(rf"api-{phash}-[{SAFE}]{{5}}", p.name)
        assert p.labels == {"app": "api", POD_TEMPLATE_HASH_LABEL: phash}
        assert p.owner == "Deployment/api"
        assert p.namespace == "default"
        assert p.service_account == "default"
        assert p.ports == (ContainerPort(port=8080),)
    assert len({p.name for p in pods}) == 3
    assert dep.template.labels == {"app": "api"}  # the template itself is left alone


def test_expand_is_deterministic_across_loads() -> None:
    first = expand_deployment(api_deployment(5), ["n1", "n2"])
    second = expand_deployment(api_deployment(5), ["n1", "n2"])
    assert first == second


def test_expand_spreads_round_robin_over_sorted_nodes() -> None:
    pods = expand_deployment(api_deployment(5), ["n3", "n1", "n2", "n1"])
    assert [p.node_name for p in pods] == ["n1", "n2", "n3", "n1", "n2"]


def test_expand_without_nodes_leaves_node_unset() -> None:
    assert {p.node_name for p in expand_deployment(api_deployment(3), [])} == {""}


def test_template_node_name_pins_every_replica() -> None:
    dep = load_one(edit(deployment(replicas=3), "spec.template.spec.nodeName", "n9"))
    assert {p.node_name for p in expand_deployment(dep, ["n1", "n2"])} == {"n9"}


def test_node_list_does_not_change_names() -> None:
    dep = api_deployment(3)
    names = [p.name for p in expand_deployment(dep, ["n1"])]
    assert [p.name for p in expand_deployment(dep, ["n1", "n2", "n3"])] == names
    assert [p.name for p in expand_deployment(dep, [])] == names


def test_scaling_keeps_the_names_and_nodes_of_surviving_replicas() -> None:
    small = expand_deployment(api_deployment(2), ["a", "b", "c"])
    large = expand_deployment(api_deployment(6), ["a", "b", "c"])
    assert large[:2] == small


def test_zero_replicas_expand_to_nothing() -> None:
    assert expand_deployment(api_deployment(0), ["n1"]) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.template.metadata.labels.tier", "web"),
        ("spec.template.spec.serviceAccountName", "other"),
        ("spec.template.spec.containers.0.ports.0.containerPort", 8081),
        ("spec.template.spec.containers.0.ports.0.protocol", "UDP"),
        ("spec.template.spec.containers.0.ports.0.name", "http"),
        ("spec.template.spec.nodeName", "n1"),
    ],
)
def test_template_change_changes_the_hash_and_names(path: str, value: Any) -> None:
    before = load_one(deployment())
    after = load_one(edit(deployment(), path, value))
    assert template_hash(after.template) != template_hash(before.template)
    names_before = {p.name for p in expand_deployment(before, [])}
    assert names_before.isdisjoint(p.name for p in expand_deployment(after, []))


def test_replicas_and_namespace_do_not_change_the_hash() -> None:
    base = load_one(deployment())
    other = load_one(edit(edit(deployment(), "spec.replicas", 9), "metadata.namespace", "x"))
    assert template_hash(base.template) == template_hash(other.template)


def test_long_names_are_cut_to_a_dns_label_and_stay_distinct() -> None:
    long_a = "a" * 100 + "x"
    long_b = "a" * 100 + "y"
    pods_a = expand_deployment(load_one(edit(deployment(), "metadata.name", long_a)), [])
    pods_b = expand_deployment(load_one(edit(deployment(), "metadata.name", long_b)), [])
    for p in pods_a + pods_b:
        assert len(p.name) == 63
        assert DNS_LABEL.match(p.name)
    assert {p.name for p in pods_a}.isdisjoint(p.name for p in pods_b)


def test_many_replicas_have_distinct_names() -> None:
    # 27**5 suffixes: by the birthday bound thousands of replicas make two of them collide
    pods = expand_deployment(api_deployment(20000), [])
    assert len({p.name for p in pods}) == 20000


def test_suffix_skips_one_already_taken() -> None:
    first = _suffix("api/hash/0", set())
    second = _suffix("api/hash/0", {first})
    assert second != first
    assert len(second) == 5 and set(second) <= set(SAFE)


@pytest.mark.parametrize(
    "key",
    [
        "io.cilium.k8s.namespace.labels.team",
        "io.cilium.k8s.policy.serviceaccount",
        "io.kubernetes.pod.namespace",
    ],
)
def test_a_pod_cannot_label_itself_with_its_namespace_or_service_account(key: str) -> None:
    # io.cilium.k8s.namespace.labels.team: trusted on a pod would make namespaceSelector
    # {team: trusted} select it; the cluster alone derives these from the namespace
    doc = pod()
    doc["metadata"]["labels"] = {"app": "web", key: "x"}
    error = load_error(dump(doc))
    assert error.field == f"metadata.labels[{key!r}]"
    assert "set from the pod's namespace and service account" in error.message
    doc = deployment()
    doc["spec"]["template"]["metadata"]["labels"][key] = "x"
    error = load_error(dump(doc))
    assert error.field == f"spec.template.metadata.labels[{key!r}]"


PIECES = [
    MULTI,
    # empty documents count
    "---\n" + MULTI + "\n---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: w}\n",
    "# a comment\n---\n" + MULTI.replace("\n", "\r\n"),  # CRLF line ends
    "kind: List\napiVersion: v1\nitems: []\n--- # a comment on the marker\n"
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n",
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: y\n  annotations:\n    a: |\n"
    "      ---- not a marker\n      --- indented, no marker\n---\n"
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n",
]


@pytest.mark.parametrize("text", PIECES)
def test_a_file_read_piece_by_piece_is_the_file(text: str) -> None:
    """`membrane apply -f` reads a large file in pieces cut at document starts: whatever the
    cut, the documents, their numbers and their order are the whole file's."""
    whole = load(text, "f.yaml")
    for size in (1, 10, 60, len(text)):
        parts = pieces(text, size)
        assert "".join(parts) == text
        assert all(p.startswith("---") for p in parts[1:])
        reader = Reader("f.yaml")
        docs = [d for p in parts for d in reader.feed(kube_yaml.load_all(p, "f.yaml", bulk=True))]
        assert docs == whole, size
        assert reader.count == len(kube_yaml.load_all(text, "f.yaml"))


def test_a_piece_names_the_document_by_its_number_in_the_file() -> None:
    bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {bad key: x}}\n"
    text = MULTI + "---\n" + bad
    reader = Reader("f.yaml")
    parts = pieces(text, 1)
    with pytest.raises(ManifestError) as caught:
        for part in parts:
            reader.feed(kube_yaml.load_all(part, "f.yaml", bulk=True))
    with pytest.raises(ManifestError) as whole:
        load(text, "f.yaml")
    assert str(caught.value) == str(whole.value) and caught.value.field == whole.value.field
    again = MULTI + "---\n" + MULTI  # defined twice across two pieces
    reader = Reader("f.yaml")
    with pytest.raises(ManifestError, match="defined twice, first by document 1"):
        for part in pieces(again, len(MULTI)):
            reader.feed(kube_yaml.load_all(part, "f.yaml", bulk=True))
