"""services.policy.resolver: policies and identities -> ResolvedPolicy, evaluated like the datapath.

Scenarios follow the Kubernetes NetworkPolicy documentation over 3 namespaces x 3 pods (each pod
serving TCP 80 and 81), then CiliumNetworkPolicy features, then the incremental behaviour.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import random
from collections.abc import Callable, Iterable

import msgspec
import pytest

from services.policy.explain import explain
from services.policy.model import LOCAL_BASE, PROTO_TCP, PROTO_UDP, Policy
from services.policy.parser import parse_documents
from services.policy.resolver import Resolver
from shared.errors import AlreadyExists
from shared.labels import pod_identity_labels
from shared.messages import ContainerPort, ResolvedPolicy
from shared.peer_sets import expand, referenced

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = [ContainerPort(port=80, name="serve-80"), ContainerPort(port=81, name="serve-81")]
WORLD = 2
NONE = ResolvedPolicy(identity=0, revision=0)


def ident(ns: str, pod: str) -> int:
    return 1000 + 10 * NAMESPACES.index(ns) + PODS.index(pod)


def pod_labels(ns: str, pod: str) -> list[str]:
    return pod_identity_labels(ns, {"pod": pod}, {"ns": ns}, "default")


ALL_PODS = [(ns, pod) for ns in NAMESPACES for pod in PODS]


def cluster() -> Resolver:
    resolver = Resolver()
    for ns, pod in ALL_PODS:
        resolver.set_identity(ident(ns, pod), pod_labels(ns, pod))
    return resolver


def policy(text: str) -> Policy:
    (parsed,) = parse_documents(text, "test.yaml")
    return parsed


def knp(name: str, ns: str, spec: str) -> Policy:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return policy(
        f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )


def cnp(name: str, spec: str, ns: str = "x") -> Policy:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return policy(
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )


def allowed(resolver: Resolver, src: int, dst: int, port: int, proto: int = PROTO_TCP) -> bool:
    return explain(resolver, src, dst, proto, port, src_ports=PORTS, dst_ports=PORTS).allowed


def matrix(resolver: Resolver, port: int = 80) -> set[tuple[str, str]]:
    """Every allowed (src, dst) pair among the 9 pods, written 'x/a'."""
    return {
        (f"{sn}/{sp}", f"{dn}/{dp}")
        for sn, sp in ALL_PODS
        for dn, dp in ALL_PODS
        if allowed(resolver, ident(sn, sp), ident(dn, dp), port)
    }


EVERY_PAIR = {(f"{a}/{b}", f"{c}/{d}") for a, b in ALL_PODS for c, d in ALL_PODS}


def pairs(srcs: Iterable[str], dsts: Iterable[str]) -> set[tuple[str, str]]:
    return {(s, d) for s in srcs for d in dsts}


def pods_of(*namespaces: str) -> list[str]:
    return [f"{ns}/{pod}" for ns in namespaces for pod in PODS]


def lpm(resolver: Resolver, address: str) -> int:
    """The identity the datapath's ipcache gives an external address (world when unknown)."""
    addr = ipaddress.IPv4Address(address)
    best: tuple[int, int] | None = None
    for net, number in resolver.cidr_identities().items():
        if addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, number)
    return WORLD if best is None else best[1]


def touched(resolver: Resolver, change: Callable[[], set[int]]) -> set[int]:
    """Subjects whose policy, as the datapath expands it, the change moved: their own resolved
    policy, or a peer set it names."""
    resolver.take_peer_set_changes()  # what earlier calls left
    changed = change()
    sets, removed = resolver.take_peer_set_changes()
    moved = {peer_set.id for peer_set in sets} | set(removed)
    named = {s for s in resolver.subjects() if referenced(resolver.resolved(s) or NONE) & moved}
    return changed | named


def content(resolved: ResolvedPolicy | None) -> object:
    """A resolved policy without its revision, for comparisons."""
    if resolved is None:
        return None
    return msgspec.to_builtins(msgspec.structs.replace(resolved, revision=0))


# --- Kubernetes NetworkPolicy documentation scenarios ------------------------------------------

DENY_INGRESS_X = """
podSelector: {}
policyTypes: [Ingress]
"""


def test_no_policy_allows_everything() -> None:
    resolver = cluster()
    assert resolver.subjects() == set()
    assert resolver.resolved(ident("x", "a")) is None
    assert matrix(resolver) == EVERY_PAIR
    lines = explain(resolver, ident("x", "a"), ident("y", "a"), PROTO_TCP, 80).lines()
    assert lines[0] == "identity 1000 -> identity 1010 on 80/TCP: ALLOWED"
    assert "no policy selects identity 1010 for ingress" in lines[-1]


def test_default_deny_ingress() -> None:
    resolver = cluster()
    changed = resolver.set_policy(knp("default-deny-ingress", "x", DENY_INGRESS_X))
    assert changed == {ident("x", pod) for pod in PODS}
    resolved = resolver.resolved(ident("x", "a"))
    assert resolved is not None
    assert (resolved.ingress_enforced, resolved.egress_enforced) == (True, False)
    assert resolved.ingress == [] and resolved.egress == []
    assert matrix(resolver) == EVERY_PAIR - pairs(pods_of(*NAMESPACES), pods_of("x"))
    explanation = explain(resolver, ident("y", "b"), ident("x", "a"), PROTO_TCP, 80)
    assert not explanation.allowed
    assert explanation.ingress.verdict == "drop (no rule allows)"
    assert explanation.ingress.drop_reason == 133
    assert explanation.ingress.reason == (
        "x/default-deny-ingress selects identity 1000 for ingress; "
        "no rule allows identity 1011 on 80/TCP"
    )
    assert explanation.egress.verdict == "not enforced"


