"""services.policy.parser: policy documents -> the normalized model, and every error case."""

from __future__ import annotations

import copy
import hashlib
import ipaddress
from typing import Any

import pytest

from services.identity import reserved
from services.policy import model
from services.policy.model import (
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    CIDRRule,
    Direction,
    Entity,
    Peer,
    Policy,
    PolicyKind,
    PortRule,
    Rule,
    Selector,
    rule_id,
)
from services.policy.parser import (
    AUDIT_ANNOTATION,
    PolicyDocumentError,
    parse_document,
    parse_documents,
)
from shared.errors import InvalidArgument
from shared.fqdn import NameMatch
from shared.labels import LabelSet, pod_identity_labels

SOURCE = "test.yaml"
ALL = Peer(entity=Entity.ALL)


# --- helpers ---------------------------------------------------------------------------------


def cnp(spec: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A CiliumNetworkPolicy ``prod/p``; ``fields`` replace top-level fields."""
    doc: dict[str, Any] = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p", "namespace": "prod"},
    }
    if spec is not None:
        doc["spec"] = spec
    doc.update(fields)
    return doc


def ccnp(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "cw"},
        "spec": spec,
    }


def knp(spec: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "np", "namespace": "prod"},
    }
    if spec is not None:
        doc["spec"] = spec
    return doc


def ingress(*rules: dict[str, Any], selector: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"endpointSelector": selector or {}, "ingress": list(rules)}


def egress(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"endpointSelector": {}, "egress": list(rules)}


def parse(doc: dict[str, Any]) -> Policy:
    return parse_document(doc, SOURCE, 1)


def only_rule(doc: dict[str, Any]) -> Rule:
    (rule,) = parse(doc).rules
    return rule


def error(doc: dict[str, Any]) -> PolicyDocumentError:
    with pytest.raises(PolicyDocumentError) as info:
        parse(doc)
    return info.value


def assert_error(doc: dict[str, Any], field: str, fragment: str) -> None:
    exc = error(doc)
    assert exc.field == field, str(exc)
    assert fragment in exc.message, exc.message
    assert f": {field}: " in str(exc)


def pod(
    namespace: str, ns_labels: dict[str, str] | None = None, /, **labels: str
) -> dict[str, str]:
    """A pod identity's k8s labels, as the datapath builds them."""
    texts = pod_identity_labels(namespace, labels, ns_labels or {}, "default")
    return LabelSet.parse(texts).k8s_map()


def ports(*rules: PortRule) -> tuple[PortRule, ...]:
    return rules


# --- the model ---------------------------------------------------------------------------------


def test_reserved_numbers_agree_with_the_identity_service() -> None:
    ours = {
        "host": model.RESERVED_HOST,
        "world": model.RESERVED_WORLD,
        "unmanaged": model.RESERVED_UNMANAGED,
        "health": model.RESERVED_HEALTH,
        "init": model.RESERVED_INIT,
        "remote-node": model.RESERVED_REMOTE_NODE,
        "kube-apiserver": model.RESERVED_KUBE_APISERVER,
        "ingress": model.RESERVED_INGRESS,
    }
    assert {name: reserved.RESERVED[name] for name in ours} == ours
    limits = (reserved.CLUSTER_MIN, reserved.CLUSTER_MAX, reserved.LOCAL_BASE)
    assert limits == (model.CLUSTER_MIN, model.CLUSTER_MAX, model.LOCAL_BASE)


@pytest.mark.parametrize(
    ("entity", "ids", "cluster", "cidr", "wildcard"),
    [
        (Entity.ALL, {1, 2, 3, 4, 5, 6, 7, 8}, True, True, True),
        (Entity.WORLD, {2}, False, True, False),
        (Entity.CLUSTER, {1, 3, 4, 5, 6, 7, 8}, True, False, False),
        (Entity.HOST, {1}, False, False, False),
        (Entity.REMOTE_NODE, {6}, False, False, False),
        (Entity.HEALTH, {4}, False, False, False),
        (Entity.INIT, {5}, False, False, False),
        (Entity.UNMANAGED, {3}, False, False, False),
        (Entity.KUBE_APISERVER, {7}, False, False, False),
        (Entity.INGRESS, {8}, False, False, False),
        (Entity.NONE, set(), False, False, False),
    ],
)
def test_entity_targets(
    entity: Entity, ids: set[int], cluster: bool, cidr: bool, wildcard: bool
) -> None:
    targets = entity.targets
    assert targets.reserved == frozenset(ids)
    assert (targets.cluster, targets.cidr, targets.wildcard) == (cluster, cidr, wildcard)
    if len(ids) == 1:
        # a single-identity entity is named after its reserved identity
        (number,) = ids
        assert reserved.BY_ID[number] == entity.value


def test_peer_has_exactly_one_part() -> None:
    with pytest.raises(ValueError):
        Peer()
    with pytest.raises(ValueError):
        Peer(entity=Entity.ALL, cidr=CIDRRule(ipaddress.ip_network("10.0.0.0/8")))


def test_cidr_rule_contains_and_world() -> None:
    rule = CIDRRule(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.1.0.0/16"),))
    assert rule.contains(ipaddress.ip_address("10.2.0.1"))
    assert not rule.contains(ipaddress.ip_address("10.1.0.1"))
    assert not rule.contains(ipaddress.ip_address("11.0.0.1"))
    assert not rule.selects_world
    assert CIDRRule(ipaddress.ip_network("0.0.0.0/0")).selects_world
    assert str(rule) == "10.0.0.0/8 except 10.1.0.0/16"


def test_port_rule_text() -> None:
    assert str(PortRule(PROTO_TCP, 80)) == "80/TCP"
    assert str(PortRule(PROTO_UDP, 8000, 8080)) == "8000-8080/UDP"
    assert str(PortRule(PROTO_TCP, port_name="http")) == "http/TCP"
    assert str(PortRule(PROTO_ANY)) == "any/ANY"
    assert str(PortRule(PROTO_ICMP, 8)) == "ICMP type 8"


# --- a complete CiliumNetworkPolicy ----------------------------------------------------------

DEATHSTAR = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
  namespace: default
spec:
  description: "L7 policy to restrict access to specific HTTP call"
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
"""


def test_deathstar_policy() -> None:
    (policy,) = parse_documents(DEATHSTAR, SOURCE)
    assert policy.kind is PolicyKind.CNP
    assert policy.key == "default/rule1"
    assert (policy.namespace, policy.name, policy.audit) == ("default", "rule1", False)
    (spec,) = policy.specs
    assert spec.path == "spec"
    assert spec.description == "L7 policy to restrict access to specific HTTP call"
    assert str(spec.subject) == (
        "k8s:class=deathstar, k8s:io.kubernetes.pod.namespace=default, k8s:org=empire"
    )
    assert (spec.enforces_ingress, spec.enforces_egress) == (True, False)
    (rule,) = spec.rules
    assert rule.name == "default/rule1[0]"
    assert rule.path == "spec.ingress[0]"
    assert (rule.direction, rule.deny, rule.index) == (Direction.INGRESS, False, 0)
    (peer,) = rule.peers
    assert peer.selector is not None
    assert str(peer.selector) == "k8s:io.kubernetes.pod.namespace=default, k8s:org=empire"
    (port,) = rule.ports
    assert (port.protocol, port.port, port.end_port, port.port_name) == (PROTO_TCP, 80, 0, "")
    assert port.l7 is not None
    assert port.l7.protocol == "http"
    assert port.l7.rules() == [{"method": "POST", "path": "/v1/request-landing"}]
    assert port.l7.entries() == [{"http": {"method": "POST", "path": "/v1/request-landing"}}]
    assert policy.has_l7 and rule.has_l7
    assert policy.warnings == ()


def test_policy_is_hashable_and_keeps_its_source() -> None:
    (policy,) = parse_documents(DEATHSTAR, SOURCE)
    assert hash(policy) == hash(parse_documents(DEATHSTAR, SOURCE)[0])
    source = policy.to_dict()
    assert source["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] == "80"
    source["metadata"]["name"] = "changed"
    assert policy.to_dict()["metadata"]["name"] == "rule1"


def test_source_is_a_copy_of_the_given_document() -> None:
    doc = cnp(ingress({"fromEntities": ["world"]}))
    policy = parse(doc)
    assert policy.source == doc
    doc["metadata"]["name"] = "other"
    assert policy.source["metadata"]["name"] == "p"


# --- subject selection and namespace scoping -------------------------------------------------


def test_subject_keys_with_and_without_source_prefix_are_the_same_selector() -> None:
    plain = parse(cnp(ingress({}, selector={"matchLabels": {"app": "web"}})))
    k8s = parse(cnp(ingress({}, selector={"matchLabels": {"k8s:app": "web"}})))
    anyp = parse(
        cnp(
            ingress(
                {},
                selector={
                    "matchExpressions": [{"key": "any:app", "operator": "In", "values": ["web"]}]
                },
            )
        )
    )
    assert plain.specs[0].subject == k8s.specs[0].subject == anyp.specs[0].subject
    assert str(plain.specs[0].subject) == "k8s:app=web, k8s:io.kubernetes.pod.namespace=prod"


def test_subject_is_scoped_to_the_policy_namespace() -> None:
    subject = parse(cnp(ingress({}, selector={"matchLabels": {"app": "web"}}))).specs[0].subject
    assert subject.matches(pod("prod", app="web"))
    assert not subject.matches(pod("dev", app="web"))
    assert not subject.matches(pod("prod", app="db"))
    assert subject.selects(LabelSet.parse(pod_identity_labels("prod", {"app": "web"}, {}, "sa")))


def test_subject_namespace_in_match_labels_is_replaced_with_a_warning() -> None:
    doc = cnp(ingress({}, selector={"matchLabels": {"k8s:io.kubernetes.pod.namespace": "dev"}}))
    policy = parse(doc)
    assert str(policy.specs[0].subject) == "k8s:io.kubernetes.pod.namespace=prod"
    (warning,) = policy.warnings
    assert "spec.endpointSelector.matchLabels['k8s:io.kubernetes.pod.namespace']" in warning
    assert "'prod'" in warning
    same = parse(
        cnp(ingress({}, selector={"matchLabels": {"io.kubernetes.pod.namespace": "prod"}}))
    )
    assert same.warnings == ()
    assert str(same.specs[0].subject) == "k8s:io.kubernetes.pod.namespace=prod"


def test_namespace_defaults_to_default() -> None:
    doc = cnp(ingress({}))
    del doc["metadata"]["namespace"]
    policy = parse(doc)
    assert policy.key == "default/p"
    assert str(policy.specs[0].subject) == "k8s:io.kubernetes.pod.namespace=default"


def test_clusterwide_subject_is_not_scoped_and_names_have_no_namespace() -> None:
    policy = parse(ccnp(ingress({}, selector={"matchLabels": {"app": "web"}})))
    assert policy.kind is PolicyKind.CCNP
    assert (policy.key, policy.namespace) == ("cw", "")
    assert str(policy.specs[0].subject) == "k8s:app=web"
    assert policy.specs[0].subject.matches(pod("any-ns", app="web"))
    assert policy.rules[0].name == "cw[0]"


def test_clusterwide_namespace_is_ignored_with_a_warning() -> None:
    doc = ccnp(ingress({}))
    doc["metadata"]["namespace"] = "prod"
    policy = parse(doc)
    assert policy.namespace == ""
    assert policy.warnings == (
        "metadata.namespace: ignored, a CiliumClusterwideNetworkPolicy is cluster-scoped",
    )


def peer_selector(doc: dict[str, Any]) -> Selector:
    (rule,) = parse(doc).rules
    (peer,) = rule.peers
    assert peer.selector is not None
    return peer.selector


def test_from_endpoints_without_namespace_are_scoped_to_the_policy_namespace() -> None:
    selector = peer_selector(cnp(ingress({"fromEndpoints": [{"matchLabels": {"app": "a"}}]})))
    assert str(selector) == "k8s:app=a, k8s:io.kubernetes.pod.namespace=prod"
    assert selector.matches(pod("prod", app="a"))
    assert not selector.matches(pod("dev", app="a"))


def test_empty_from_endpoints_selector_is_all_pods_of_the_namespace() -> None:
    selector = peer_selector(cnp(ingress({"fromEndpoints": [{}]})))
    assert str(selector) == "k8s:io.kubernetes.pod.namespace=prod"


def test_to_endpoints_with_an_explicit_namespace_are_not_rescoped() -> None:
    doc = cnp(
        egress(
            {
                "toEndpoints": [
                    {
                        "matchLabels": {
                            "k8s:io.kubernetes.pod.namespace": "kube-system",
                            "k8s-app": "kube-dns",
                        }
                    }
                ]
            }
        )
    )
    selector = peer_selector(doc)
    assert str(selector) == "k8s:io.kubernetes.pod.namespace=kube-system, k8s:k8s-app=kube-dns"
    assert selector.matches(pod("kube-system", **{"k8s-app": "kube-dns"}))
    expr = {"key": "io.kubernetes.pod.namespace", "operator": "In", "values": ["a", "b"]}
    selector = peer_selector(cnp(ingress({"fromEndpoints": [{"matchExpressions": [expr]}]})))
    assert str(selector) == "k8s:io.kubernetes.pod.namespace in (a,b)"


def test_from_endpoints_on_namespace_labels_span_namespaces() -> None:
    key = "k8s:io.cilium.k8s.namespace.labels.team"
    selector = peer_selector(cnp(ingress({"fromEndpoints": [{"matchLabels": {key: "blue"}}]})))
    assert str(selector) == "k8s:io.cilium.k8s.namespace.labels.team=blue"
    assert selector.matches(pod("dev", {"team": "blue"}))
    assert not selector.matches(pod("prod", {"team": "red"}))


def test_clusterwide_from_endpoints_select_pods_of_every_namespace() -> None:
    selector = peer_selector(ccnp(ingress({"fromEndpoints": [{"matchLabels": {"app": "a"}}]})))
    assert str(selector) == "k8s:app=a, k8s:io.kubernetes.pod.namespace"
    assert selector.matches(pod("x", app="a"))
    wildcard = peer_selector(ccnp(ingress({"fromEndpoints": [{}]})))
    assert str(wildcard) == "k8s:io.kubernetes.pod.namespace"
    assert not wildcard.matches({})  # a reserved identity has no k8s labels


def test_selectors_lists_subjects_and_peers_once() -> None:
    policy = parse(
        cnp(
            {
                "endpointSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}, {}]}],
                "egress": [{"toEndpoints": [{}]}, {"toEntities": ["world"]}],
            }
        )
    )
    assert {str(s) for s in policy.selectors()} == {
        "k8s:app=web, k8s:io.kubernetes.pod.namespace=prod",
        "k8s:io.kubernetes.pod.namespace=prod",
    }


# --- peers: entities and CIDRs ---------------------------------------------------------------


def test_entities_become_entity_peers() -> None:
    rule = only_rule(cnp(ingress({"fromEntities": ["world", "cluster", "host", "kube-apiserver"]})))
    assert [p.entity for p in rule.peers] == [
        Entity.WORLD,
        Entity.CLUSTER,
        Entity.HOST,
        Entity.KUBE_APISERVER,
    ]
    assert rule.ports == ()


def test_cidr_peers_and_cidr_sets_with_except() -> None:
    rule = only_rule(cnp(egress({"toCIDR": ["192.0.2.1", "10.0.0.0/8", "2001:db8::/32"]})))
    assert [str(p.cidr) for p in rule.peers] == ["192.0.2.1/32", "10.0.0.0/8", "2001:db8::/32"]
    doc = cnp(
        egress(
            {
                "toCIDRSet": [
                    {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]},
                    {"cidr": "172.16.0.0/12"},
                ]
            }
        )
    )
    first, second = only_rule(doc).peers
    assert first.cidr == CIDRRule(
        ipaddress.ip_network("0.0.0.0/0"),
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.0.0/16")),
    )
    assert first.cidr.selects_world
    assert second.cidr == CIDRRule(ipaddress.ip_network("172.16.0.0/12"))


def test_cidr_with_host_bits_is_normalized_with_a_warning() -> None:
    policy = parse(cnp(ingress({"fromCIDRSet": [{"cidr": "10.1.2.3/8"}]})))
    assert str(policy.rules[0].peers[0].cidr) == "10.0.0.0/8"
    assert policy.warnings == (
        "spec.ingress[0].fromCIDRSet[0].cidr: '10.1.2.3/8' has host bits set; using 10.0.0.0/8",
    )


# --- rule shapes: L3-only, L4-only, empty --------------------------------------------------------


def test_l3_only_rule_allows_every_port() -> None:
    rule = only_rule(cnp(ingress({"fromEntities": ["host"]})))
    assert rule.ports == ()
    assert rule.peers == (Peer(entity=Entity.HOST),)


def test_ports_without_l3_allow_every_peer() -> None:
    rule = only_rule(cnp(ingress({"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]})))
    assert rule.peers == (ALL,)
    assert rule.ports == (PortRule(PROTO_TCP, 80),)
    icmp = only_rule(cnp(egress({"icmps": [{"fields": [{"type": 8}]}]})))
    assert icmp.peers == (ALL,)


def test_empty_rule_enforces_and_matches_nothing() -> None:
    policy = parse(cnp(ingress({})))
    assert policy.specs[0].enforces_ingress
    (rule,) = policy.rules
    assert (rule.peers, rule.ports) == ((), ())
    none_rule = only_rule(cnp(ingress(None)))  # type: ignore[arg-type]
    assert none_rule.peers == ()


def test_explicitly_empty_peer_list_selects_nothing_even_with_ports() -> None:
    rule = only_rule(cnp(ingress({"fromEndpoints": [], "toPorts": [{"ports": [{"port": "80"}]}]})))
    assert rule.peers == ()
    assert rule.ports == (PortRule(PROTO_ANY, 80),)


def test_combining_peer_kinds_in_one_rule_is_rejected() -> None:
    doc = cnp(ingress({"fromEndpoints": [{}], "fromCIDR": ["10.0.0.0/8"]}))
    assert_error(doc, "spec.ingress[0]", "combining fromEndpoints and fromCIDR")


# --- direction enforcement --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "enforced"),
    [
        ({"ingress": [{}]}, (True, False)),
        ({"ingressDeny": [{"fromEntities": ["world"]}]}, (True, False)),
        ({"egress": [{}]}, (False, True)),
        ({"egressDeny": [{"toEntities": ["world"]}]}, (False, True)),
        ({"ingress": [{}], "egress": []}, (True, False)),
        ({"ingress": [{}], "egressDeny": [{}]}, (True, True)),
    ],
)
def test_a_direction_is_enforced_by_a_non_empty_section(
    sections: dict[str, Any], enforced: tuple[bool, bool]
) -> None:
    spec = parse(cnp({"endpointSelector": {}, **sections})).specs[0]
    assert (spec.enforces_ingress, spec.enforces_egress) == enforced


def test_enable_default_deny_overrides_enforcement() -> None:
    doc = cnp(
        {
            "endpointSelector": {},
            "ingressDeny": [{"fromEntities": ["world"]}],
            "egress": [{"toEntities": ["all"]}],
            "enableDefaultDeny": {"ingress": False},
        }
    )
    spec = parse(doc).specs[0]
    assert (spec.enforces_ingress, spec.enforces_egress) == (False, True)
    assert spec.rules[0].deny


def test_deny_sections_make_deny_rules() -> None:
    doc = cnp(
        {
            "endpointSelector": {},
            "ingress": [{"fromEntities": ["cluster"]}],
            "ingressDeny": [{"fromEntities": ["world"]}],
            "egress": [{"toEntities": ["world"]}],
            "egressDeny": [{"toCIDR": ["10.0.0.0/8"]}],
        }
    )
    rules = parse(doc).rules
    assert [(r.path, r.direction, r.deny) for r in rules] == [
        ("spec.ingress[0]", Direction.INGRESS, False),
        ("spec.ingressDeny[0]", Direction.INGRESS, True),
        ("spec.egress[0]", Direction.EGRESS, False),
        ("spec.egressDeny[0]", Direction.EGRESS, True),
    ]
    assert [r.index for r in rules] == [0, 1, 2, 3]


# --- spec/specs, descriptions, audit ---------------------------------------------------------


def test_spec_and_specs_are_flattened_in_order() -> None:
    doc = cnp(
        {"endpointSelector": {"matchLabels": {"app": "a"}}, "ingress": [{}, {}]},
        specs=[
            {
                "description": "second",
                "endpointSelector": {"matchLabels": {"app": "b"}},
                "egress": [{"toEntities": ["world"]}],
            },
            {"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["world"]}], "egress": [{}]},
        ],
    )
    policy = parse(doc)
    assert [s.path for s in policy.specs] == ["spec", "specs[0]", "specs[1]"]
    assert [s.description for s in policy.specs] == ["", "second", ""]
    assert [(s.enforces_ingress, s.enforces_egress) for s in policy.specs] == [
        (True, False),
        (False, True),
        (True, True),
    ]
    assert [(r.name, r.path) for r in policy.rules] == [
        ("prod/p[0]", "spec.ingress[0]"),
        ("prod/p[1]", "spec.ingress[1]"),
        ("prod/p[2]", "specs[0].egress[0]"),
        ("prod/p[3]", "specs[1].ingressDeny[0]"),
        ("prod/p[4]", "specs[1].egress[0]"),
    ]
    assert str(policy.specs[1].subject) == "k8s:app=b, k8s:io.kubernetes.pod.namespace=prod"


def test_specs_alone() -> None:
    policy = parse(cnp(specs=[egress({"toEntities": ["world"]})]))
    assert [s.path for s in policy.specs] == ["specs[0]"]
    assert policy.rules[0].path == "specs[0].egress[0]"


@pytest.mark.parametrize(
    ("annotations", "audit"),
    [(None, False), ({AUDIT_ANNOTATION: "true"}, True), ({AUDIT_ANNOTATION: "false"}, False)],
)
def test_audit_annotation(annotations: dict[str, str] | None, audit: bool) -> None:
    doc = cnp(ingress({}))
    if annotations is not None:
        doc["metadata"]["annotations"] = annotations
    assert parse(doc).audit is audit


def test_audit_annotation_must_be_true_or_false() -> None:
    doc = cnp(ingress({}))
    doc["metadata"]["annotations"] = {AUDIT_ANNOTATION: "yes"}
    assert_error(doc, f"metadata.annotations[{AUDIT_ANNOTATION!r}]", 'must be "true" or "false"')


# --- rule names and ids ----------------------------------------------------------------------


def test_rule_ids_are_stable_nonzero_32_bit_hashes_of_kind_and_name() -> None:
    policy = parse(cnp(ingress({}, {}), specs=[egress({})]))
    for rule in policy.rules:
        digest = hashlib.blake2s(f"CiliumNetworkPolicy/{rule.name}".encode(), digest_size=4)
        assert rule.id == int.from_bytes(digest.digest(), "big")
        assert 0 < rule.id < 2**32
        assert rule.id == rule_id(PolicyKind.CNP, rule.name)
    assert [r.id for r in policy.rules] == [
        r.id for r in parse(cnp(ingress({}, {}), specs=[egress({})])).rules
    ]
    assert policy.rule_names() == {r.id: r.name for r in policy.rules}


def test_rule_ids_are_distinct_across_rules_policies_and_kinds() -> None:
    ids = [r.id for r in parse(cnp(ingress(*[{}] * 20))).rules]
    other = cnp(ingress({}))
    other["metadata"]["name"] = "q"
    ids.append(parse(other).rules[0].id)
    same_name_knp = knp({"podSelector": {}, "ingress": [{}]})
    same_name_knp["metadata"]["name"] = "p"
    knp_rule = parse(same_name_knp).rules[0]
    assert knp_rule.name == "prod/p[0]"
    ids.append(knp_rule.id)
    assert len(set(ids)) == len(ids) == 22


def test_rule_id_is_never_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    class ZeroDigest:
        def __init__(self, data: bytes, digest_size: int) -> None:
            assert digest_size == 4

        def digest(self) -> bytes:
            return bytes(4)

    monkeypatch.setattr("services.policy.model.hashlib.blake2s", ZeroDigest)
    assert rule_id(PolicyKind.CNP, "prod/p[0]") == 1


# --- ports -------------------------------------------------------------------------------------


def port_rules(*entries: dict[str, Any]) -> tuple[PortRule, ...]:
    rule = only_rule(cnp(ingress({"toPorts": [{"ports": list(entries)}]})))
    return rule.ports


@pytest.mark.parametrize(
    ("protocol", "number"),
    [
        ("TCP", PROTO_TCP),
        ("UDP", PROTO_UDP),
        ("SCTP", PROTO_SCTP),
        ("ANY", PROTO_ANY),
        ("tcp", PROTO_TCP),
        (None, PROTO_ANY),
    ],
)
def test_cilium_protocols(protocol: str | None, number: int) -> None:
    entry: dict[str, Any] = {"port": "53"}
    if protocol is not None:
        entry["protocol"] = protocol
    assert port_rules(entry) == (PortRule(number, 53),)


def test_cilium_port_forms() -> None:
    assert port_rules(
        {"port": 80, "protocol": "TCP"},
        {"port": "0", "protocol": "UDP"},
        {"port": "8000", "endPort": 8080, "protocol": "TCP"},
        {"port": "9000", "endPort": 9000, "protocol": "TCP"},
        {"port": "HTTP-Alt", "protocol": "TCP"},
    ) == (
        PortRule(PROTO_TCP, 80),
        PortRule(PROTO_UDP, 0),
        PortRule(PROTO_TCP, 8000, 8080),
        PortRule(PROTO_TCP, 9000),
        PortRule(PROTO_TCP, port_name="http-alt"),
    )


def test_icmp_rules() -> None:
    rule = only_rule(
        cnp(
            egress(
                {
                    "icmps": [
                        {"fields": [{"type": 8}, {"type": "EchoReply", "family": "IPv4"}]},
                        {"fields": [{"type": "EchoRequest", "family": "IPv6"}, {"type": "3"}]},
                    ]
                }
            )
        )
    )
    assert rule.ports == (
        PortRule(PROTO_ICMP, 8),
        PortRule(PROTO_ICMP, 0),
        PortRule(PROTO_ICMPV6, 128),
        PortRule(PROTO_ICMP, 3),
    )
    assert all(p.is_icmp for p in rule.ports)


# --- L7 ----------------------------------------------------------------------------------------


def test_l7_rules_of_each_protocol_are_kept() -> None:
    kafka = {"role": "produce", "topic": "deathstar-plans"}
    rule = only_rule(
        cnp(
            ingress(
                {
                    "toPorts": [
                        {
                            "ports": [{"port": "9092", "protocol": "TCP"}],
                            "rules": {"kafka": [kafka]},
                        }
                    ]
                }
            )
        )
    )
    assert rule.ports[0].l7 is not None
    assert rule.ports[0].l7.entries() == [{"kafka": kafka}]
    dns = {"matchPattern": "*.cilium.io"}
    rule = only_rule(
        cnp(
            egress(
                {
                    "toEndpoints": [{}],
                    "toPorts": [
                        {
                            "ports": [
                                {"port": "53", "protocol": "UDP"},
                                {"port": "53", "protocol": "TCP"},
                            ],
                            "rules": {"dns": [dns]},
                        }
                    ],
                }
            )
        )
    )
    assert [p.l7.protocol if p.l7 else None for p in rule.ports] == ["dns", "dns"]
    http = {
        "method": "GET",
        "path": "/public",
        "headers": ["X-My-Header: true"],
        "headerMatches": [{"name": "x-token", "value": "abc", "mismatch": "LOG"}],
    }
    rule = only_rule(
        cnp(
            ingress(
                {
                    "toPorts": [
                        {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [http]}}
                    ]
                }
            )
        )
    )
    assert rule.ports[0].l7 is not None
    assert rule.ports[0].l7.rules() == [http]


def test_to_fqdns_are_peers_and_dns_rules_are_normalized() -> None:
    rule = only_rule(
        cnp(
            egress(
                {
                    "toFQDNs": [{"matchName": "API.Example.com."}, {"matchPattern": "*.cdn.io"}],
                    "toPorts": [
                        {
                            "ports": [{"port": "53", "protocol": "ANY"}],
                            "rules": {"dns": [{"matchPattern": "*.Example.COM"}]},
                        }
                    ],
                }
            )
        )
    )
    assert rule.peers == (
        Peer(fqdn=NameMatch(match_name="api.example.com")),
        Peer(fqdn=NameMatch(match_pattern="*.cdn.io")),
    )
    assert rule.ports[0].l7 is not None
    assert rule.ports[0].l7.rules() == [{"matchPattern": "*.example.com"}]


def test_empty_rules_mapping_is_no_l7_and_empty_http_list_is_l7() -> None:
    rule = only_rule(
        cnp(ingress({"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {}}]}))
    )
    assert rule.ports[0].l7 is None
    assert not rule.has_l7
    rule = only_rule(
        cnp(
            ingress(
                {"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": []}}]}
            )
        )
    )
    assert rule.ports[0].l7 is not None
    assert rule.ports[0].l7.rules() == []
    assert rule.has_l7


def test_policy_without_l7_says_so() -> None:
    assert not parse(cnp(ingress({"toPorts": [{"ports": [{"port": "80"}]}]}))).has_l7


# --- NetworkPolicy -----------------------------------------------------------------------------


def test_network_policy_subject_and_default_policy_types() -> None:
    policy = parse(knp({"podSelector": {"matchLabels": {"app": "db"}}}))
    assert policy.kind is PolicyKind.KNP
    assert policy.key == "prod/np"
    (spec,) = policy.specs
    assert str(spec.subject) == "k8s:app=db, k8s:io.kubernetes.pod.namespace=prod"
    # no policyTypes, no egress: Ingress only, and an absent ingress list denies all ingress
    assert (spec.enforces_ingress, spec.enforces_egress) == (True, False)
    assert spec.rules == ()


@pytest.mark.parametrize(
    ("spec", "enforced", "directions"),
    [
        ({"podSelector": {}, "egress": [{}]}, (True, True), [Direction.EGRESS]),
        ({"podSelector": {}, "egress": []}, (True, False), []),
        ({"podSelector": {}, "ingress": [], "policyTypes": ["Ingress"]}, (True, False), []),
        ({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, (True, True), []),
        ({"podSelector": {}, "policyTypes": []}, (True, False), []),
        (
            {"podSelector": {}, "ingress": [{}], "egress": [{}], "policyTypes": ["Egress"]},
            (False, True),
            [Direction.EGRESS],
        ),
        ({"podSelector": {}, "ingress": [{}]}, (True, False), [Direction.INGRESS]),
    ],
)
def test_network_policy_types(
    spec: dict[str, Any], enforced: tuple[bool, bool], directions: list[Direction]
) -> None:
    policy = parse(knp(spec))
    (parsed,) = policy.specs
    assert (parsed.enforces_ingress, parsed.enforces_egress) == enforced
    assert [r.direction for r in parsed.rules] == directions


def test_network_policy_rules_of_an_unlisted_direction_are_ignored_with_a_warning() -> None:
    policy = parse(
        knp({"podSelector": {}, "ingress": [{}], "egress": [{}], "policyTypes": ["Egress"]})
    )
    assert policy.warnings == ("spec.ingress: ignored, policyTypes does not include Ingress",)
    (rule,) = policy.rules
    assert (rule.name, rule.path, rule.index) == ("prod/np[0]", "spec.egress[0]", 0)


def test_network_policy_missing_spec_denies_all_ingress_of_the_namespace() -> None:
    spec = parse(knp(None)).specs[0]
    assert str(spec.subject) == "k8s:io.kubernetes.pod.namespace=prod"
    assert (spec.enforces_ingress, spec.enforces_egress, spec.rules) == (True, False, ())


def test_network_policy_allow_all_rule() -> None:
    rule = only_rule(knp({"podSelector": {}, "ingress": [{}]}))
    assert rule.peers == (ALL,)
    assert rule.ports == ()
    rule = only_rule(
        knp({"podSelector": {}, "egress": [{"to": [], "ports": []}], "policyTypes": ["Egress"]})
    )
    assert (rule.direction, rule.peers, rule.ports) == (Direction.EGRESS, (ALL,), ())


def knp_peers(*peers: dict[str, Any]) -> tuple[Peer, ...]:
    return only_rule(knp({"podSelector": {}, "ingress": [{"from": list(peers)}]})).peers


def knp_selector(peer: dict[str, Any]) -> Selector:
    (parsed,) = knp_peers(peer)
    assert parsed.selector is not None
    return parsed.selector


def test_network_policy_pod_selector_peer_is_the_policy_namespace() -> None:
    selector = knp_selector({"podSelector": {"matchLabels": {"app": "web"}}})
    assert str(selector) == "k8s:app=web, k8s:io.kubernetes.pod.namespace=prod"
    assert selector.matches(pod("prod", app="web"))
    assert not selector.matches(pod("dev", app="web"))
    everything = knp_selector({"podSelector": {}})
    assert str(everything) == "k8s:io.kubernetes.pod.namespace=prod"
    assert everything.matches(pod("prod", app="x"))
    assert not everything.matches(pod("dev", app="x"))


def test_network_policy_namespace_selector_peer_is_all_pods_of_matching_namespaces() -> None:
    selector = knp_selector({"namespaceSelector": {"matchLabels": {"team": "blue"}}})
    assert str(selector) == (
        "k8s:io.cilium.k8s.namespace.labels.team=blue, k8s:io.kubernetes.pod.namespace"
    )
    assert selector.matches(pod("dev", {"team": "blue"}, app="x"))
    assert not selector.matches(pod("prod", {"team": "red"}, app="x"))
    everywhere = knp_selector({"namespaceSelector": {}})
    assert str(everywhere) == "k8s:io.kubernetes.pod.namespace"
    assert everywhere.matches(pod("any", app="x"))
    assert not everywhere.matches({})  # not world, not host


def test_network_policy_namespace_selector_with_match_expressions() -> None:
    expr = {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["prod"]}
    selector = knp_selector({"namespaceSelector": {"matchExpressions": [expr]}})
    assert selector.matches(pod("dev", {"kubernetes.io/metadata.name": "dev"}))
    assert not selector.matches(pod("prod", {"kubernetes.io/metadata.name": "prod"}))
    assert not selector.matches({})  # NotIn never selects a reserved identity here


def test_network_policy_pod_and_namespace_selector_in_one_peer_is_and() -> None:
    selector = knp_selector(
        {
            "namespaceSelector": {"matchLabels": {"team": "blue"}},
            "podSelector": {"matchLabels": {"app": "web"}},
        }
    )
    assert selector.matches(pod("dev", {"team": "blue"}, app="web"))
    assert not selector.matches(pod("dev", {"team": "blue"}, app="db"))
    assert not selector.matches(pod("prod", {"team": "red"}, app="web"))


def test_network_policy_separate_peers_are_or() -> None:
    first, second = knp_peers(
        {"namespaceSelector": {"matchLabels": {"team": "blue"}}},
        {"podSelector": {"matchLabels": {"app": "web"}}},
    )
    assert first.selector is not None and second.selector is not None
    blue_db = pod("dev", {"team": "blue"}, app="db")
    local_web = pod("prod", {"team": "red"}, app="web")
    assert first.selector.matches(blue_db) and not second.selector.matches(blue_db)
    assert second.selector.matches(local_web) and not first.selector.matches(local_web)


def test_network_policy_ip_block_with_except() -> None:
    (peer,) = knp_peers({"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}})
    # Kubernetes' meaning: pod addresses in the block match too
    assert peer.cidr == CIDRRule(
        ipaddress.ip_network("172.17.0.0/16"), (ipaddress.ip_network("172.17.1.0/24"),), pods=True
    )


def test_network_policy_ports() -> None:
    rule = only_rule(
        knp(
            {
                "podSelector": {},
                "ingress": [
                    {
                        "ports": [
                            {"port": 80},
                            {"protocol": "UDP", "port": 53},
                            {"protocol": "SCTP"},
                            {"port": "http"},
                            {"port": 32000, "endPort": 32768},
                            {},
                        ]
                    }
                ],
            }
        )
    )
    assert rule.peers == (ALL,)
    assert rule.ports == (
        PortRule(PROTO_TCP, 80),
        PortRule(PROTO_UDP, 53),
        PortRule(PROTO_SCTP),
        PortRule(PROTO_TCP, port_name="http"),
        PortRule(PROTO_TCP, 32000, 32768),
        PortRule(PROTO_TCP),
    )


def test_network_policy_egress_to_another_namespace() -> None:
    doc = knp(
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "db"}
                            }
                        }
                    ],
                    "ports": [{"port": 5432}],
                }
            ],
        }
    )
    rule = only_rule(doc)
    assert rule.direction is Direction.EGRESS
    assert rule.peers[0].selector is not None
    assert rule.peers[0].selector.matches(pod("db", {"kubernetes.io/metadata.name": "db"}))


# --- several documents -------------------------------------------------------------------------

MULTI = """\
--- # an empty document, still counted
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: world-out}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [world]
"""


def test_parse_documents_reads_every_policy() -> None:
    policies = parse_documents(MULTI, SOURCE)
    assert [(p.kind, p.key) for p in policies] == [
        (PolicyKind.KNP, "prod/deny-all"),
        (PolicyKind.CCNP, "world-out"),
    ]


def test_parse_documents_counts_empty_documents_in_error_locations() -> None:
    text = (
        MULTI + "---\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        "metadata: {name: bad}\nspec:\n  endpointSelector: {}\n"
        "  ingress: [{fromEntities: [wrld]}]\n"
    )
    with pytest.raises(PolicyDocumentError) as info:
        parse_documents(text, "policies.yaml")
    assert str(info.value) == (
        "policies.yaml: document 5 (CiliumNetworkPolicy/bad): "
        "spec.ingress[0].fromEntities[0]: unknown entity 'wrld' (did you mean 'world'?); "
        "membrane knows all, world, cluster, host, remote-node, health, init, unmanaged, "
        "kube-apiserver, ingress, none"
    )
    assert info.value.field == "spec.ingress[0].fromEntities[0]"
    assert isinstance(info.value, InvalidArgument)


def test_list_items_are_read_in_place() -> None:
    text = """\
apiVersion: v1
kind: List
items:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: a}
  spec: {podSelector: {}}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: b}
  spec: {podSelector: {}, policyTypes: [Sideways]}
