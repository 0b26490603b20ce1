"""DeclaredPorts: an identity's named ports are the union over its pods, kept per endpoint."""

from __future__ import annotations

from services.datapath.declared_ports import DeclaredPorts
from shared.messages import ContainerPort, Endpoint

HTTP = ContainerPort(port=8080, name="http")
METRICS = ContainerPort(port=9090, name="metrics")


def pod(name: str, identity: int, *ports: ContainerPort) -> Endpoint:
    return Endpoint(
        namespace="default", name=name, node="n1", ip="10.0.0.1", identity=identity,
        labels={}, ports=list(ports),
    )  # fmt: skip


def test_an_identitys_ports_are_the_union_of_its_pods() -> None:
    ports = DeclaredPorts()
    assert ports.update("n1.default.a", pod("a", 300, HTTP)) == {300: [HTTP]}
    assert ports.update("n1.default.b", pod("b", 300, METRICS)) == {300: [HTTP, METRICS]}
    assert ports.update("n1.default.a", None) == {300: [METRICS]}
    assert ports.update("n1.default.b", None) == {300: []}


def test_a_relabelled_pod_moves_its_ports_to_the_new_identity() -> None:
    ports = DeclaredPorts()
    ports.update("n1.default.a", pod("a", 300, HTTP))
    assert ports.update("n1.default.a", pod("a", 301, HTTP)) == {300: [], 301: [HTTP]}


def test_pods_that_declare_no_port_can_come_and_go() -> None:
    """The agent forgot an identity's pods once none of them declared a port, and the next
    change to one of those pods raised KeyError (the endpoints watch crashed and restarted)."""
    ports = DeclaredPorts()
    ports.update("n1.default.a", pod("a", 300))
    ports.update("n1.default.b", pod("b", 300))
    assert ports.update("n1.default.a", None) == {300: []}
    assert ports.update("n1.default.b", pod("b", 300, HTTP)) == {300: [HTTP]}
    assert ports.update("n1.default.b", None) == {300: []}
    assert ports.update("n1.default.b", None) == {}