def test_default_deny_all() -> None:
    resolver = cluster()
    resolver.set_policy(
        knp("default-deny-all", "x", "podSelector: {}\npolicyTypes: [Ingress, Egress]")
    )
    expected = pairs(pods_of("y", "z"), pods_of("y", "z"))
    assert matrix(resolver) == expected
    explanation = explain(resolver, ident("x", "a"), ident("y", "a"), PROTO_TCP, 80)
    assert explanation.egress.verdict == "drop (no rule allows)"
    assert explanation.ingress.verdict == "not enforced"


def test_allow_all_ingress_beside_default_deny() -> None:
    resolver = cluster()
    resolver.set_policy(knp("default-deny-ingress", "x", DENY_INGRESS_X))
    resolver.set_policy(
        knp("allow-all-ingress", "x", "podSelector: {}\ningress: [{}]\npolicyTypes: [Ingress]")
    )
    resolved = resolver.resolved(ident("x", "a"))
    assert resolved is not None
    assert [(e.peer, e.protocol, e.port) for e in resolved.ingress] == [(0, 0, 0)]
    assert resolved.rules == {resolved.ingress[0].rule_id: "x/allow-all-ingress[0]"}
    assert matrix(resolver) == EVERY_PAIR
    assert matrix(resolver, 81) == EVERY_PAIR


def test_pod_selector() -> None:
    resolver = cluster()
    resolver.set_policy(
        knp(
            "from-b",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{podSelector: {matchLabels: {pod: b}}}]
""",
        )
    )
    assert resolver.subjects() == {ident("x", "a")}
    expected = (EVERY_PAIR - pairs(pods_of(*NAMESPACES), ["x/a"])) | {("x/b", "x/a")}
    assert matrix(resolver) == expected


@pytest.mark.parametrize(
    ("operator", "sources"),
    [("In", ["y", "z"]), ("NotIn", ["x", "z"])],
)
def test_namespace_selector_with_match_expressions(operator: str, sources: list[str]) -> None:
    resolver = cluster()
    values = "[y, z]" if operator == "In" else "[y]"
    resolver.set_policy(
        knp(
            "from-namespaces",
            "x",
            f"""
podSelector: {{matchLabels: {{pod: a}}}}
ingress:
- from:
  - namespaceSelector:
      matchExpressions: [{{key: ns, operator: {operator}, values: {values}}}]
""",
        )
    )
    expected = (EVERY_PAIR - pairs(pods_of(*NAMESPACES), ["x/a"])) | pairs(
        pods_of(*sources), ["x/a"]
    )
    assert matrix(resolver) == expected


def test_pod_and_namespace_selector_vs_or() -> None:
    both = """
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {ns: y}}
    podSelector: {matchLabels: {pod: b}}
"""
    either = """
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {ns: y}}
  - podSelector: {matchLabels: {pod: b}}
"""
    others = EVERY_PAIR - pairs(pods_of(*NAMESPACES), ["x/a"])
    resolver = cluster()
    resolver.set_policy(knp("and", "x", both))
    assert matrix(resolver) == others | {("y/b", "x/a")}
    resolver = cluster()
    resolver.set_policy(knp("or", "x", either))
    assert matrix(resolver) == others | pairs([*pods_of("y"), "x/b"], ["x/a"])


def test_named_port() -> None:
    resolver = cluster()
    resolver.set_policy(
        knp(
            "named",
            "x",
            "podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: serve-80}]",
        )
    )
    resolved = resolver.resolved(ident("x", "a"))
    assert resolved is not None
    (entry,) = resolved.ingress
    assert (entry.peer, entry.protocol, entry.port, entry.port_name) == (
        0,
        PROTO_TCP,
        0,
        "serve-80",
    )
    assert allowed(resolver, ident("y", "a"), ident("x", "a"), 80)
    assert not allowed(resolver, ident("y", "a"), ident("x", "a"), 81)
    # an endpoint that does not declare the named port gets no entry for it
    bare = explain(resolver, ident("y", "a"), ident("x", "a"), PROTO_TCP, 80)
    assert not bare.allowed


@pytest.mark.parametrize(
    ("port", "end_port", "open_ports"),
    [(80, 81, {80, 81}), (81, 90, {81, 82}), (32000, 32768, set())],
)
def test_end_port_range(port: int, end_port: int, open_ports: set[int]) -> None:
    resolver = cluster()
    resolver.set_policy(
        knp(
            "range",
            "x",
            f"podSelector: {{}}\ningress:\n- ports: [{{protocol: TCP, port: {port}, "
            f"endPort: {end_port}}}]",
        )
    )
    for probe in (79, 80, 81, 82):
        assert allowed(resolver, ident("y", "c"), ident("x", "b"), probe) == (probe in open_ports)
    assert not allowed(resolver, ident("y", "c"), ident("x", "b"), 80, PROTO_UDP)


def test_ip_block_with_except() -> None:
    resolver = cluster()
    changed = resolver.set_policy(
        knp(
            "to-block",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- to: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
""",
        )
    )
    assert changed == {ident("x", "a")}
    table = resolver.cidr_identities()
    wide = ipaddress.IPv4Network("192.168.0.0/16")
    narrow = ipaddress.IPv4Network("192.168.1.0/24")
    assert set(table) == {wide, narrow}
    assert all(number > LOCAL_BASE for number in table.values())
    assert table[wide] != table[narrow]
    assert resolver.take_cidr_changes() == (table, [])
    assert resolver.take_cidr_changes() == ({}, [])
    src = ident("x", "a")
    assert allowed(resolver, src, lpm(resolver, "192.168.7.7"), 443)
    assert not allowed(resolver, src, lpm(resolver, "192.168.1.5"), 443)
    assert not allowed(resolver, src, lpm(resolver, "10.0.0.1"), 443)
    assert not allowed(resolver, src, ident("x", "b"), 80)
    # deterministic: a fresh resolver numbers the same networks the same way
    again = Resolver()
    again.set_policy(resolver.policies()[0])
    assert again.cidr_identities() == table


