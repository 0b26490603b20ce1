"""The CRDs in k8s/crds.yaml against the policy parser.

The API server validates a custom resource against the CRD's openAPIV3Schema (unknown fields
refused, with kubectl's default strict field validation); membrane's parser judges the rest.
So: every policy in examples/ validates against the schema, and on a corpus of valid and
invalid policies schema and parser agree, except where the schema cannot see (a CIDR's
syntax, a port range, an empty policy), which the parser alone refuses and the bridge reports
as an Event.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.policy.parser import parse_document
from shared.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]


def strict(schema: Any) -> Any:
    """The schema as strict field validation applies it: objects with properties are closed."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        if out.get("x-kubernetes-int-or-string"):
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def load_schemas() -> dict[str, Any]:
    crds = [d for d in yaml.safe_load_all((ROOT / "k8s" / "crds.yaml").read_text()) if d]
    return {
        crd["spec"]["names"]["kind"]: jsonschema.Draft7Validator(
            strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        )
        for crd in crds
    }


SCHEMAS = load_schemas()


def schema_accepts(doc: Obj) -> bool:
    return SCHEMAS[doc["kind"]].is_valid(doc)


def parser_accepts(doc: Obj) -> bool:
    try:
        parse_document(doc, "test")
    except InvalidArgument:
        return False
    return True


def cnp(spec: Any, kind: str = "CiliumNetworkPolicy") -> Obj:
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": {"name": "p"}, "spec": spec}


WEB = {"matchLabels": {"app": "web"}}
FROM_CLIENT = {"fromEndpoints": [{"matchLabels": {"app": "client"}}]}


def with_rule(**rule: Any) -> Obj:
    return cnp({"endpointSelector": WEB, "ingress": [rule]})


# (name, document, accepted): both must say `accepted`
CORPUS: list[tuple[str, Obj, bool]] = [
    ("l3", with_rule(**FROM_CLIENT), True),
    (
        "l4",
        with_rule(**FROM_CLIENT, toPorts=[{"ports": [{"port": "80", "protocol": "TCP"}]}]),
        True,
    ),
    ("int port", with_rule(toPorts=[{"ports": [{"port": 80, "protocol": "UDP"}]}]), True),
    ("named port", with_rule(toPorts=[{"ports": [{"port": "http"}]}]), True),
    ("cidr set", with_rule(fromCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]), True),
    ("entities", with_rule(fromEntities=["world", "cluster"]), True),
    (
        "http",
        with_rule(
            toPorts=[
                {
                    "ports": [{"port": "80", "protocol": "TCP"}],
                    "rules": {"http": [{"method": "GET", "path": "/"}]},
                }
            ]
        ),
        True,
    ),
    ("icmp", with_rule(icmps=[{"fields": [{"type": 8, "family": "IPv4"}]}]), True),
    (
        "egress deny",
        cnp({"endpointSelector": WEB, "egressDeny": [{"toCIDR": ["192.0.2.0/24"]}]}),
        True,
    ),
    (
        "specs",
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p"},
            "specs": [with_rule(**FROM_CLIENT)["spec"]],
        },
        True,
    ),
    (
        "clusterwide",
        cnp({"endpointSelector": {}, "ingress": [FROM_CLIENT]}, "CiliumClusterwideNetworkPolicy"),
        True,
    ),
    ("misspelt rule field", with_rule(fromEndpoint=[WEB]), False),
    ("misspelt spec field", cnp({"endpointSelector": WEB, "ingres": [FROM_CLIENT]}), False),
    ("unknown entity", with_rule(fromEntities=["galaxy"]), False),
    ("bad protocol", with_rule(toPorts=[{"ports": [{"port": "80", "protocol": "ICMP"}]}]), False),
    ("port is a list", with_rule(toPorts=[{"ports": [{"port": ["80"]}]}]), False),
    (
        "bad operator",
        with_rule(fromEndpoints=[{"matchExpressions": [{"key": "a", "operator": "Is"}]}]),
        False,
    ),
    (
        "rules under deny",
        cnp(
            {
                "endpointSelector": WEB,
                "ingressDeny": [
                    {"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}
                ],
            }
        ),
        False,
    ),
    ("no endpointSelector", cnp({"ingress": [FROM_CLIENT]}), False),
    ("icmp family", with_rule(icmps=[{"fields": [{"type": 8, "family": "IPv5"}]}]), False),
]

# the parser alone refuses these: the schema cannot express the rule
PARSER_ONLY: list[tuple[str, Obj]] = [
    ("bad cidr", with_rule(fromCIDR=["10.0.0.300/8"])),
    ("port out of range", with_rule(toPorts=[{"ports": [{"port": "70000"}]}])),
    ("no rule list", cnp({"endpointSelector": WEB})),
    ("two peers in a rule", with_rule(**FROM_CLIENT, fromCIDR=["10.0.0.0/8"])),
]


@pytest.mark.parametrize(("name", "doc", "accepted"), CORPUS, ids=[c[0] for c in CORPUS])
def test_schema_and_parser_agree(name: str, doc: Obj, accepted: bool) -> None:
    assert parser_accepts(doc) is accepted, f"parser on {name}"
    assert schema_accepts(doc) is accepted, f"schema on {name}"


@pytest.mark.parametrize(("name", "doc"), PARSER_ONLY, ids=[c[0] for c in PARSER_ONLY])
def test_what_only_the_parser_refuses(name: str, doc: Obj) -> None:
    assert schema_accepts(doc), name
    assert not parser_accepts(doc), name


@pytest.mark.parametrize(
    "path", ["examples/empire-only.yaml", "examples/starwars/sw_l3_l4_l7_policy.yaml"]
)
def test_examples_validate_against_the_crds(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]
    policies = [d for d in docs if d["apiVersion"] == "cilium.io/v2"]
    assert policies
    for doc in policies:
        errors = [e.message for e in SCHEMAS[doc["kind"]].iter_errors(doc)]
        assert errors == [], f"{path}: {errors}"
        assert parser_accepts(copy.deepcopy(doc))


def test_the_crds_name_what_the_bridge_watches() -> None:
    from services.k8s.kubeclient import CCNPS, CNPS

    crds = [d for d in yaml.safe_load_all((ROOT / "k8s" / "crds.yaml").read_text()) if d]
    served = {
        (c["spec"]["names"]["kind"], c["spec"]["names"]["plural"], c["spec"]["scope"]) for c in crds
    }
    assert served == {
        (CNPS.kind, CNPS.plural, "Namespaced"),
        (CCNPS.kind, CCNPS.plural, "Cluster"),
    }
    shorts = {c["spec"]["names"]["shortNames"][0] for c in crds}
    assert shorts == {"cnp", "ccnp"}
