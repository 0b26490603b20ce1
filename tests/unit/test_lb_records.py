"""services/lb/records.py on plain data: selector, slice and API backends; ids; revisions."""

from __future__ import annotations

from services.lb import records
from services.lb.model import (
    ApiFrontend,
    ApiService,
    EndpointSliceSpec,
    ServicePort,
    ServiceSpec,
    SliceEndpoint,
    SlicePort,
)
from shared.messages import ContainerPort, Endpoint


def pod(name: str, ip: str, namespace: str = "prod", **labels: str) -> Endpoint:
    return Endpoint(
        namespace=namespace,
        name=name,
        node="n1",
        ip=ip,
        identity=300,
        labels=labels or {"app": "web"},
        ports=[ContainerPort(8080, "TCP", "http"), ContainerPort(53, "UDP", "http")],
    )


PODS = [
    pod("a", "10.0.0.2"),
    pod("b", "10.0.0.3"),
    pod("other-app", "10.0.0.4", app="db"),
    pod("other-namespace", "10.0.0.5", namespace="dev"),
    pod("no-address", ""),
]


def web(
    target: int | str, *, node_port: int = 0, selector: dict[str, str] | None = None
) -> ServiceSpec:
    return ServiceSpec(
        namespace="prod",
        name="web",
        cluster_ip="10.96.0.10",
        ports=(ServicePort("http", 80, "TCP", target, node_port),),
        selector={"app": "web"} if selector is None else selector,
    )


def test_a_selector_picks_running_pods_of_its_namespace_on_the_named_port() -> None:
    d = records.desired("prod.web", web("http", node_port=30080), "maglev", PODS, [])
    backends = [("10.0.0.2", 8080, False), ("10.0.0.3", 8080, False)]
    assert d.frontends == [
        ("10.96.0.10", 80, "TCP", False, backends),
        ("0.0.0.0", 30080, "TCP", True, backends),
    ]


def test_an_empty_selector_selects_nothing() -> None:
    d = records.desired("prod.web", web(8080, selector={}), "maglev", PODS, [])
    assert d.frontends == [("10.96.0.10", 80, "TCP", False, [])]


def test_slices_give_ready_and_terminating_endpoints_of_the_port() -> None:
    spec = ServiceSpec("prod", "web", "10.96.0.10", (ServicePort("http", 80, "TCP", 8080),), None)
    endpoints = (
        SliceEndpoint("10.0.1.1"),
        SliceEndpoint("10.0.1.2", ready=False, terminating=True),
        SliceEndpoint("10.0.1.3", ready=False),
    )
    slices = [
        EndpointSliceSpec("prod", "web-1", "web", endpoints, (SlicePort("http", 8080, "TCP"),)),
        EndpointSliceSpec("prod", "web-2", "web", endpoints, (SlicePort("other", 9, "TCP"),)),
    ]
    d = records.desired("prod.web", spec, "random", PODS, slices)
    assert d.frontends == [
        ("10.96.0.10", 80, "TCP", False, [("10.0.1.1", 8080, False), ("10.0.1.2", 8080, True)])
    ]


def test_ids_and_revisions() -> None:
    api = ApiService("prod", "api", (ApiFrontend("10.96.0.20", 443, "TCP"),), (("10.0.2.1", 8443),))
    d = records.desired("prod.api", api, "maglev", [], [])
    fronts, backs = records.owners([d])
    assert (fronts, backs) == (["10.96.0.20:443/TCP"], ["10.0.2.1:8443/TCP"])
    built = records.record(d, {fronts[0]: 7}, {backs[0]: 9}, seed=5, maglev_max=251)
    assert [(f.id, [b.id for b in f.backends]) for f in built.frontends] == [(7, [9])]
    # one backend: a table of 101 slots (at most 251)
    assert (built.source, built.maglev_seed, built.maglev_size) == ("api", 5, 101)
    first = records.changed(None, built)
    assert first is not None and first.revision == 1
    assert records.changed(first, built) is None  # the same record: nothing to publish
    moved = records.record(d, {fronts[0]: 8}, {backs[0]: 9}, seed=5, maglev_max=251)
    second = records.changed(first, moved)
    assert second is not None and second.revision == 2
