"""`membrane status`'s node table and latency matrix, from bucket contents."""

from __future__ import annotations

from membrane.cli_nodes import NodesView, as_json, render
from services.datapath.tunnel import OverlayConfig
from shared.messages import Node, NodeHealth, NodeLiveness, PeerHealth

NOW = 1_000_000.0


def node(i: int, age: float) -> Node:
    return Node(
        name=f"n{i}",
        underlay_ip=f"172.31.0.{10 + i}",
        pod_cidr=f"10.244.{i}.0/24",
        router_ip=f"10.244.{i}.1",
        heartbeat=NOW - age,
        health_ip=f"10.244.{i}.2",
        routing="tunnel",
    )


def report(source: int, peers: dict[int, float | None], age: float = 1.0) -> NodeHealth:
    return NodeHealth(
        node=f"n{source}",
        timestamp=NOW - age,
        interval=5.0,
        peers=[
            PeerHealth(node=f"n{i}", http_ms=ms, icmp_ms=ms, reachable=ms is not None)
            for i, ms in peers.items()
        ],
    )


def test_matrix_marks_unreachable_dead_and_stale() -> None:
    view = NodesView(
        nodes=[node(1, 1), node(2, 2), node(3, 40)],
        # the failure detector's verdicts: n3 dead for 25 s, n1 alive, n2 not judged yet
        liveness={
            "n1": NodeLiveness(node="n1", alive=True, since=NOW - 30, heartbeat=NOW - 30),
            "n3": NodeLiveness(node="n3", alive=False, since=NOW - 25, heartbeat=NOW - 40),
        },
        health=[
            report(1, {2: 0.5, 3: None}),
            report(2, {1: 0.75, 3: None}),
            report(3, {1: 0.9, 2: 0.8}, age=60),  # stopped reporting
        ],
    )
    text = render(view, now=NOW)
    lines = text.splitlines()
    (n3,) = [line for line in lines if line.startswith("n3 ") and "172.31" in line]
    assert "DEAD" in n3 and "0/2" in n3 and "25s" in n3
    (row1,) = [line for line in lines if line.startswith("n1 ") and "ms" in line]
    assert row1.split()[1:] == ["-", "0.50ms", "UNREACHABLE"]
    (row3,) = [line for line in lines if line.startswith("n3 ") and "stale" in line]
    assert row3.split()[1:] == ["stale", "stale", "-"]
    data = as_json(view, now=NOW)
    assert data["matrix"]["n1"] == {"n2": 0.5, "n3": None}
    assert [n["alive"] for n in data["nodes"]] == [True, True, False]


def test_overlay_config_layout() -> None:
    from ipaddress import IPv4Address

    config = OverlayConfig(IPv4Address("172.31.0.11"), 7, 1, 8472)
    packed = config.pack()
    assert len(packed) == 16  # struct overlay_config: three u32, two u16
    assert packed[:4] == bytes([172, 31, 0, 11])  # network byte order, as the datapath compares
    assert packed[12:14] == (8472).to_bytes(2, "little")  # the tunnel port, host order
    assert OverlayConfig.unpack(packed) == config


def test_a_peer_that_never_answered_is_probed_again_soon() -> None:
    from services.datapath.health import STARTUP_RETRIES, STARTUP_RETRY_S, Health

    health = Health.__new__(Health)  # the scheduling only: no agent, bus or namespace
    health.interval, health.reached = 5.0, set()
    health.results = {"n2": PeerHealth(node="n2", reachable=False, failures=1)}
    assert health.next_round_in() == STARTUP_RETRY_S  # start-up: the peer may be a moment late
    health.results["n2"] = PeerHealth(node="n2", reachable=True)
    health.reached.add("n2")
    assert health.next_round_in() == 5.0
    health.results["n2"] = PeerHealth(node="n2", reachable=False, failures=1)
    assert health.next_round_in() == 5.0  # it answered before: a real failure, the interval
    health.results["n3"] = PeerHealth(node="n3", failures=STARTUP_RETRIES + 1)
    assert health.next_round_in() == 5.0  # never answered, but long enough: not start-up