"""
    with pytest.raises(PolicyDocumentError) as info:
        parse_documents(text, SOURCE)
    assert str(info.value).startswith(
        "test.yaml: document 1 items[1] (NetworkPolicy/b): spec.policyTypes[0]: "
    )
    assert [p.key for p in parse_documents(text.replace("Sideways", "Egress"), SOURCE)] == [
        "default/a",
        "default/b",
    ]


def test_a_policy_defined_twice_is_an_error() -> None:
    text = MULTI + "---\n" + MULTI.split("---\n")[1]
    with pytest.raises(PolicyDocumentError) as info:
        parse_documents(text, SOURCE)
    assert info.value.field == "metadata.name"
    assert "NetworkPolicy prod/deny-all is defined twice, first by document 2" in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("kind: [", "test.yaml: invalid YAML at line 1"),
        ("a: 1\na: 2\n", "duplicate key 'a'"),
    ],
)
def test_invalid_yaml(text: str, fragment: str) -> None:
    with pytest.raises(PolicyDocumentError) as info:
        parse_documents(text, SOURCE)
    assert fragment in str(info.value)


def test_timestamps_stay_strings() -> None:
    doc_text = MULTI.replace(
        "metadata: {name: world-out}",
        "metadata: {name: world-out, creationTimestamp: 2024-01-01T00:00:00Z}",
    )
    policy = parse_documents(doc_text, SOURCE)[1]
    assert policy.source["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"


# --- every error, with its field path ----------------------------------------------------------


def with_meta(**meta: Any) -> dict[str, Any]:
    doc = cnp(ingress({}))
    doc["metadata"] = meta
    return doc


def cnp_rule(rule: dict[str, Any]) -> dict[str, Any]:
    return cnp(ingress(rule))


def cnp_egress_rule(rule: dict[str, Any]) -> dict[str, Any]:
    return cnp(egress(rule))


def cnp_port(entry: dict[str, Any], rules: Any = None) -> dict[str, Any]:
    port_rule: dict[str, Any] = {"ports": [entry]}
    if rules is not None:
        port_rule["rules"] = rules
    return cnp_rule({"toPorts": [port_rule]})


def knp_rule(rule: dict[str, Any]) -> dict[str, Any]:
    return knp({"podSelector": {}, "ingress": [rule]})


def knp_port(entry: dict[str, Any]) -> dict[str, Any]:
    return knp_rule({"ports": [entry]})


TP = "spec.ingress[0].toPorts[0]"
PORT = f"{TP}.ports[0]"
KPORT = "spec.ingress[0].ports[0]"
KPEER = "spec.ingress[0].from[0]"
HTTP_80 = {"port": "80", "protocol": "TCP"}

ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    # document and metadata
    (
        "missing kind",
        {"apiVersion": "cilium.io/v2", "metadata": {"name": "x"}},
        "kind",
        "is required",
    ),
    ("not a policy", {**cnp(ingress({})), "kind": "Pod"}, "kind", "'Pod' is not a policy"),
    (
        "wrong apiVersion",
        {**cnp(ingress({})), "apiVersion": "cilium.io/v1"},
        "apiVersion",
        "served as apiVersion 'cilium.io/v2', got 'cilium.io/v1'",
    ),
    (
        "knp wrong apiVersion",
        {**knp({}), "apiVersion": "extensions/v1beta1"},
        "apiVersion",
        "'networking.k8s.io/v1'",
    ),
    (
        "unknown top-level field",
        {**cnp(ingress({})), "specc": []},
        "specc",
        "unknown field (did you mean 'spec'?)",
    ),
    (
        "missing metadata",
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "spec": ingress({})},
        "metadata",
        "is required",
    ),
    ("missing name", with_meta(namespace="prod"), "metadata.name", "is required"),
    (
        "generateName",
        with_meta(generateName="p-"),
        "metadata.name",
        "generateName is not supported",
    ),
    ("bad name", with_meta(name="Bad_Name"), "metadata.name", "not a DNS-1123 subdomain"),
    (
        "bad namespace",
        with_meta(name="p", namespace="Prod"),
        "metadata.namespace",
        "not a DNS-1123 label",
    ),
    (
        "unknown metadata field",
        with_meta(name="p", lables={}),
        "metadata.lables",
        "did you mean 'labels'?",
    ),
    (
        "bad metadata label",
        with_meta(name="p", labels={"a b": "x"}),
        "metadata.labels['a b']",
        "label key name",
    ),
    (
        "annotation not a string",
        with_meta(name="p", annotations={AUDIT_ANNOTATION: True}),
        f"metadata.annotations[{AUDIT_ANNOTATION!r}]",
        "value must be a string",
    ),
    # spec structure
    ("no spec", cnp(), "spec", "needs a spec or a non-empty specs list"),
    ("empty specs", cnp(specs=[]), "spec", "needs a spec or a non-empty specs list"),
    ("specs not a list", cnp(specs={"endpointSelector": {}}), "specs", "must be a list"),
    ("spec not a mapping", cnp(specs=["x"]), "specs[0]", "must be a mapping"),
    (
        "no endpointSelector",
        cnp({"ingress": [{}]}),
        "spec.endpointSelector",
        "is required (use {} to select every pod of the namespace)",
    ),
    (
        "nodeSelector",
        cnp({"nodeSelector": {}, "ingress": [{}]}),
        "spec.nodeSelector",
        "host policies (nodeSelector) are not supported",
    ),
    (
        "no sections",
        cnp({"endpointSelector": {}}),
        "spec",
        "must have a non-empty ingress, ingressDeny, egress or egressDeny list",
    ),
    (
        "only empty sections",
        cnp({"endpointSelector": {}, "ingress": [], "egress": []}),
        "spec",
        "must have a non-empty",
    ),
    (
        "misspelt section",
        cnp({"endpointSelector": {}, "ingres": [{}]}),
        "spec.ingres",
        "unknown field (did you mean 'ingress'?)",
    ),
    (
        "section not a list",
        cnp({"endpointSelector": {}, "ingress": {}}),
        "spec.ingress",
        "must be a list",
    ),
    (
        "description not a string",
        cnp({**ingress({}), "description": 3}),
        "spec.description",
        "must be a string",
    ),
    ("log", cnp({**ingress({}), "log": {"value": "x"}}), "spec.log", "policy logging"),
    (
        "enableDefaultDeny type",
        cnp({**ingress({}), "enableDefaultDeny": {"ingress": "no"}}),
        "spec.enableDefaultDeny.ingress",
        "must be true or false",
    ),
    (
        "enableDefaultDeny field",
        cnp({**ingress({}), "enableDefaultDeny": {"ingres": False}}),
        "spec.enableDefaultDeny.ingres",
        "did you mean 'ingress'?",
    ),
    # rules
    ("rule not a mapping", cnp(ingress("x")), "spec.ingress[0]", "must be a mapping"),  # type: ignore[arg-type]
    (
        "misspelt rule field",
        cnp_rule({"fromEndpoint": [{}]}),
        "spec.ingress[0].fromEndpoint",
        "did you mean 'fromEndpoints'?",
    ),
    (
        "egress field in ingress",
        cnp_rule({"toEndpoints": [{}]}),
        "spec.ingress[0].toEndpoints",
        "unknown field (did you mean 'fromEndpoints'?)",
    ),
    (
        "fromRequires",
        cnp_rule({"fromRequires": [{}]}),
        "spec.ingress[0].fromRequires",
        "fromRequires is not supported",
    ),
    (
        "toFQDNs at ingress",
        cnp_rule({"toFQDNs": [{"matchName": "a.io"}]}),
        "spec.ingress[0].toFQDNs",
        "toFQDNs is allowed in egress rules only",
    ),
    (
        "toFQDNs in egressDeny",
        cnp({"endpointSelector": {}, "egressDeny": [{"toFQDNs": [{"matchName": "a.io"}]}]}),
        "spec.egressDeny[0].toFQDNs",
        "toFQDNs is allowed in egress rules only",
    ),
    (
        "toFQDNs bad pattern",
        cnp_egress_rule({"toFQDNs": [{"matchPattern": "*.exa mple.com"}]}),
        "spec.egress[0].toFQDNs[0].matchPattern",
        "is not a DNS name pattern",
    ),
    (
        "toFQDNs bad name",
        cnp_egress_rule({"toFQDNs": [{"matchName": "*.example.com"}]}),
        "spec.egress[0].toFQDNs[0].matchName",
        "is not a DNS name",
    ),
    (
        "toFQDNs both",
        cnp_egress_rule({"toFQDNs": [{"matchName": "a.io", "matchPattern": "*.io"}]}),
        "spec.egress[0].toFQDNs[0]",
        "needs exactly one of matchName and matchPattern",
    ),
    (
        "toFQDNs with toEndpoints",
        cnp_egress_rule({"toFQDNs": [{"matchName": "a.io"}], "toEndpoints": [{}]}),
        "spec.egress[0]",
        "combining toEndpoints and toFQDNs in one rule is not supported",
    ),
    (
        "toFQDNs label too long",
        cnp_egress_rule({"toFQDNs": [{"matchName": "a" * 64 + ".io"}]}),
        "spec.egress[0].toFQDNs[0].matchName",
        "is longer than 63",
    ),
    (
        "dns rule bad pattern",
        cnp_egress_rule(
            {
                "toEndpoints": [{}],
                "toPorts": [
                    {
                        "ports": [{"port": "53", "protocol": "UDP"}],
                        "rules": {"dns": [{"matchPattern": "api.*.com/"}]},
                    }
                ],
            }
        ),
        "spec.egress[0].toPorts[0].rules.dns[0].matchPattern",
        "is not a DNS name pattern",
    ),
    (
        "toServices",
        cnp_egress_rule({"toServices": []}),
        "spec.egress[0].toServices",
        "toServices is not supported",
    ),
    (
        "authentication",
        cnp_rule({"authentication": {"mode": "required"}}),
        "spec.ingress[0].authentication",
        "mutual authentication is not supported",
    ),
    (
        "icmps with toPorts",
        cnp_rule({"toPorts": [{"ports": [HTTP_80]}], "icmps": [{"fields": [{"type": 8}]}]}),
        "spec.ingress[0]",
        "icmps and toPorts cannot be in the same rule",
    ),
    # selectors
    (
        "selector not a mapping",
        cnp_rule({"fromEndpoints": ["app=web"]}),
        "spec.ingress[0].fromEndpoints[0]",
        "must be a mapping with matchLabels/matchExpressions",
    ),
    (
        "bad operator",
        cnp_rule(
            {
                "fromEndpoints": [
                    {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}
                ]
            }
        ),
        "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator",
        "operator 'Equals' is not one of",
    ),
    (
        "In without values",
        cnp_rule({"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "In"}]}]}),
        "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values",
        "needs at least one value",
    ),
    (
        "Exists with values",
        cnp(
            ingress(
                {},
                selector={
                    "matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]
                },
            )
        ),
        "spec.endpointSelector.matchExpressions[0].values",
        "takes no values",
    ),
    (
        "invalid label key",
        cnp(ingress({}, selector={"matchLabels": {"-app": "web"}})),
        "spec.endpointSelector.matchLabels['-app']",
        "must start and end with a letter or digit",
    ),
    (
        "invalid label value",
        cnp_rule({"fromEndpoints": [{"matchLabels": {"app": "a b"}}]}),
        "spec.ingress[0].fromEndpoints[0].matchLabels['app']",
        "label value 'a b'",
    ),
    (
        "label value not a string",
        cnp_rule({"fromEndpoints": [{"matchLabels": {"v": 1}}]}),
        "spec.ingress[0].fromEndpoints[0].matchLabels['v']",
        "value must be a string, got int",
    ),
    (
        "reserved label",
        cnp_rule({"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}),
        "spec.ingress[0].fromEndpoints[0].matchLabels['reserved:host']",
        "use fromEntities/toEntities",
    ),
    (
        "unknown label source",
        cnp(
            ingress(
                {}, selector={"matchExpressions": [{"key": "container:app", "operator": "Exists"}]}
            )
        ),
        "spec.endpointSelector.matchExpressions[0].key",
        "label source 'container' is not supported",
    ),
    (
        "unknown selector field",
        cnp(ingress({}, selector={"matchLabel": {"app": "a"}})),
        "spec.endpointSelector",
        "unknown field(s) matchLabel",
    ),
    # entities and CIDRs
    (
        "unknown entity",
        cnp_rule({"fromEntities": ["internet"]}),
        "spec.ingress[0].fromEntities[0]",
        "unknown entity 'internet'",
    ),
    (
        "world-ipv4",
        cnp_rule({"fromEntities": ["world-ipv4"]}),
        "spec.ingress[0].fromEntities[0]",
        "unknown entity 'world-ipv4' (did you mean 'world'?)",
    ),
    (
        "combining entities and cidr",
        cnp_egress_rule({"toEntities": ["world"], "toCIDR": ["1.1.1.1"]}),
        "spec.egress[0]",
        "combining toCIDR and toEntities",
    ),
    (
        "bad cidr",
        cnp_rule({"fromCIDR": ["10.0.0.0/33"]}),
        "spec.ingress[0].fromCIDR[0]",
        "'10.0.0.0/33' is not an IP address or CIDR",
    ),
    (
        "cidr not a string",
        cnp_rule({"fromCIDR": [10]}),
        "spec.ingress[0].fromCIDR[0]",
        "must be a CIDR string, got integer 10",
    ),
    (
        "cidr set needs a prefix",
        cnp_rule({"fromCIDRSet": [{"cidr": "10.0.0.1"}]}),
        "spec.ingress[0].fromCIDRSet[0].cidr",
        "is not a CIDR: write address/prefix-length",
    ),
    (
        "cidr set without cidr",
        cnp_rule({"fromCIDRSet": [{"except": ["10.0.0.0/8"]}]}),
        "spec.ingress[0].fromCIDRSet[0].cidr",
        "is required",
    ),
    (
        "except outside cidr",
        cnp_rule({"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}),
        "spec.ingress[0].fromCIDRSet[0].except[0]",
        "11.0.0.0/16 is not a strict subnet of 10.0.0.0/8",
    ),
    (
        "except equal to cidr",
        cnp_rule({"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}]}),
        "spec.ingress[0].fromCIDRSet[0].except[0]",
        "not a strict subnet",
    ),
    (
        "except wider than cidr",
        cnp_rule({"fromCIDRSet": [{"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}]}),
        "spec.ingress[0].fromCIDRSet[0].except[0]",
        "not a strict subnet",
    ),
    (
        "except other family",
        cnp_rule({"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["::/64"]}]}),
        "spec.ingress[0].fromCIDRSet[0].except[0]",
        "not a strict subnet",
    ),
    (
        "cidrGroupRef",
        cnp_rule({"fromCIDRSet": [{"cidrGroupRef": "grp"}]}),
        "spec.ingress[0].fromCIDRSet[0].cidrGroupRef",
        "CiliumCIDRGroup references are not supported",
    ),
    # Cilium ports
    (
        "port missing",
        cnp_port({"protocol": "TCP"}),
        f"{PORT}.port",
        "is required (0 for every port)",
    ),
    (
        "port out of range",
        cnp_port({"port": "65536"}),
        f"{PORT}.port",
        "must be in 0..65535, got 65536",
    ),
    (
        "port not a number or name",
        cnp_port({"port": 1.5}),
        f"{PORT}.port",
        "must be a port number or a port name, got number 1.5",
    ),
    ("bad port name", cnp_port({"port": "my--port"}), f"{PORT}.port", "without '--'"),
    (
        "long port name",
        cnp_port({"port": "a-very-long-port-name"}),
        f"{PORT}.port",
        "longer than 15 characters",
    ),
    (
        "endPort below port",
        cnp_port({"port": "90", "endPort": 80}),
        f"{PORT}.endPort",
        "must be greater than or equal to port (80 < 90)",
    ),
    (
        "endPort with named port",
        cnp_port({"port": "http", "endPort": 90}),
        f"{PORT}.endPort",
        "cannot be used with a named port",
    ),
    (
        "endPort with port 0",
        cnp_port({"port": "0", "endPort": 90}),
        f"{PORT}.endPort",
        "needs a port to start the range",
    ),
    (
        "endPort out of range",
        cnp_port({"port": "80", "endPort": 70000}),
        f"{PORT}.endPort",
        "must be an integer in 1..65535, got 70000",
    ),
    (
        "unknown protocol",
        cnp_port({"port": "80", "protocol": "QUIC"}),
        f"{PORT}.protocol",
        "protocol 'QUIC' is not supported; use one of TCP, UDP, SCTP, ANY",
    ),
    (
        "icmp protocol in toPorts",
        cnp_port({"port": "0", "protocol": "ICMP"}),
        f"{PORT}.protocol",
        "(use icmps for ICMP)",
    ),
    (
        "unknown port field",
        cnp_port({"port": "80", "prot": "TCP"}),
        f"{PORT}.prot",
        "did you mean 'port'?",
    ),
    (
        "toPorts without ports",
        cnp_rule({"toPorts": [{}]}),
        f"{TP}.ports",
        "must list at least one port",
    ),
    (
        "too many ports",
        cnp_rule({"toPorts": [{"ports": [{"port": str(p)} for p in range(1, 42)]}]}),
        f"{TP}.ports",
        "at most 40 ports, got 41",
    ),
    (
        "TLS",
        cnp_rule({"toPorts": [{"ports": [HTTP_80], "terminatingTLS": {}}]}),
        f"{TP}.terminatingTLS",
        "TLS interception is not supported",
    ),
    # ICMP
    (
        "icmp type name",
        cnp_rule({"icmps": [{"fields": [{"type": "Ping"}]}]}),
        "spec.ingress[0].icmps[0].fields[0].type",
        "IPv4 ICMP type name",
    ),
    (
        "icmp type range",
        cnp_rule({"icmps": [{"fields": [{"type": 256}]}]}),
        "spec.ingress[0].icmps[0].fields[0].type",
        "must be in 0..255, got 256",
    ),
    (
        "icmp type missing",
        cnp_rule({"icmps": [{"fields": [{"family": "IPv4"}]}]}),
        "spec.ingress[0].icmps[0].fields[0].type",
        "is required",
    ),
    (
        "icmp family",
        cnp_rule({"icmps": [{"fields": [{"type": 8, "family": "IPv5"}]}]}),
        "spec.ingress[0].icmps[0].fields[0].family",
        "must be IPv4 or IPv6, got 'IPv5'",
    ),
    (
        "icmp IPv6 name under IPv4",
        cnp_rule({"icmps": [{"fields": [{"type": "PacketTooBig"}]}]}),
        "spec.ingress[0].icmps[0].fields[0].type",
        "IPv4 ICMP type name",
    ),
    # L7
    (
        "http on UDP",
        cnp_port({"port": "80", "protocol": "UDP"}, {"http": [{}]}),
        f"{TP}.rules.http",
        "http rules apply to TCP ports only",
    ),
    (
        "http on ANY",
        cnp_port({"port": "80"}, {"http": [{}]}),
        f"{TP}.rules.http",
        "set protocol: TCP",
    ),
    (
        "http on port 0",
        cnp_port({"port": "0", "protocol": "TCP"}, {"http": [{}]}),
        f"{TP}.rules.http",
        "cannot be used with port 0",
    ),
    (
        "dns at ingress",
        cnp_port({"port": "53", "protocol": "UDP"}, {"dns": [{"matchName": "a.io"}]}),
        f"{TP}.rules.dns",
        "DNS rules are only allowed at egress",
    ),
    (
        "two L7 protocols",
        cnp_port(HTTP_80, {"http": [{}], "kafka": [{}]}),
        f"{TP}.rules",
        "one L7 protocol per port rule",
    ),
    (
        "unknown http field",
        cnp_port(HTTP_80, {"http": [{"url": "/"}]}),
        f"{TP}.rules.http[0].url",
        "unknown field",
    ),
    (
        "http field type",
        cnp_port(HTTP_80, {"http": [{"method": ["GET"]}]}),
        f"{TP}.rules.http[0].method",
        "must be a string, got list",
    ),
    (
        "http header type",
        cnp_port(HTTP_80, {"http": [{"headers": [1]}]}),
        f"{TP}.rules.http[0].headers[0]",
        "must be a string",
    ),
    (
        "header match name",
        cnp_port(HTTP_80, {"http": [{"headerMatches": [{"value": "x"}]}]}),
        f"{TP}.rules.http[0].headerMatches[0].name",
        "is required",
    ),
    (
        "header mismatch action",
        cnp_port(HTTP_80, {"http": [{"headerMatches": [{"name": "a", "mismatch": "DROP"}]}]}),
        f"{TP}.rules.http[0].headerMatches[0].mismatch",
        "must be one of LOG, ADD, DELETE, REPLACE",
    ),
    (
        "kafka role",
        cnp_port(HTTP_80, {"kafka": [{"role": "admin"}]}),
        f"{TP}.rules.kafka[0].role",
        "must be one of produce, consume",
    ),
    (
        "kafka role and apiKey",
        cnp_port(HTTP_80, {"kafka": [{"role": "produce", "apiKey": "fetch"}]}),
        f"{TP}.rules.kafka[0]",
        "role and apiKey cannot both be set",
    ),
    (
        "kafka apiKey",
        cnp_port(HTTP_80, {"kafka": [{"apiKey": "produceall"}]}),
        f"{TP}.rules.kafka[0].apiKey",
        "unknown Kafka API key 'produceall'",
    ),
    (
        "kafka apiVersion",
        cnp_port(HTTP_80, {"kafka": [{"apiKey": "fetch", "apiVersion": "-1"}]}),
        f"{TP}.rules.kafka[0].apiVersion",
        "must be a version number 0-32767",
    ),
    (
        "kafka apiVersion too big",
        cnp_port(HTTP_80, {"kafka": [{"apiVersion": "40000"}]}),
        f"{TP}.rules.kafka[0].apiVersion",
        "must be a version number 0-32767",
    ),
    (
        "kafka topic characters",
        cnp_port(HTTP_80, {"kafka": [{"role": "consume", "topic": "death star"}]}),
        f"{TP}.rules.kafka[0].topic",
        "must be a Kafka topic name",
    ),
    (
        "kafka topic length",
        cnp_port(HTTP_80, {"kafka": [{"topic": "t" * 256}]}),
        f"{TP}.rules.kafka[0].topic",
        "at most 255",
    ),
    (
        "kafka clientID type",
        cnp_port(HTTP_80, {"kafka": [{"clientID": 7}]}),
        f"{TP}.rules.kafka[0].clientID",
        "must be a string",
    ),
    (
        "l7proto",
        cnp_port(HTTP_80, {"l7proto": "x"}),
        f"{TP}.rules.l7proto",
        "generic L7 protocols (l7proto) are not supported",
    ),
    ("rules not a mapping", cnp_port(HTTP_80, ["http"]), f"{TP}.rules", "must be a mapping"),
    # deny rules
    (
        "L7 in a deny rule",
        cnp(
            {
                "endpointSelector": {},
                "ingressDeny": [{"toPorts": [{"ports": [HTTP_80], "rules": {"http": [{}]}}]}],
            }
        ),
        "spec.ingressDeny[0].toPorts[0].rules",
        "L7 rules are not allowed in deny rules",
    ),
    # NetworkPolicy
    (
        "knp podSelector not a mapping",
        knp({"podSelector": []}),
        "spec.podSelector",
        "must be a mapping with matchLabels/matchExpressions",
    ),
    (
        "knp unknown spec field",
        knp({"podSelector": {}, "ingres": []}),
        "spec.ingres",
        "did you mean 'ingress'?",
    ),
    (
        "knp policyTypes value",
        knp({"podSelector": {}, "policyTypes": ["ingress"]}),
        "spec.policyTypes[0]",
        "must be Ingress or Egress, got string 'ingress'",
    ),
    (
        "knp too many policyTypes",
        knp({"podSelector": {}, "policyTypes": ["Ingress", "Egress", "Ingress"]}),
        "spec.policyTypes",
        "may not specify more than two policyTypes",
    ),
    (
        "knp prefixed key",
        knp({"podSelector": {"matchLabels": {"k8s:app": "a"}}}),
        "spec.podSelector.matchLabels['k8s:app']",
        "is not a Kubernetes label key",
    ),
    (
        "knp bad selector operator",
        knp_rule(
            {"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}]}
        ),
        f"{KPEER}.podSelector.matchExpressions[0].operator",
        "operator 'Is' is not one of",
    ),
    ("knp empty peer", knp_rule({"from": [{}]}), KPEER, "must specify a peer"),
    (
        "knp ipBlock and podSelector",
        knp_rule({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}),
        KPEER,
        "may not specify both ipBlock and another peer",
    ),
    (
        "knp ipBlock without cidr",
        knp_rule({"from": [{"ipBlock": {}}]}),
        f"{KPEER}.ipBlock.cidr",
        "is required",
    ),
    (
        "knp ipBlock except outside",
        knp_rule({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}),
        f"{KPEER}.ipBlock.except[0]",
        "not a strict subnet of 10.0.0.0/8",
    ),
    (
        "knp ipBlock except disjoint from its cidr",
        knp_rule({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.1.0/24"]}}]}),
        f"{KPEER}.ipBlock.except[0]",
        "192.168.1.0/24 is not a strict subnet of 10.0.0.0/8",
    ),
    (
        "knp ipBlock IPv6 except in an IPv4 cidr",
        knp_rule({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}}]}),
        f"{KPEER}.ipBlock.except[0]",
        "not a strict subnet of 10.0.0.0/8",
    ),
    (
        "knp ipBlock bad except",
        knp_rule({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/33"]}}]}),
        f"{KPEER}.ipBlock.except[0]",
        "'10.1.0.0/33' is not a CIDR",
    ),
    (
        "knp egress ipBlock except outside",
        knp(
            {
                "podSelector": {},
                "egress": [
                    {"to": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.0.0.0/8"]}}]}
                ],
            }
        ),
        "spec.egress[0].to[0].ipBlock.except[0]",
        "10.0.0.0/8 is not a strict subnet of 10.1.0.0/16",
    ),
    (
        "knp ipBlock address without prefix",
        knp_rule({"from": [{"ipBlock": {"cidr": "10.1.2.3"}}]}),
        f"{KPEER}.ipBlock.cidr",
        "is not a CIDR",
    ),
    (
        "knp bad ipBlock",
        knp_rule({"from": [{"ipBlock": {"cidr": "10.0.0/8"}}]}),
        f"{KPEER}.ipBlock.cidr",
        "is not a CIDR",
    ),
    (
        "knp unknown peer field",
        knp_rule({"from": [{"podselector": {}}]}),
        f"{KPEER}.podselector",
        "did you mean 'podSelector'?",
    ),
    (
        "knp from in egress",
        knp({"podSelector": {}, "egress": [{"from": []}]}),
        "spec.egress[0].from",
        "unknown field: ingress rules use 'from', these use 'to'",
    ),
    ("knp port 0", knp_port({"port": 0}), f"{KPORT}.port", "must be in 1..65535, got 0"),
    ("knp port too big", knp_port({"port": 65536}), f"{KPORT}.port", "must be in 1..65535"),
    (
        "knp quoted number",
        knp_port({"port": "80"}),
        f"{KPORT}.port",
        "must contain a letter (write a port number unquoted)",
    ),
    ("knp uppercase port name", knp_port({"port": "HTTP"}), f"{KPORT}.port", "must be lowercase"),
    (
        "knp lowercase protocol",
        knp_port({"protocol": "tcp", "port": 80}),
        f"{KPORT}.protocol",
        "must be one of TCP, UDP, SCTP, got 'tcp'",
    ),
    (
        "knp ANY protocol",
        knp_port({"protocol": "ANY", "port": 80}),
        f"{KPORT}.protocol",
        "must be one of TCP, UDP, SCTP",
    ),
    (
        "knp endPort without port",
        knp_port({"endPort": 90}),
        f"{KPORT}.endPort",
        "may not be specified when port is not",
    ),
    (
        "knp endPort with named port",
        knp_port({"port": "http", "endPort": 90}),
        f"{KPORT}.endPort",
        "may not be specified when port is a named port",
    ),
    (
        "knp endPort below port",
        knp_port({"port": 90, "endPort": 80}),
        f"{KPORT}.endPort",
        "must be greater than or equal to port",
    ),
    (
        "knp boolean port",
        knp_port({"port": True}),
        f"{KPORT}.port",
        "must be a number or a port name, got boolean True",
    ),
]


@pytest.mark.parametrize(
    ("doc", "field", "fragment"),
    [pytest.param(doc, field, fragment, id=name) for name, doc, field, fragment in ERRORS],
)
def test_errors_name_the_field_and_the_reason(
    doc: dict[str, Any], field: str, fragment: str
) -> None:
    assert_error(copy.deepcopy(doc), field, fragment)


def test_error_message_names_source_document_and_kind() -> None:
    exc = error(cnp_port({"port": "90", "endPort": 80}))
    assert str(exc) == (
        "test.yaml: document 1 (CiliumNetworkPolicy/p): "
        f"{PORT}.endPort: must be greater than or equal to port (80 < 90)"
    )
    assert exc.code == "invalid_argument"
    with pytest.raises(PolicyDocumentError) as info:
        parse_document(knp_port({"port": 0}), "bus", 7)
    assert str(info.value).startswith("bus: document 7 (NetworkPolicy/np): spec.ingress[0]")


def test_a_document_that_is_not_a_mapping() -> None:
    with pytest.raises(PolicyDocumentError) as info:
        parse_documents("- a\n- b\n", SOURCE)
    assert str(info.value) == "test.yaml: document 1: a document must be a mapping, got list"


def test_one_bad_document_rejects_the_whole_text() -> None:
    bad = (
        MULTI + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\n"
        "spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n"
    )
    with pytest.raises(PolicyDocumentError):
        parse_documents(bad, SOURCE)
    assert len(parse_documents(MULTI, SOURCE)) == 2  # the same text without it parses


def test_non_string_keys_in_the_source_are_rejected() -> None:
    doc = cnp(ingress({}))
    doc["metadata"]["labels"] = {1: "a"}
    assert_error(doc, "metadata.labels.1", "keys must be strings")


def test_peers_and_ports_are_deduplicated() -> None:
    rule = only_rule(
        cnp(
            ingress(
                {
                    "fromEntities": ["world", "world"],
                    "toPorts": [{"ports": [{"port": "80"}, {"port": "80"}]}],
                }
            )
        )
    )
    assert rule.peers == (Peer(entity=Entity.WORLD),)
    assert rule.ports == ports(PortRule(PROTO_ANY, 80))
