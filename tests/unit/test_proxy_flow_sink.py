"""The proxy's FlowSink: one flow per request at once, the metrics (and the count of accepted
connections) with each batch."""

from __future__ import annotations

from ipaddress import IPv4Address

from prometheus_client import REGISTRY

from services.proxy.exchange import Conn
from services.proxy.service import FlowSink
from services.proxy.view import Verdict
from shared.messages import L7Info

CONN = Conn(IPv4Address("10.7.0.5"), 40512, IPv4Address("10.7.0.6"), 80)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_flows_at_once_metrics_with_the_batch() -> None:
    sink = FlowSink(None, "n1")  # type: ignore[arg-type]  # no bus: run() is not used here
    labels = {"protocol": "http", "verdict": "DROPPED", "direction": "ingress"}
    before = _value("membrane_proxy_requests_total", **labels)
    slow = _value("membrane_proxy_request_seconds_bucket", protocol="http", le="0.01")
    count = _value("membrane_proxy_request_seconds_count", protocol="http")
    connections = _value("membrane_proxy_connections_total", process="0")
    sink.accepted += 1  # as the listener's protocol factory counts them
    denied = Verdict(False, 257, 256, 3, "default/rule1", "ingress")
    for latency in (0.4, 7.0):
        sink.add(CONN, denied, L7Info(protocol="http", method="PUT", status=403,
                                      latency_ms=latency))  # fmt: skip
    flows = sink.flows
    assert [(f.src_ip, f.dst_ip, f.src_port, f.verdict, f.rule_id) for f in flows] == [
        ("10.7.0.5", "10.7.0.6", 40512, "DROPPED", 3)
    ] * 2
    assert _value("membrane_proxy_requests_total", **labels) == before  # not yet
    assert _value("membrane_proxy_connections_total", process="0") == connections
    sink.account()
    assert _value("membrane_proxy_connections_total", process="0") == connections + 1
    assert _value("membrane_proxy_requests_total", **labels) == before + 2
    assert _value("membrane_proxy_request_seconds_count", protocol="http") == count + 2
    # 0.4 ms and 7 ms are both under 10 ms
    assert _value("membrane_proxy_request_seconds_bucket", protocol="http", le="0.01") == slow + 2
    sink.account()  # nothing new: nothing counted twice
    assert _value("membrane_proxy_requests_total", **labels) == before + 2
    assert _value("membrane_proxy_connections_total", process="0") == connections + 1