def test_egress_to_another_namespace() -> None:
    resolver = cluster()
    resolver.set_policy(
        knp(
            "to-y",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- to: [{namespaceSelector: {matchLabels: {ns: y}}}]
  ports: [{port: 80}]
""",
        )
    )
    others = EVERY_PAIR - pairs(["x/a"], pods_of(*NAMESPACES))
    assert matrix(resolver, 80) == others | pairs(["x/a"], pods_of("y"))
    assert matrix(resolver, 81) == others


def test_policies_combined_and_deleted() -> None:
    resolver = cluster()
    resolver.set_policy(
        knp(
            "from-b",
            "x",
            "podSelector: {matchLabels: {pod: a}}\n"
            "ingress:\n- from: [{podSelector: {matchLabels: {pod: b}}}]",
        )
    )
    resolver.set_policy(
        knp(
            "from-y",
            "x",
            "podSelector: {matchLabels: {pod: a}}\n"
            "ingress:\n- from: [{namespaceSelector: {matchLabels: {ns: y}}}]",
        )
    )
    others = EVERY_PAIR - pairs(pods_of(*NAMESPACES), ["x/a"])
    assert matrix(resolver) == others | pairs(["x/b", *pods_of("y")], ["x/a"])
    resolved = resolver.resolved(ident("x", "a"))
    assert resolved is not None
    assert sorted(resolved.rules.values()) == ["x/from-b[0]", "x/from-y[0]"]
    explanation = explain(resolver, ident("y", "c"), ident("x", "a"), PROTO_TCP, 80)
    assert explanation.ingress.selected_by == ("x/from-b", "x/from-y")
    assert explanation.ingress.rule == "x/from-y[0]"

    assert resolver.remove_policy("x/from-y") == {ident("x", "a")}
    assert matrix(resolver) == others | {("x/b", "x/a")}
    assert resolver.remove_policy("x/from-b") == {ident("x", "a")}
    assert resolver.resolved(ident("x", "a")) is None
    assert matrix(resolver) == EVERY_PAIR
    assert resolver.remove_policy("x/from-b") == set()
    assert resolver.stats()["selectors"] == 0


# --- CiliumNetworkPolicy -------------------------------------------------------------------------


def test_entities() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "world-only",
            "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEntities: [world]",
        )
    )
    resolver.set_policy(
        cnp(
            "cluster-only",
            "endpointSelector: {matchLabels: {pod: b}}\ningress:\n- fromEntities: [cluster]",
        )
    )
    resolver.set_policy(
        cnp("all", "endpointSelector: {matchLabels: {pod: c}}\ningress:\n- fromEntities: [all]")
    )
    a, b, c = (ident("x", pod) for pod in PODS)
    assert allowed(resolver, WORLD, a, 80)
    assert not allowed(resolver, ident("y", "a"), a, 80)
    assert not allowed(resolver, 1, a, 80)  # host is not world
    assert not allowed(resolver, WORLD, b, 80)
    assert allowed(resolver, ident("z", "c"), b, 80)
    assert allowed(resolver, 1, b, 80) and allowed(resolver, 6, b, 80)
    resolved = resolver.resolved(c)
    assert resolved is not None
    assert [e.peer for e in resolved.ingress] == [0]
    # a new pod is part of "cluster" at once
    assert touched(resolver, lambda: resolver.set_identity(5000, pod_labels("z", "new"))) == {b}
    assert allowed(resolver, 5000, b, 80)


def test_cidr_set_with_except_and_world_entity() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "egress-cidr",
            """
endpointSelector: {matchLabels: {pod: a}}
egress:
- toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]
""",
        )
    )
    src = ident("x", "a")
    assert allowed(resolver, src, lpm(resolver, "10.1.2.3"), 80)
    assert not allowed(resolver, src, lpm(resolver, "10.96.0.1"), 80)
    assert not allowed(resolver, src, WORLD, 80)
    resolver.set_policy(
        cnp("to-world", "endpointSelector: {matchLabels: {pod: b}}\negress:\n- toEntities: [world]")
    )
    # world covers every address outside the cluster, whatever CIDR identity it got
    for address in ("10.1.2.3", "10.96.0.1", "8.8.8.8"):
        assert allowed(resolver, ident("x", "b"), lpm(resolver, address), 80)
    assert not allowed(resolver, ident("x", "b"), ident("x", "c"), 80)


def test_deny_beats_allow() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "allow-all",
            "endpointSelector: {}\ningress:\n- fromEntities: [all]",
        )
    )
    resolver.set_policy(
        cnp(
            "deny-b",
            """
endpointSelector: {matchLabels: {pod: a}}
ingressDeny:
- fromEndpoints: [{matchLabels: {pod: b}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
        )
    )
    a = ident("x", "a")
    explanation = explain(resolver, ident("x", "b"), a, PROTO_TCP, 80)
    assert explanation.ingress.verdict == "deny"
    assert explanation.ingress.drop_reason == 181
    assert explanation.ingress.rule == "x/deny-b[0]"
    assert "x/deny-b[0] denies identity 1001 on 80/TCP" in explanation.ingress.reason
    assert allowed(resolver, ident("x", "b"), a, 81)
    assert allowed(resolver, ident("x", "c"), a, 80)
    assert not allowed(resolver, ident("x", "b"), a, 80)


def test_deny_without_default_deny_allows_the_rest() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "deny-only",
            """
endpointSelector: {matchLabels: {pod: a}}
enableDefaultDeny: {ingress: false}
ingressDeny:
- fromEndpoints: [{matchLabels: {pod: b}}]
""",
        )
    )
    a = ident("x", "a")
    resolved = resolver.resolved(a)
    assert resolved is not None and resolved.ingress_enforced
    assert (0, False, 0) in [(e.peer, e.deny, e.rule_id) for e in resolved.ingress]
    assert not allowed(resolver, ident("x", "b"), a, 80)
    assert allowed(resolver, ident("x", "c"), a, 80)
    assert allowed(resolver, WORLD, a, 53, PROTO_UDP)
    explanation = explain(resolver, ident("x", "c"), a, PROTO_TCP, 80)
    assert "no policy enforces ingress on identity 1000, but deny rules apply" in (
        explanation.ingress.reason
    )


