"""k8s/optional/monitoring.yaml: the Prometheus Operator's ServiceMonitor and PodMonitor.

No Prometheus Operator CRD is available offline, so the objects are validated against the
shape of the fields they use, as the operator's monitoring.coreos.com/v1 CRDs define them
(unknown fields refused, as a structural schema prunes them; label selectors, Prometheus
durations, port names), and against the manifests they scrape: every membrane Service with a
metrics port is selected and no other; the PodMonitor selects the agent's pods and names their
metrics port. Each check must also catch a copy broken on purpose.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.test_k8s_manifests import K8S, load_docs, metadata_problems, pod_labels

MONITORING = K8S / "optional" / "monitoring.yaml"
Doc = dict[str, Any]

# Prometheus' duration, as the operator's CRDs have it
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRINGS = {"type": "array", "items": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": STRINGS,
                },
            },
        },
    },
}
ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "params": {"type": "object", "additionalProperties": STRINGS},
    },
}
COMMON_SPEC = {
    "jobLabel": {"type": "string"},
    "namespaceSelector": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"any": {"type": "boolean"}, "matchNames": STRINGS},
    },
    "selector": LABEL_SELECTOR,
    "sampleLimit": {"type": "integer", "minimum": 0},
    "podTargetLabels": STRINGS,
}


def monitor_schema(kind: str, endpoints: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints],
                "properties": {
                    **COMMON_SPEC,
                    **extra,
                    endpoints: {"type": "array", "minItems": 1, "items": ENDPOINT},
                },
            },
        },
    }


SCHEMAS = {
    "ServiceMonitor": monitor_schema("ServiceMonitor", "endpoints", {"targetLabels": STRINGS}),
    "PodMonitor": monitor_schema("PodMonitor", "podMetricsEndpoints", {}),
}


def selected(selector: Doc, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        value = labels.get(expression["key"])
        matches = {
            "In": value in (expression.get("values") or []),
            "NotIn": value not in (expression.get("values") or []),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }
        if not matches[expression["operator"]]:
            return False
    return True


def schema_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        schema = SCHEMAS.get(doc.get("kind", ""))
        if schema is None:
            problems.append(f"{doc.get('kind')}: not a kind of this file")
            continue
        validator = jsonschema.Draft202012Validator(schema)
        problems += [
            f"{doc['kind']}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    return problems


def target_problems(monitors: list[Doc], manifests: list[Doc]) -> list[str]:
    problems = []
    for monitor in monitors:
        spec, kind = monitor["spec"], monitor["kind"]
        if spec["namespaceSelector"].get("matchNames") != ["membrane"]:
            problems.append(f"{kind}: scrapes outside the membrane namespace")
        if kind == "ServiceMonitor":
            ports = {e["port"] for e in spec["endpoints"]}
            for service in (d for d in manifests if d["kind"] == "Service"):
                has_metrics = any(p.get("name") in ports for p in service["spec"]["ports"])
                chosen = selected(spec["selector"], service["metadata"].get("labels") or {})
                if has_metrics != chosen:
                    problems.append(
                        f"Service/{service['metadata']['name']}: "
                        f"{'selected' if chosen else 'not selected'} with "
                        f"{'a' if has_metrics else 'no'} metrics port"
                    )
        else:
            ports = {e["port"] for e in spec["podMetricsEndpoints"]}
            pods = [
                d
                for d in manifests
                if d["kind"] == "DaemonSet" and selected(spec["selector"], pod_labels(d))
            ]
            if not pods:
                problems.append("PodMonitor: selects no agent pod")
            for pod in pods:
                names = {
                    p.get("name")
                    for c in pod["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                }
                problems += [f"PodMonitor: the agent has no port {p}" for p in ports - names]
    return problems


@pytest.fixture
def monitors() -> list[Doc]:
    return [d for d in yaml.safe_load_all(MONITORING.read_text()) if d]


def test_monitors_match_the_operator_schema(monitors: list[Doc]) -> None:
    assert {d["kind"] for d in monitors} == set(SCHEMAS)
    assert schema_problems(monitors) == []
    assert metadata_problems(load_docs(K8S) + monitors) == []


def test_schema_check_catches_a_misspelt_field_a_bad_duration_and_operator(
    monitors: list[Doc],
) -> None:
    broken = copy.deepcopy(monitors)
    service_monitor = next(d for d in broken if d["kind"] == "ServiceMonitor")
    service_monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    service_monitor["spec"]["endpoints"][0]["scrapeTimeout"] = "10 seconds"
    service_monitor["spec"]["selector"]["matchExpressions"][0]["operator"] = "in"
    problems = schema_problems(broken)
    assert any("'intervall' was unexpected" in p for p in problems)
    assert any("scrapeTimeout" in p for p in problems)
    assert any("operator" in p for p in problems)


def test_monitors_scrape_exactly_the_metrics_ports(monitors: list[Doc]) -> None:
    assert target_problems(monitors, load_docs(K8S)) == []


def test_target_check_catches_a_missed_service_and_a_wrong_port(monitors: list[Doc]) -> None:
    broken = copy.deepcopy(monitors)
    service_monitor = next(d for d in broken if d["kind"] == "ServiceMonitor")
    service_monitor["spec"]["selector"]["matchExpressions"][0]["values"].remove("lb")
    pod_monitor = next(d for d in broken if d["kind"] == "PodMonitor")
    pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] = "prometheus"
    problems = target_problems(broken, load_docs(K8S))
    assert "Service/lb: not selected with a metrics port" in problems
    assert "PodMonitor: the agent has no port prometheus" in problems


def test_optional_manifests_stay_out_of_the_default_install() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert not any(Path(r).parts[0] == "optional" for r in listed)
    assert not any(d["kind"] in SCHEMAS for d in load_docs(K8S))
