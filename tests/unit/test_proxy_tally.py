"""What a proxy worker tells its leader (services/proxy/tally.py): the same counts after the
channel, in messages that each fit a datagram, and nothing else taken for a tally."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.proxy.tally import MOST_VALUES, Recorder, Tally


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _merged(messages: list[bytes]) -> Tally:
    whole = Tally()
    for message in messages:
        part = Tally.decode(message)
        for key, count in part.requests.items():
            whole.requests[key] = whole.requests.get(key, 0) + count
        for protocol, values in part.latencies.items():
            whole.latencies.setdefault(protocol, []).extend(values)
        whole.accepted += part.accepted
        whole.reused += part.reused
    return whole


def test_a_tally_survives_the_channel_split_into_datagrams() -> None:
    tally = Tally(
        {("http", "FORWARDED", "ingress"): 7, ("kafka", "DROPPED", "egress"): 2},
        {"http": [0.001 * i for i in range(MOST_VALUES + 10)], "kafka": [0.25, 0.5]},
        accepted=3,
        reused=1,
    )
    messages = tally.encode()
    assert len(messages) == 2  # 4,108 latencies: 4,096 and 12
    assert all(len(m) < 256 << 10 for m in messages)  # prefork.RECEIVE
    assert _merged(messages) == tally
    assert Tally.decode(Tally().encode()[0]) == Tally()  # nothing: one empty message
    assert not Tally() and Tally(accepted=1)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"[]",
        b'{"requests": [], "latencies": {}, "accepted": 1}',
        b'{"requests": [["http", "FORWARDED", 3]], "latencies": {}, "accepted": 0, "reused": 0}',
        b'{"requests": [], "latencies": {"http": ["x"]}, "accepted": 0, "reused": 0}',
        b'{"requests": [], "latencies": {}, "accepted": -1, "reused": 0}',
        b'{"requests": [], "latencies": {}, "accepted": 1.5, "reused": 0}',
        b'{"requests": [["a", "b", "c", true]], "latencies": {}, "accepted": 0, "reused": 0}',
    ],
)
def test_anything_else_is_not_a_tally(message: bytes) -> None:
    with pytest.raises(ValueError, match="not a proxy tally"):
        Tally.decode(message)


def test_recorded_under_the_process_that_counted() -> None:
    labels = {"protocol": "grpc", "verdict": "DROPPED", "direction": "egress"}
    before = _value("membrane_proxy_requests_total", **labels)
    seconds = _value("membrane_proxy_request_seconds_count", protocol="grpc")
    worker = _value("membrane_proxy_connections_total", process="2")
    leader = _value("membrane_proxy_connections_total", process="0")
    reused = _value("membrane_proxy_upstreams_reused_total")
    Recorder().record(
        Tally({("grpc", "DROPPED", "egress"): 4}, {"grpc": [0.1, 0.2]}, accepted=5, reused=2), 2
    )
    assert _value("membrane_proxy_requests_total", **labels) == before + 4
    assert _value("membrane_proxy_request_seconds_count", protocol="grpc") == seconds + 2
    assert _value("membrane_proxy_connections_total", process="2") == worker + 5
    assert _value("membrane_proxy_connections_total", process="0") == leader
    assert _value("membrane_proxy_upstreams_reused_total") == reused + 2
