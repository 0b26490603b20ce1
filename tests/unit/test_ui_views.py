"""services.ui.views and services.ui.live on plain data: the map, filters, the health matrix,
and the live batches (one count per connection, exact counts, a bounded sample that says so)."""

from __future__ import annotations

import msgspec
import pytest

from services.ui import views
from services.ui.live import LiveView
from shared.errors import InvalidArgument
from shared.flow_api import EnrichedFlow, FlowGroup, FlowPeer
from shared.messages import Node, NodeHealth, PeerHealth


def peer(pod: str, identity: int, port: int = 0, ns: str = "default") -> FlowPeer:
    return FlowPeer(
        ip=f"10.0.0.{identity % 250}", pod=pod, namespace=ns, identity=identity, port=port
    )


def flow(src: str, dst: str, verdict: str, sport: int, t: float = 1.0) -> EnrichedFlow:
    return EnrichedFlow(
        time=t,
        node="n1",
        type="drop" if verdict == "DROPPED" else "trace",
        verdict=verdict,
        drop_reason=133 if verdict == "DROPPED" else 0,
        protocol="TCP",
        source=peer(src, 300 + len(src), sport),
        destination=peer(dst, 400, 80),
        policy="default/guard" if verdict == "DROPPED" else "",
    )


def test_the_map_has_a_box_per_workload_and_an_edge_per_verdict() -> None:
    groups = [
        FlowGroup(
            source="default/a",
            destination="default/b",
            src_identity=300,
            dst_identity=301,
            protocol="TCP",
            port=80,
            verdict="FORWARDED",
            count=2,
            last=5,
        ),
        FlowGroup(
            source="default/a",
            destination="default/b",
            src_identity=300,
            dst_identity=301,
            protocol="TCP",
            port=81,
            verdict="FORWARDED",
            count=1,
            last=6,
        ),
        FlowGroup(
            source="world",
            destination="default/b",
            src_identity=2,
            dst_identity=301,
            protocol="TCP",
            port=80,
            verdict="DROPPED",
            count=4,
            last=7,
            policy="default/guard",
        ),
    ]
    m = views.service_map(groups)
    assert [(b["id"], b["kind"]) for b in m["boxes"]] == [
        ("default/a", "pod"),
        ("default/b", "pod"),
        ("world", "world"),
    ]
    forwarded, dropped = m["edges"]
    assert (forwarded["count"], forwarded["ports"]) == (3, ["80/TCP", "81/TCP"])
    assert (dropped["verdict"], dropped["policy"]) == ("DROPPED", "default/guard")


def test_filters_are_observes_and_a_bad_one_names_itself() -> None:
    terms = views.filters({"to_workload": "default/b", "not_verdict": "DROPPED", "last": "5"})
    assert [(t.field, t.values, t.negate) for t in terms] == [
        ("to_workload", ["default/b"], False),
        ("verdict", ["DROPPED"], True),
    ]
    with pytest.raises(InvalidArgument) as bad:
        views.filters({"verdict": "MAYBE"})
    assert "MAYBE" in str(bad.value)


def test_the_health_matrix_marks_unreachable_pairs() -> None:
    nodes = [
        Node(name=n, underlay_ip="", pod_cidr="", router_ip="", heartbeat=0)
        for n in ("n1", "n2", "n3")
    ]
    reports = [
        NodeHealth(
            node="n1",
            timestamp=1,
            interval=1,
            peers=[
                PeerHealth(node="n2", reachable=True, http_ms=1.5),
                PeerHealth(node="n3", reachable=False),
            ],
        ),
    ]
    rows = {
        r["from"]: {c["to"]: c for c in r["cells"]}
        for r in views.health_matrix(nodes, reports)["rows"]
    }
    assert rows["n1"]["n2"]["state"] == "ok" and rows["n1"]["n3"]["state"] == "unreachable"
    assert rows["n2"]["n1"]["state"] == "unknown" and rows["n2"]["n2"] == {"to": "n2", "self": True}


def test_live_counts_a_connection_once_by_its_outcome() -> None:
    view = LiveView()
    sent = flow("xwing", "deathstar", "FORWARDED", 5000)  # where it left its pod
    view.offer(sent)
    first = view.take(1.0, True)
    assert [(e["verdict"], e["count"]) for e in first["edges"]] == [("FORWARDED", 1)]
    view.offer(msgspec.structs.replace(sent, verdict="DROPPED", drop_reason=133, type="drop"))
    view.offer(
        msgspec.structs.replace(sent, verdict="DROPPED", drop_reason=133, type="drop", time=1.5)
    )
    moved = {(e["verdict"], e["count"]) for e in view.take(1.25, True)["edges"]}
    assert moved == {("FORWARDED", -1), ("DROPPED", 1)}  # the page moves the count over


def test_live_keeps_exact_counts_and_a_sample_that_says_so() -> None:
    view = LiveView(sample=50)
    for i in range(2000):
        view.offer(flow("tiefighter", "deathstar", "FORWARDED", 10_000 + i))
    view.offer(flow("tiefighter", "deathstar", "FORWARDED", 5, t=1.0))
    batch = view.take(1.0, False)
    assert batch["edges"][0]["count"] == 2001 and len(batch["flows"]) == 50
    assert batch["sampled"] and batch["skipped"] == 1951 and batch["monitor"] is False
    assert batch["rate"] == 2001
    assert LiveView("other-namespace").take(1.0, True)["edges"] == []