def test_l3_only_vs_l4() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "l3",
            "endpointSelector: {matchLabels: {pod: a}}\n"
            "ingress:\n- fromEndpoints: [{matchLabels: {pod: b}}]",
        )
    )
    resolver.set_policy(
        cnp(
            "l4",
            """
endpointSelector: {matchLabels: {pod: a}}
ingress:
- fromEndpoints: [{matchLabels: {pod: c}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
        )
    )
    a = ident("x", "a")
    for port, proto in ((80, PROTO_TCP), (81, PROTO_TCP), (53, PROTO_UDP)):
        assert allowed(resolver, ident("x", "b"), a, port, proto)
    assert allowed(resolver, ident("x", "c"), a, 80)
    assert not allowed(resolver, ident("x", "c"), a, 81)
    assert not allowed(resolver, ident("x", "c"), a, 80, PROTO_UDP)


def test_l7_rules_are_carried() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "l7",
            """
endpointSelector: {matchLabels: {pod: a}}
ingress:
- fromEndpoints: [{matchLabels: {pod: b}}]
  toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules: {http: [{method: GET, path: /public}]}
""",
        )
    )
    resolved = resolver.resolved(ident("x", "a"))
    assert resolved is not None
    (entry,) = resolved.ingress
    assert entry.l7 == [{"http": {"method": "GET", "path": "/public"}}]


def test_empty_peers_allow_nobody_and_audit_policies_do_not_enforce() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "nobody",
            "endpointSelector: {matchLabels: {pod: a}}\n"
            "ingress:\n- fromEndpoints: [{matchLabels: {pod: nobody}}]",
        )
    )
    resolved = resolver.expanded(ident("x", "a"))
    assert resolved is not None and resolved.ingress_enforced and resolved.ingress == []
    audit = policy(
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: trial
  namespace: x
  annotations: {policy.membrane.io/audit: "true"}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  ingress: [{}]
"""
    )
    assert audit.audit
    assert resolver.set_policy(audit) == {ident("x", "b")}
    trial = resolver.resolved(ident("x", "b"))
    # enforced in audit mode: the datapath reports what it would drop, and drops nothing
    assert trial is not None and trial.ingress_enforced and trial.ingress_audit
    assert not trial.egress_audit and trial.ingress == []
    assert resolver.subjects_of("x/trial") == {ident("x", "b")}
    explanation = explain(resolver, ident("y", "a"), ident("x", "b"), PROTO_TCP, 80)
    assert explanation.allowed
    assert "x/trial (audit mode)" in explanation.ingress.reason
    assert "verdict AUDIT" in explanation.ingress.reason
    # an enforcing policy on the same direction takes over: audit changes nothing there
    resolver.set_policy(cnp("enforce", "endpointSelector: {matchLabels: {pod: b}}\ningress: [{}]"))
    enforced = resolver.resolved(ident("x", "b"))
    assert enforced is not None and enforced.ingress_enforced and not enforced.ingress_audit
    assert not explain(resolver, ident("y", "a"), ident("x", "b"), PROTO_TCP, 80).allowed


# --- incremental behaviour -----------------------------------------------------------------------

FROM_B = """
endpointSelector: {matchLabels: {pod: a}}
ingress:
- fromEndpoints: [{matchLabels: {pod: b}}]
"""
FROM_OTHER = """
endpointSelector: {}
ingress:
- fromEndpoints: [{matchLabels: {app: other}}]
"""


def test_new_identity_touches_only_affected_selectors_and_subjects() -> None:
    resolver = cluster()
    resolver.set_policy(cnp("from-b", FROM_B))
    resolver.set_policy(cnp("from-other", FROM_OTHER, ns="y"))
    a = ident("x", "a")
    before = resolver.selector_evaluations
    # a second kind of pod b in x: only the selector requiring pod=b is evaluated
    labels = pod_identity_labels("x", {"pod": "b", "version": "2"}, {"ns": "x"}, "default")
    resolver.take_peer_set_changes()
    # no subject's own policy moves: only the one peer set it joins
    assert resolver.set_identity(2000, labels) == set()
    assert resolver.selector_evaluations - before == 1
    (joined,), removed = resolver.take_peer_set_changes()
    assert 2000 in joined.identities and removed == []
    assert joined.description == "k8s:io.kubernetes.pod.namespace=x, k8s:pod=b"
    resolved = resolver.expanded(a)
    assert resolved is not None
    assert 2000 in {entry.peer for entry in resolved.ingress}
    # an unrelated identity: nothing evaluated, nothing re-published
    before = resolver.selector_evaluations
    assert resolver.set_identity(2001, pod_identity_labels("z", {"app": "db"}, {}, "db")) == set()
    assert resolver.selector_evaluations == before
    # a new pod in y is a subject of from-other (its subject selector is filed under ns=y)
    assert resolver.set_identity(2002, pod_labels("y", "new")) == {2002}
    # removing identities: the subjects that listed it, and the identity itself
    assert touched(resolver, lambda: resolver.remove_identity(2000)) == {a}
    assert resolver.remove_identity(2002) == {2002}
    assert resolver.remove_identity(2002) == set()


def test_relabelled_identity_moves_between_selectors() -> None:
    resolver = cluster()
    resolver.set_policy(cnp("from-b", FROM_B))
    a = ident("x", "a")
    assert touched(resolver, lambda: resolver.set_identity(2000, pod_labels("x", "b"))) == {a}
    assert touched(resolver, lambda: resolver.set_identity(2000, pod_labels("x", "c"))) == {a}
    assert allowed(resolver, ident("x", "b"), a, 80)
    assert not allowed(resolver, 2000, a, 80)
    now_a = touched(resolver, lambda: resolver.set_identity(2000, pod_labels("x", "a")))
    assert now_a == {2000}  # now a subject
    assert resolver.resolved(2000) is not None


def test_revision_increments_only_on_real_change() -> None:
    resolver = cluster()
    a = ident("x", "a")
    first = cnp("from-b", FROM_B)
    assert resolver.set_policy(first) == {a}
    resolved = resolver.resolved(a)
    assert resolved is not None and resolved.revision == 1
    assert resolver.set_policy(first) == set()  # the same policy again
    assert resolver.set_identity(a, pod_labels("x", "a")) == set()  # the same labels
    assert resolver.set_identity(3000, pod_labels("z", "q")) == set()
    assert resolver.set_policy(dataclasses.replace(first, warnings=("w",))) == set()
    assert resolver.resolved(a) is resolved
    # b's replica joins the peers: the peer set moves, a's own document does not
    assert touched(resolver, lambda: resolver.set_identity(3001, pod_labels("x", "b"))) == {a}
    assert resolver.resolved(a) is resolved
    # losing the policy and getting one back keeps counting up
    assert resolver.remove_policy("x/from-b") == {a}
    assert resolver.set_policy(first) == {a}
    again = resolver.resolved(a)
    assert again is not None and again.revision == 2  # a deletion publishes no revision


def test_policy_replace_moves_subjects() -> None:
    resolver = cluster()
    resolver.set_policy(cnp("p", FROM_B))
    replaced = cnp("p", FROM_B.replace("pod: a", "pod: c"))
    assert resolver.set_policy(replaced) == {ident("x", "a"), ident("x", "c")}
    assert resolver.resolved(ident("x", "a")) is None
    assert resolver.subjects() == {ident("x", "c")}
    assert resolver.stats() == {
        "policies": 1,
        "rules": 1,
        "selectors": 2,
        "identities": 17,
        "subjects": 1,
        "peer_sets": 1,
        "cidr_identities": 0,
        "selector_evaluations": resolver.selector_evaluations,
    }


def test_rule_id_collision_is_rejected_and_changes_nothing() -> None:
    resolver = cluster()
    first = cnp("first", FROM_B)
    resolver.set_policy(first)
    second = cnp("second", FROM_B.replace("pod: a", "pod: c"))
    (spec,) = second.specs
    (rule,) = spec.rules
    clash = dataclasses.replace(
        second,
        specs=(
            dataclasses.replace(spec, rules=(dataclasses.replace(rule, id=first.rules[0].id),)),
        ),
    )
    with pytest.raises(AlreadyExists, match="same id"):
        resolver.set_policy(clash)
    assert resolver.subjects() == {ident("x", "a")}
    assert resolver.stats()["policies"] == 1


def test_a_nested_network_of_another_policy_stays_allowed() -> None:
    resolver = cluster()
    wide_rule = "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toCIDR: [10.0.0.0/8]"
    narrow_rule = "endpointSelector: {matchLabels: {pod: b}}\negress:\n- toCIDR: [10.1.0.0/16]"
    resolver.set_policy(cnp("wide", wide_rule))
    wide = ipaddress.IPv4Network("10.0.0.0/8")
    narrow = ipaddress.IPv4Network("10.1.0.0/16")
    assert resolver.take_cidr_changes() == ({wide: resolver.cidr_identities()[wide]}, [])
    a, b = ident("x", "a"), ident("x", "b")
    assert touched(resolver, lambda: resolver.set_policy(cnp("narrow", narrow_rule))) == {a, b}
    added, removed = resolver.take_cidr_changes()
    assert list(added) == [narrow] and removed == []
    inner = lpm(resolver, "10.1.2.3")
    assert inner == added[narrow]
    assert allowed(resolver, a, inner, 80)  # still inside a's 10.0.0.0/8
    assert allowed(resolver, b, inner, 80)
    assert not allowed(resolver, b, lpm(resolver, "10.2.0.1"), 80)
    assert touched(resolver, lambda: resolver.remove_policy("x/narrow")) == {a, b}
    assert resolver.take_cidr_changes() == ({}, [narrow])
    assert allowed(resolver, a, lpm(resolver, "10.1.2.3"), 80)


def test_world_entity_follows_new_cidr_identities() -> None:
    resolver = cluster()
    resolver.set_policy(
        cnp("world", "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEntities: [world]")
    )
    a, b = ident("x", "a"), ident("x", "b")
    cidr = cnp("cidr", "endpointSelector: {matchLabels: {pod: b}}\negress:\n- toCIDR: [1.2.3.0/24]")
    assert touched(resolver, lambda: resolver.set_policy(cidr)) == {a, b}
    assert allowed(resolver, a, lpm(resolver, "1.2.3.4"), 80)


# --- incremental == from scratch -----------------------------------------------------------------

POOL = [
    cnp("p1", FROM_B),
    cnp("p1", FROM_B.replace("pod: b", "pod: c")),
    cnp("p2", FROM_OTHER, ns="y"),
    cnp("p3", "endpointSelector: {}\negress:\n- toEntities: [cluster]\n- toCIDR: [10.0.0.0/8]"),
    cnp(
        "p3",
        "endpointSelector: {}\negress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]",
    ),
    cnp("p4", "endpointSelector: {matchLabels: {app: web}}\negress:\n- toCIDR: [10.1.0.0/16]"),
    cnp("p5", "endpointSelector: {matchLabels: {pod: c}}\ningress:\n- fromEntities: [world]"),
    cnp(
        "p6",
        """
endpointSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}
ingressDeny:
- fromEndpoints: [{matchExpressions: [{key: pod, operator: DoesNotExist}]}]
  toPorts: [{ports: [{port: "81"}]}]
""",
        ns="z",
    ),
    knp(
        "k1",
        "y",
        """
podSelector: {matchLabels: {app: web}}
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [x, z]}]}
    podSelector: {matchExpressions: [{key: pod, operator: Exists}]}
  ports: [{port: 80}, {port: serve-81}]
""",
    ),
    knp("k2", "x", DENY_INGRESS_X),
    knp("k2", "x", "podSelector: {}\npolicyTypes: [Ingress, Egress]\negress: [{}]"),
]


def snapshot(resolver: Resolver, identities: Iterable[int]) -> dict[int, object]:
    # expanded: peer sets with their members, so that stale members would show
    return {number: content(resolver.expanded(number)) for number in identities}


@pytest.mark.parametrize("seed", range(8))
def test_incremental_equals_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    resolver = Resolver()
    identities: dict[int, list[str]] = {}
    policies: dict[str, Policy] = {}
    seen: set[int] = set()
    for _ in range(150):
        op = rng.random()
        number = rng.randrange(1000, 1030)
        seen.add(number)
        before = snapshot(resolver, seen)
        if op < 0.45:
            labels: dict[str, str] = {}
            if rng.random() < 0.8:
                labels["pod"] = rng.choice(PODS)
            if rng.random() < 0.5:
                labels["app"] = rng.choice(("web", "other", "db"))
            ns = rng.choice(NAMESPACES)
            identities[number] = pod_identity_labels(ns, labels, {"ns": ns}, "default")
            change = functools.partial(resolver.set_identity, number, identities[number])
        elif op < 0.6:
            identities.pop(number, None)
            change = functools.partial(resolver.remove_identity, number)
        elif op < 0.85:
            chosen = rng.choice(POOL)
            policies[chosen.key] = chosen
            change = functools.partial(resolver.set_policy, chosen)
        else:
            key = rng.choice([*sorted(policies), "x/missing"])
            policies.pop(key, None)
            change = functools.partial(resolver.remove_policy, key)
        changed = touched(resolver, change)
        after = snapshot(resolver, seen)
        assert changed == {n for n in seen if before[n] != after[n]}
        assert resolver.subjects() == {n for n in seen if after[n] is not None}
        # what was published (documents + peer sets as taken) is what the resolver knows
        published = {i: s.identities for i, s in resolver.peer_sets().items()}
        for n in seen:
            own = resolver.resolved(n)
            assert content(None if own is None else expand(own, published)) == after[n]

    scratch = Resolver()
    for key in sorted(policies):
        scratch.set_policy(policies[key])
    for number in sorted(identities):
        scratch.set_identity(number, identities[number])
    assert snapshot(resolver, seen) == snapshot(scratch, seen)
    assert resolver.cidr_identities() == scratch.cidr_identities()
    assert resolver.stats()["selectors"] == scratch.stats()["selectors"]


# --- work follows the change (counted, not timed) ------------------------------------------------


def evaluations_for_new_identity(unrelated: int) -> int:
    resolver = Resolver()
    for index in range(unrelated):
        resolver.set_policy(
            cnp(
                f"svc-{index}",
                f"endpointSelector: {{matchLabels: {{app: svc-{index}}}}}\n"
                f"ingress:\n- fromEndpoints: [{{matchLabels: {{app: client-{index}}}}}]",
                ns=f"ns-{index}",
            )
        )
        resolver.set_identity(10_000 + index, pod_labels(f"ns-{index}", f"svc-{index}"))
        # peers by namespace label and pod label, with the same app as the new identity
        resolver.set_policy(
            knp(
                f"from-team-{index}",
                f"ns-{index}",
                f"podSelector: {{matchLabels: {{app: svc-{index}}}}}\ningress:\n- from:\n"
                f"  - namespaceSelector: {{matchLabels: {{team: t-{index}}}}}\n"
                "    podSelector: {matchLabels: {app: web}}",
            )
        )
    resolver.set_policy(cnp("web", "endpointSelector: {matchLabels: {app: web}}\ningress: [{}]"))
    before = resolver.selector_evaluations
    web = pod_identity_labels("x", {"app": "web"}, {"ns": "x"}, "default")
    assert resolver.set_identity(500, web) == {500}
    return resolver.selector_evaluations - before


def test_new_identity_work_does_not_grow_with_unrelated_policies() -> None:
    small = evaluations_for_new_identity(100)
    large = evaluations_for_new_identity(1000)
    assert small == large == 1


# --- ipBlock on pod addresses (issue 14) ------------------------------------------------------


def allowed_at(
    resolver: Resolver, src: tuple[int, str], dst: tuple[int, str], port: int = 80
) -> bool:
    """Like :func:`allowed`, with the pods' addresses: what the datapath decides per address."""
    (src_id, src_ip), (dst_id, dst_ip) = src, dst
    return explain(
        resolver,
        src_id,
        dst_id,
        PROTO_TCP,
        port,
        src_ports=PORTS,
        dst_ports=PORTS,
        src_ip=src_ip,
        dst_ip=dst_ip,
    ).allowed


def test_ip_block_matches_pod_addresses_per_address_not_per_identity() -> None:
    # two replicas of y/b share one identity; the except names one of them
    resolver = cluster()
    resolver.set_policy(
        knp(
            "from-block",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.7/32]}}]
