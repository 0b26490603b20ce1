"""The cases of Kubernetes' test/e2e/network/netpol/network_policy.go, as data.

Each :class:`Case` keeps the upstream test name (``It(...)``) and, step by step, the policies it
creates (or updates in place: the same name again), the namespace and pod labels it changes, and
the truth tables it validates (``ValidateOrFail``), written with upstream's ``Reachability``
operations. Upstream gives each case only the pods it needs; here all 9 pods exist in every
case, so where an upstream table relied on a pod being absent the extra expectation is added
and says why.

Not ported (see the module docstring of ``test_netpol.py`` for the list and the reasons).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.e2e.netpol_world import Probe, Reachability

NS_NAME = "kubernetes.io/metadata.name"  # upstream's namespaceLabelKey / v1.LabelMetadataName
TCP80: Probe = ("TCP", 80)
TCP81: Probe = ("TCP", 81)
UDP80: Probe = ("UDP", 80)
UDP81: Probe = ("UDP", 81)

Expect = Callable[[Reachability], Reachability]


def np(ns: str, name: str, spec: dict[str, Any]) -> str:
    """A NetworkPolicy document (JSON is YAML); ``$x_b``-style addresses are filled in later."""
    return json.dumps(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


def namespace(name: str, labels: dict[str, str]) -> str:
    return json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    )


def pod(name: str) -> dict[str, Any]:
    return {"matchLabels": {"pod": name}}


def ns_is(name: str) -> dict[str, Any]:
    return {"matchLabels": {NS_NAME: name}}


def ns_expr(op: str, *values: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": NS_NAME, "operator": op, "values": list(values)}]}


def ingress(selector: dict[str, Any], *rules: dict[str, Any]) -> dict[str, Any]:
    """upstream SetSpecIngressRules(rules...): policyTypes [Ingress]; no rules = deny."""
    return {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": list(rules)}


def egress(selector: dict[str, Any], *rules: dict[str, Any]) -> dict[str, Any]:
    return {"podSelector": selector, "policyTypes": ["Egress"], "egress": list(rules)}


ALL: dict[str, Any] = {}  # an empty selector


@dataclass
class Step:
    apply: list[str] = field(default_factory=list)  # documents applied (policies, namespaces)
    delete: list[str] = field(default_factory=list)  # documents deleted
    label: list[list[str]] = field(default_factory=list)  # `membrane pod label` arguments
    checks: list[tuple[Probe, Expect]] = field(default_factory=list)


@dataclass
class Case:
    name: str  # the upstream It(...) name
    id: str
    steps: list[Step]
    restore: list[str] = field(default_factory=list)  # applied when the case ends
    restore_labels: list[list[str]] = field(default_factory=list)  # `pod label`s when it ends
    sctp: bool = False  # needs SCTP probes


def same(r: Reachability) -> Reachability:
    return r


DENY_INGRESS_X = np("x", "deny-ingress", ingress(ALL))
DENY_ALL_X = np("x", "deny-all", {"podSelector": ALL, "policyTypes": ["Ingress", "Egress"]})
EGRESS_AROUND_X_B = np(  # a large block around x/b, but not x/b
    "x",
    "allow-client-a-via-cidr-egress-rule",
    egress(pod("a"), {"to": [{"ipBlock": {"cidr": "$x_b_4", "except": ["$x_b/32"]}}]}),
)


def from_y_on(name: str, port: int, protocol: str = "TCP") -> str:
    """x/a takes namespace y on one port (upstream's allowPort81Policy and friends)."""
    return np(
        "x",
        name,
        ingress(
            pod("a"),
            {
                "from": [{"namespaceSelector": ns_is("y")}],
                "ports": [{"port": port, "protocol": protocol}],
            },
        ),
    )


def only_y_into_x_a(r: Reachability) -> Reachability:
    return r.expect_peer("x", "", "x", "a", allowed=False).expect_peer(
        "z", "", "x", "a", allowed=False
    )


def only_x_b_into_x_a(r: Reachability) -> Reachability:
    return r.expect_all_ingress("x/a", False).expect("x/b", "x/a", True)


CASES: list[Case] = [
    Case(
        "should support a 'default-deny-ingress' policy",
        "default-deny-ingress",
        [
            Step(
                [DENY_INGRESS_X],
                checks=[(TCP80, lambda r: r.expect_peer(dst_ns="x", allowed=False))],
            )
        ],
    ),
    Case(
        "should support a 'default-deny-all' policy",
        "default-deny-all",
        [
            Step(
                [DENY_ALL_X],
                checks=[
                    (
                        TCP80,
                        lambda r: r.expect_peer(dst_ns="x", allowed=False).expect_peer(
                            src_ns="x", allowed=False
                        ),
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce policy to allow traffic from pods within server namespace based on "
        "PodSelector",
        "pod-selector-same-namespace",
        [
            Step(
                [
                    np(
                        "x",
                        "x-a-allows-x-b",
                        ingress(pod("a"), {"from": [{"podSelector": pod("b")}]}),
                    )
                ],
                checks=[(TCP80, only_x_b_into_x_a)],
            )
        ],
    ),
    Case(
        "should enforce policy to allow ingress traffic for a target",
        "ingress-for-a-target",
        [
            Step(
                [
                    np("x", "deny-all", ingress(ALL)),
                    np(
                        "x",
                        "allow-all-to-a",
                        ingress(
                            pod("a"), {"from": [{"podSelector": ALL, "namespaceSelector": ALL}]}
                        ),
                    ),
                ],
                checks=[
                    (
                        TCP80,
                        # x/c exists here too: the deny-all isolates it like x/b
                        lambda r: (
                            r.expect_all_ingress("x/a", True)
                            .expect_all_ingress("x/b", False)
                            .expect_all_ingress("x/c", False)
                        ),
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce policy to allow ingress traffic from pods in all namespaces",
        "ingress-from-all-namespaces",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-from-another-ns",
                        ingress(pod("a"), {"from": [{"namespaceSelector": {"matchLabels": {}}}]}),
                    )
                ],
                checks=[(TCP80, same)],
            )
        ],
    ),
    Case(
        "should enforce policy to allow traffic only from a different namespace, based on "
        "NamespaceSelector",
        "namespace-selector",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-ns-selector",
                        ingress(pod("a"), {"from": [{"namespaceSelector": ns_is("y")}]}),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        only_y_into_x_a,
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce policy based on PodSelector with MatchExpressions",
        "pod-selector-match-expressions",
        [
            Step(
                [
                    np(
                        "x",
                        "x-a-allows-x-b",
                        ingress(
                            pod("a"),
                            {
                                "from": [
                                    {
                                        "podSelector": {
                                            "matchExpressions": [
                                                {"key": "pod", "operator": "In", "values": ["b"]}
                                            ]
                                        }
                                    }
                                ]
                            },
                        ),
                    )
                ],
                checks=[(TCP80, only_x_b_into_x_a)],
            )
        ],
    ),
    Case(
        "should enforce policy based on NamespaceSelector with MatchExpressions",
        "namespace-selector-match-expressions",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-ns-y-match-selector",
                        ingress(pod("a"), {"from": [{"namespaceSelector": ns_expr("In", "y")}]}),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        only_y_into_x_a,
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce policy based on PodSelector or NamespaceSelector",
        "pod-or-namespace-selector",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-ns-y-match-selector",
                        ingress(
                            pod("a"),
                            {
                                "from": [
                                    {"namespaceSelector": ns_expr("NotIn", "x")},
                                    {"podSelector": pod("b")},
                                ]
                            },
                        ),
                    )
                ],
                checks=[
                    (TCP80, lambda r: r.expect("x/a", "x/a", False).expect("x/c", "x/a", False))
                ],
            )
        ],
    ),
    Case(
        "should enforce policy based on PodSelector and NamespaceSelector",
        "pod-and-namespace-selector",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-ns-y-podselector-and-nsselector",
                        ingress(
                            pod("a"),
                            {
                                "from": [
                                    {
                                        "namespaceSelector": ns_expr("NotIn", "x"),
                                        "podSelector": pod("b"),
                                    }
                                ]
                            },
                        ),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        lambda r: (
                            r.expect_all_ingress("x/a", False)
                            .expect("y/b", "x/a", True)
                            .expect("z/b", "x/a", True)
                        ),
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        "multiple-pod-and-namespace-selectors",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-ns-y-z-pod-b-c",
                        ingress(
                            pod("a"),
                            {
                                "from": [
                                    {
                                        "namespaceSelector": ns_expr("NotIn", "x"),
                                        "podSelector": {
                                            "matchExpressions": [
                                                {
                                                    "key": "pod",
                                                    "operator": "In",
                                                    "values": ["b", "c"],
                                                }
                                            ]
                                        },
                                    }
                                ]
                            },
                        ),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        # z/a exists here too: pod a is not in {b, c}
                        lambda r: (
                            r.expect_peer("x", "", "x", "a", allowed=False)
                            .expect("y/a", "x/a", False)
                            .expect("z/a", "x/a", False)
                        ),
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce policy based on any PodSelectors",
        "any-pod-selectors",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-ns-x-pod-b-c",
                        ingress(
                            pod("a"),
                            {"from": [{"podSelector": pod("b")}, {"podSelector": pod("c")}]},
                        ),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        lambda r: (
                            r.expect_all_ingress("x/a", False)
                            .expect("x/b", "x/a", True)
                            .expect("x/c", "x/a", True)
                        ),
                    )
                ],
            )
        ],
    ),
    *[
        Case(
            "should enforce policy to allow traffic only from a pod in a different namespace "
            f"based on PodSelector and NamespaceSelector{suffix}",
            f"pod-in-other-namespace{suffix and '-udp'}",
            [
                Step(
                    [
                        np(
                            "x",
                            "allow-ns-y-pod-a-via-namespace-pod-selector",
                            ingress(
                                pod("a"),
                                {
                                    "from": [
                                        {"namespaceSelector": ns_is("y"), "podSelector": pod("a")}
                                    ]
                                },
                            ),
                        )
                    ],
                    checks=[
                        (
                            probe,
                            lambda r: r.expect_all_ingress("x/a", False).expect("y/a", "x/a", True),
                        )
                    ],
                )
            ],
        )
        for probe, suffix in ((TCP80, ""), (UDP80, " (using UDP)"))
    ],
    *[
        Case(
            f"should enforce policy based on Ports{suffix}",
            f"ports{suffix and '-udp'}",
            [
                Step(
                    [from_y_on("allow-client-a-via-ns-selector", 81, probe[0])],
                    checks=[
                        (
                            probe,
                            only_y_into_x_a,
                        )
                    ],
                )
            ],
        )
        for probe, suffix in ((TCP81, ""), (UDP81, " (using UDP)"))
    ],
    Case(
        "should enforce multiple, stacked policies with overlapping podSelectors",
        "stacked-policies",
        [
            Step(
                [from_y_on("allow-client-a-via-ns-selector", 81, "TCP")],
                checks=[
                    (
                        TCP81,
                        only_y_into_x_a,
                    ),
                    (TCP80, lambda r: r.expect_all_ingress("x/a", False)),
                ],
            ),
            Step(
                [from_y_on("allow-client-a-via-ns-selector-80", 80, "TCP")],
                checks=[
                    (
                        TCP80,
                        only_y_into_x_a,
                    )
                ],
            ),
        ],
    ),
    Case(
        "should support allow-all policy",
        "allow-all",
        [Step([np("x", "allow-all", ingress(ALL, {}))], checks=[(TCP80, same), (TCP81, same)])],
    ),
    Case(
        "should allow ingress access on one named port",
        "named-port-ingress",
        [
            Step(
                [np("x", "allow-all", ingress(ALL, {"ports": [{"port": "serve-81-tcp"}]}))],
                checks=[(TCP81, same), (TCP80, lambda r: r.expect_peer(dst_ns="x", allowed=False))],
            )
        ],
    ),
    Case(
        "should allow ingress access from namespace on one named port",
        "named-port-ingress-from-namespace",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-ns-selector-80",
                        ingress(
                            pod("a"),
                            {
                                "from": [{"namespaceSelector": ns_is("y")}],
                                "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}],
                            },
                        ),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        only_y_into_x_a,
                    ),
                    (TCP81, lambda r: r.expect_all_ingress("x/a", False)),
                ],
            )
        ],
    ),
    Case(
        "should allow egress access on one named port",
        "named-port-egress",
        [
            Step(
                [np("x", "allow-egress", egress(ALL, {"ports": [{"port": "serve-80-tcp"}]}))],
                checks=[(TCP80, same), (TCP81, lambda r: r.expect_peer(src_ns="x", allowed=False))],
            )
        ],
    ),
    Case(
        "should enforce updated policy",
        "updated-policy",
        [
            Step(
                [np("x", "allow-all-mutate-to-deny-all", ingress(ALL, {}))], checks=[(TCP81, same)]
            ),
            # the same policy updated in place (apply of the same name)
            Step(
                [np("x", "allow-all-mutate-to-deny-all", ingress(ALL))],
                checks=[(TCP81, lambda r: r.expect_peer(dst_ns="x", allowed=False))],
            ),
        ],
    ),
    Case(
        "should allow ingress access from updated namespace",
        "updated-namespace",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-ns-selector",
                        ingress(
                            pod("a"),
                            {"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]},
                        ),
                    )
                ],
                checks=[(TCP80, lambda r: r.expect_all_ingress("x/a", False))],
            ),
            # the namespace's labels change while the probes run
            Step(
                [namespace("y", {"ns": "y", "ns2": "updated"})],
                checks=[
                    (
                        TCP80,
                        lambda r: r.expect_all_ingress("x/a", False).expect_peer(
                            src_ns="y", allowed=True
                        ),
                    )
                ],
            ),
        ],
        restore=[namespace("y", {"ns": "y"})],
    ),
    Case(
        "should allow ingress access from updated pod",
        "updated-pod-allowed",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-pod-selector",
                        ingress(
                            pod("a"),
                            {
                                "from": [
                                    {
                                        "podSelector": {
                                            "matchLabels": {"pod": "b", "pod2": "updated"}
                                        }
                                    }
                                ]
                            },
                        ),
                    )
                ],
                checks=[(TCP80, lambda r: r.expect_all_ingress("x/a", False))],
            ),
            # x/b's labels change while the probes run: it is re-identified, and let in
            Step(label=[["b", "-n", "x", "pod2=updated"]], checks=[(TCP80, only_x_b_into_x_a)]),
        ],
        restore_labels=[["b", "-n", "x", "pod2-"]],
    ),
    Case(
        "should deny ingress access to updated pod",
        "updated-pod-denied",
        [
            Step(
                [
                    np(
                        "x",
                        "deny-ingress-via-label-selector",
                        ingress({"matchLabels": {"target": "isolated"}}),
                    )
                ],
                checks=[(TCP80, same)],
            ),
            # x/a gains the label the policy selects: isolated from then on
            Step(
                label=[["a", "-n", "x", "target=isolated"]],
                checks=[(TCP80, lambda r: r.expect_all_ingress("x/a", False))],
            ),
        ],
        restore_labels=[["a", "-n", "x", "target-"]],
    ),
    Case(
        "should deny ingress from pods on other namespaces",
        "deny-other-namespaces",
        [
            Step(
                [
                    np(
                        "x",
                        "deny-empty-policy",
                        ingress(ALL, {"from": [{"podSelector": {"matchLabels": {}}}]}),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        lambda r: r.expect_peer(src_ns="y", dst_ns="x", allowed=False).expect_peer(
                            src_ns="z", dst_ns="x", allowed=False
                        ),
                    )
                ],
            )
        ],
    ),
    Case(
        "should deny egress from pods based on PodSelector",
        "deny-egress-pod",
        [
            Step(
                [np("x", "deny-egress-pod-a", egress(pod("a")))],
                checks=[(TCP80, lambda r: r.expect_all_egress("x/a", False))],
            )
        ],
    ),
    Case(
        "should deny egress from all pods in a namespace",
        "deny-egress-namespace",
        [
            Step(
                [np("x", "deny-egress-ns-x", egress(ALL))],
                checks=[(TCP80, lambda r: r.expect_peer(src_ns="x", allowed=False))],
            )
        ],
    ),
    Case(
        "should work with Ingress, Egress specified together",
        "ingress-and-egress",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-pod-selector",
                        {
                            "podSelector": pod("a"),
                            "policyTypes": ["Egress", "Ingress"],
                            "ingress": [{"from": [{"podSelector": pod("b")}]}],
                            "egress": [{"ports": [{"port": 80}]}],
                        },
                    )
                ],
                checks=[
                    (
                        TCP80,
                        only_x_b_into_x_a,
                    ),
                    (
                        TCP81,
                        lambda r: (
                            r.expect_all_ingress("x/a", False)
                            .expect_all_egress("x/a", False)
                            .expect("x/b", "x/a", True)
                        ),
                    ),
                ],
            )
        ],
    ),
    Case(
        "should support denying of egress traffic on the client side (even if the server "
        "explicitly allows this traffic)",
        "egress-denied-on-client-side",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-to-ns-y-pod-a",
                        egress(
                            pod("a"),
                            {"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod("a")}]},
                        ),
                    ),
                    np(
                        "y",
                        "allow-from-xa-on-ya-match-selector",
                        ingress(
                            pod("a"),
                            {"from": [{"namespaceSelector": ns_is("x"), "podSelector": pod("a")}]},
                        ),
                    ),
                    np(
                        "y",
                        "allow-from-xa-on-yb-match-selector",
                        ingress(
                            pod("b"),
                            {"from": [{"namespaceSelector": ns_is("x"), "podSelector": pod("a")}]},
                        ),
                    ),
                ],
                checks=[
                    (
                        TCP80,
                        lambda r: (
                            r.expect_peer("x", "a", allowed=False)
                            .expect_peer(dst_ns="y", dst_pod="a", allowed=False)
                            .expect_peer("x", "a", "y", "a", allowed=True)
                            .expect_peer(dst_ns="y", dst_pod="b", allowed=False)
                        ),
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce egress policy allowing traffic to a server in a different namespace "
        "based on PodSelector and NamespaceSelector",
        "egress-to-pod-in-other-namespace",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-to-ns-y-pod-a",
                        egress(
                            pod("a"),
                            {"to": [{"namespaceSelector": ns_is("y"), "podSelector": pod("a")}]},
                        ),
                    )
                ],
                checks=[
                    (TCP80, lambda r: r.expect_all_egress("x/a", False).expect("x/a", "y/a", True))
                ],
            )
        ],
    ),
    Case(
        "should enforce ingress policy allowing any port traffic to a server on a specific "
        "protocol",
        "ingress-by-protocol",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-ingress-by-proto",
                        ingress(pod("a"), {"ports": [{"protocol": "TCP"}]}),
                    )
                ],
                checks=[
                    (TCP80, same),
                    (UDP80, lambda r: r.expect_peer(dst_ns="x", dst_pod="a", allowed=False)),
                ],
            )
        ],
    ),
    Case(
        "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        "ingress-allow-all-precedence",
        [
            Step(
                [np("x", "allow-ingress-port-80", ingress(ALL, {"ports": [{"port": 80}]}))],
                checks=[(TCP81, lambda r: r.expect_peer(dst_ns="x", allowed=False))],
            ),
            Step([np("x", "allow-ingress", ingress(ALL, {}))], checks=[(TCP81, same)]),
        ],
    ),
    Case(
        "should enforce multiple egress policies with egress allow-all policy taking precedence",
        "egress-allow-all-precedence",
        [
            Step(
                [np("x", "allow-egress-port-80", egress(ALL, {"ports": [{"port": 80}]}))],
                checks=[(TCP81, lambda r: r.expect_peer(src_ns="x", allowed=False))],
            ),
            Step([np("x", "allow-egress", egress(ALL, {}))], checks=[(TCP81, same)]),
        ],
    ),
    Case(
        "should stop enforcing policies after they are deleted",
        "deleted-policies",
        [
            Step(
                [DENY_ALL_X],
                checks=[
                    (
                        TCP80,
                        lambda r: r.expect_peer(src_ns="x", allowed=False).expect_peer(
                            dst_ns="x", allowed=False
                        ),
                    )
                ],
            ),
            Step(
                delete=[DENY_ALL_X],
                checks=[(TCP80, same)],
            ),
        ],
    ),
    Case(
        "should allow egress access to server in CIDR block",
        "egress-to-cidr",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-cidr-egress-rule",
                        egress(pod("a"), {"to": [{"ipBlock": {"cidr": "$y_b/32"}}]}),
                    )
                ],
                checks=[
                    (TCP80, lambda r: r.expect_all_egress("x/a", False).expect("x/a", "y/b", True))
                ],
            )
        ],
    ),
    Case(
        "should enforce except clause while egress access to server in CIDR block",
        "egress-cidr-except",
        [
            Step(
                [EGRESS_AROUND_X_B],
                checks=[(TCP80, lambda r: r.expect("x/a", "x/b", False))],
            )
        ],
    ),
    Case(
        "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        "cidr-and-except-overlap",
        [
            Step(
                [EGRESS_AROUND_X_B],
                checks=[(TCP80, lambda r: r.expect("x/a", "x/b", False))],
            ),
            # upstream's UpdatePolicy: the same name, now allowing x/b's address alone
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-cidr-egress-rule",
                        egress(pod("a"), {"to": [{"ipBlock": {"cidr": "$x_b/32"}}]}),
                    )
                ],
                checks=[
                    (TCP80, lambda r: r.expect_all_egress("x/a", False).expect("x/a", "x/b", True))
                ],
            ),
        ],
    ),
    Case(
        "should enforce policies to check ingress and egress policies can be controlled "
        "independently based on PodSelector",
        "ingress-egress-independent",
        [
            Step(
                [np("x", "allow-egress-for-target", egress(pod("a"), {}))], checks=[(TCP80, same)]
            ),
            Step(
                [np("x", "deny-ingress-via-label-selector", ingress(pod("a")))],
                checks=[(TCP80, lambda r: r.expect_all_ingress("x/a", False))],
            ),
        ],
    ),
    Case(
        "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin "
        "doesn't support SCTP",
        "sctp-is-not-tcp",
        [
            Step(
                [
                    DENY_INGRESS_X,
                    np(
                        "x",
                        "allow-only-sctp-ingress-on-port-81",
                        ingress(pod("a"), {"ports": [{"port": 81, "protocol": "SCTP"}]}),
                    ),
                ],
                checks=[(TCP81, lambda r: r.expect_peer(dst_ns="x", allowed=False))],
            )
        ],
    ),
    Case(
        "should properly isolate pods that are selected by a policy allowing SCTP, even if the "
        "plugin doesn't support SCTP",
        "sctp-policy-isolates",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-only-sctp-ingress-on-port-80",
                        ingress(pod("a"), {"ports": [{"port": 80, "protocol": "SCTP"}]}),
                    )
                ],
                checks=[(TCP81, lambda r: r.expect_all_ingress("x/a", False))],
            )
        ],
    ),
    Case(
        "should not allow access by TCP when a policy specifies only UDP",
        "udp-only-is-not-tcp",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-only-udp-ingress-on-port-81",
                        ingress(pod("a"), {"ports": [{"port": 81, "protocol": "UDP"}]}),
                    )
                ],
                # membrane adds the UDP side: the same policy lets UDP 81 through
                checks=[(TCP81, lambda r: r.expect_all_ingress("x/a", False)), (UDP81, same)],
            )
        ],
    ),
    Case(
        "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels "
        "using default ns label",
        "default-ns-label-match-labels",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-client-a-via-ns-selector-for-immutable-ns-label",
                        ingress(pod("a"), {"from": [{"namespaceSelector": ns_is("y")}]}),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        only_y_into_x_a,
                    )
                ],
            )
        ],
    ),
    Case(
        "should enforce policy based on NamespaceSelector with MatchExpressions using default "
        "ns label",
        "default-ns-label-match-expressions",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-ns-y-match-selector-for-immutable-ns-label",
                        egress(pod("a"), {"to": [{"namespaceSelector": ns_expr("NotIn", "y")}]}),
                    )
                ],
                checks=[(TCP80, lambda r: r.expect_peer("x", "a", "y", allowed=False))],
            )
        ],
    ),
    # "NetworkPolicy between server and client using UDP": should support a
    # 'default-deny-ingress' policy (the other two UDP cases are above, "(using UDP)")
    Case(
        "should support a 'default-deny-ingress' policy (using UDP)",
        "default-deny-ingress-udp",
        [
            Step(
                [DENY_INGRESS_X],
                checks=[(UDP80, lambda r: r.expect_peer(dst_ns="x", allowed=False))],
            )
        ],
    ),
    # --- beyond this version of the upstream file: what the issue asks for as well -------------
    Case(
        "membrane: endPort ranges (upstream's earlier 'should allow ingress access on a port "
        "range' form)",
        "end-port",
        [
            Step(
                [
                    np(
                        "x",
                        "allow-79-to-80-from-y",
                        ingress(
                            pod("a"),
                            {
                                "from": [{"namespaceSelector": ns_is("y")}],
                                "ports": [{"port": 79, "endPort": 80}],
                            },
                        ),
                    )
                ],
                checks=[
                    (
                        TCP80,
                        lambda r: r.expect_all_ingress("x/a", False).expect_peer(
                            "y", "", "x", "a", allowed=True
                        ),
                    ),
                    (TCP81, lambda r: r.expect_all_ingress("x/a", False)),
                ],
            )
        ],
    ),
    Case(
        "membrane: ingress from an ipBlock with except (pod addresses, per address)",
        "ingress-cidr-except",
        [
            Step(
                [
                    np(
                        "x",
                        "a-from-block-but-y-b",
                        ingress(
                            pod("a"),
                            {"from": [{"ipBlock": {"cidr": "$y_b_4", "except": ["$y_b/32"]}}]},
                        ),
                    )
                ],
                checks=[
                    (TCP80, lambda r: r.expect("y/b", "x/a", False)),
                    (UDP80, lambda r: r.expect("y/b", "x/a", False)),
                ],
            )
        ],
    ),
]