""",
        )
    )
    x_a = (ident("x", "a"), "10.0.0.2")
    replica_in_except = (ident("y", "b"), "10.0.1.7")
    replica_outside = (ident("y", "b"), "10.0.1.8")
    outside_block = (ident("z", "c"), "10.1.0.5")
    assert allowed_at(resolver, replica_outside, x_a)
    assert not allowed_at(resolver, replica_in_except, x_a)
    assert not allowed_at(resolver, outside_block, x_a)
    # without an address (or for the identity alone) a pod is no CIDR peer
    assert not allowed(resolver, ident("y", "b"), ident("x", "a"), 80)


def test_ip_block_on_egress_and_a_zero_prefix_match_pod_addresses() -> None:
    resolver = cluster()
    resolver.set_policy(
        knp(
            "to-all-but-one",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.2.0/24]}}]
  ports: [{port: 80}]
""",
        )
    )
    x_a = (ident("x", "a"), "10.0.0.2")
    assert allowed_at(resolver, x_a, (ident("z", "a"), "10.0.3.3"))
    assert not allowed_at(resolver, x_a, (ident("z", "a"), "10.0.3.3"), port=81)
    assert not allowed_at(resolver, x_a, (ident("z", "b"), "10.0.2.9"))
    assert allowed(resolver, ident("x", "a"), WORLD, 80)  # outside the cluster as before


def test_cilium_cidr_rules_keep_ciliums_meaning_unless_the_setting_says_otherwise() -> None:
    text = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        "metadata: {name: from-cidr, namespace: x}\nspec:\n"
        "  endpointSelector: {matchLabels: {pod: a}}\n"
        "  ingress: [{fromCIDR: [10.0.0.0/16]}]\n"
    )
    from services.policy.parser import parse_document
    from shared import kube_yaml

    (doc,) = kube_yaml.load_all(text, "t.yaml", ValueError)
    x_a, y_b = (ident("x", "a"), "10.0.0.2"), (ident("y", "b"), "10.0.1.8")
    for matches_pods in (False, True):
        resolver = cluster()
        resolver.set_policy(parse_document(doc, "t.yaml", cidr_matches_pods=matches_pods))
        assert allowed_at(resolver, y_b, x_a) is matches_pods
        assert allowed(resolver, lpm(resolver, "10.0.9.9"), ident("x", "a"), 80)


def test_ip_block_verdicts_do_not_depend_on_the_order_policies_were_created() -> None:
    # kubernetes/kubernetes#83191: overlapping blocks and excepts over several policies
    docs = [
        knp(
            "wide",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]
""",
        ),
        knp(
            "narrow",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{ipBlock: {cidr: 10.0.1.0/24, except: [10.0.1.128/25]}}]
""",
        ),
        knp(
            "one",
            "x",
            """
podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{ipBlock: {cidr: 10.0.1.200/32}}]
""",
        ),
    ]
    x_a = (ident("x", "a"), "10.0.0.2")
    sources = ["10.0.0.9", "10.0.1.5", "10.0.1.130", "10.0.1.200", "10.0.2.1", "10.1.0.1"]
    expected = {"10.0.0.9", "10.0.1.5", "10.0.1.200", "10.0.2.1"}

    def verdicts(order: Iterable[Policy], removed: Policy | None = None) -> set[str]:
        resolver = cluster()
        for doc in order:
            resolver.set_policy(doc)
        if removed is not None:
            resolver.set_policy(removed)
            resolver.remove_policy(removed.key)
        return {ip for ip in sources if allowed_at(resolver, (ident("y", "b"), ip), x_a)}

    rng = random.Random(83191)
    for _ in range(6):
        order = rng.sample(docs, len(docs))
        assert verdicts(order) == expected, [d.key for d in order]
    # a policy added and removed again leaves no trace
    extra = knp(
        "extra",
        "x",
        """
podSelector: {matchLabels: {pod: a}}
ingress:
- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/9]}}]
""",
    )
    assert verdicts(docs, removed=extra) == expected


def test_port_zero_without_a_protocol_is_tcp_udp_sctp_only() -> None:
    # ANY means TCP, UDP and SCTP (the model, and Cilium); port 0 of ANY must not become the
    # any-protocol entry of a rule without ports, which admits ICMP, GRE, ESP...
    resolver = cluster()
    resolver.set_policy(
        cnp(
            "any-port",
            "endpointSelector: {matchLabels: {pod: a}}\n"
            "ingress:\n- fromEndpoints: [{}]\n  toPorts: [{ports: [{port: '0'}]}]",
        )
    )
    src, dst = ident("x", "b"), ident("x", "a")
    for proto, port in ((PROTO_TCP, 80), (PROTO_UDP, 53), (132, 9)):
        assert allowed(resolver, src, dst, port, proto), proto
    for proto, port in ((1, 8), (47, 0), (50, 0)):  # ICMP echo, GRE, ESP
        assert not allowed(resolver, src, dst, port, proto), proto


# --- toFQDNs -------------------------------------------------------------------------------------

FQDN_POLICY = """
endpointSelector: {matchLabels: {pod: a}}
egress:
- toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.cdn.example.com"}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def learned(**names: list[str]) -> dict[str, list[ipaddress.IPv4Address]]:
    return {
        name.replace("_", "."): [ipaddress.IPv4Address(a) for a in found]
        for name, found in names.items()
    }


def test_to_fqdns_selects_the_learned_addresses_of_matching_names() -> None:
    resolver = cluster()
    resolver.set_policy(cnp("fq", FQDN_POLICY))
    xa = ident("x", "a")
    api, cdn, evil = "198.51.100.20", "198.51.100.21", "198.51.100.30"
    assert not allowed(resolver, xa, lpm(resolver, api), 80)

    def moved(change: Callable[[], None]) -> set[int]:
        return touched(resolver, lambda: (change(), set())[1])

    # learning touches the peer set only, never a subject's own document
    revision = resolver.resolved(xa).revision  # type: ignore[union-attr]
    assert moved(
        lambda: resolver.set_fqdn_cache(
            "n1/10.0.0.5",
            learned(
                api_example_com=[api],
                a_cdn_example_com=[cdn],
                cdn_example_com=[evil],
                evil_example_org=[evil],
            ),
        )
    ) == {xa}
    assert resolver.resolved(xa).revision == revision  # type: ignore[union-attr]
    added, removed = resolver.take_cidr_changes()
    assert set(map(str, added)) == {f"{api}/32", f"{cdn}/32"} and not removed
    assert allowed(resolver, xa, lpm(resolver, api), 80)
    assert allowed(resolver, xa, lpm(resolver, cdn), 80)
    assert not allowed(resolver, xa, lpm(resolver, evil), 80)  # cdn.example.com: no match
    assert not allowed(resolver, xa, lpm(resolver, api), 81)
    assert resolver.fqdn_names(evil) == ["cdn.example.com", "evil.example.org"]

    # a second endpoint learning the same address; the first forgetting it keeps it
    resolver.set_fqdn_cache("n2/10.0.1.5", learned(api_example_com=[api]))
    resolver.set_fqdn_cache("n1/10.0.0.5", learned(a_cdn_example_com=[cdn]))
    assert allowed(resolver, xa, lpm(resolver, api), 80)
    resolver.set_fqdn_cache("n2/10.0.1.5", None)
    assert not allowed(resolver, xa, lpm(resolver, api), 80)
    added, removed = resolver.take_cidr_changes()
    assert [str(n) for n in removed] == [f"{api}/32"]
    assert allowed(resolver, xa, lpm(resolver, cdn), 80)

    # the policy going releases the addresses it held
    resolver.remove_policy("x/fq")
    assert not resolver.cidr_identities()


def test_to_fqdns_applied_after_learning_selects_what_is_known() -> None:
    resolver = cluster()
    resolver.set_fqdn_cache("n1/10.0.0.5", learned(api_example_com=["198.51.100.20"]))
    assert not resolver.cidr_identities()  # no selector holds it: no identity
    resolver.set_policy(cnp("fq", FQDN_POLICY))
    assert allowed(resolver, ident("x", "a"), lpm(resolver, "198.51.100.20"), 80)
