"""What a proxy process counted for Prometheus since it last said, and how a worker process
tells its leader (:mod:`services.proxy.prefork`): only the leader serves ``/metrics``.

Counted per batch, not per request: a Prometheus counter takes a lock and a histogram walks its
buckets on every call, which at tens of thousands of requests a second was measurable.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from prometheus_client import Counter, Histogram

from shared import metrics

REQUESTS = Counter(
    "membrane_proxy_requests_total",
    "Requests the L7 proxy decided, by protocol, verdict and the direction whose rules decided",
    ["protocol", "verdict", "direction"],
)
LATENCY = Histogram(
    "membrane_proxy_request_seconds",
    "Time from a request's headers to its answer's end, through the L7 proxy",
    ["protocol"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
CONNECTIONS = Counter(
    "membrane_proxy_connections_total",
    "Connections the L7 proxy accepted, by the process that took them (0: the first)",
    ["process"],
)
REUSED = Counter(
    "membrane_proxy_upstreams_reused_total",
    "HTTP/1.1 upstream connections taken from the pool for another client connection",
)

RequestKey = tuple[str, str, str]  # protocol, verdict, direction
MOST_VALUES = 4096  # latencies per message: about 80 KiB of JSON


@dataclasses.dataclass
class Tally:
    requests: dict[RequestKey, int] = dataclasses.field(default_factory=dict)
    latencies: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # s, by protocol
    accepted: int = 0  # connections
    reused: int = 0  # upstreams taken from the pool

    def __bool__(self) -> bool:
        return bool(self.requests or self.accepted or self.reused)

    def encode(self, most: int = MOST_VALUES) -> list[bytes]:
        """Messages that together say this tally, each with at most ``most`` latencies: a
        message on the leader's channel is one datagram, which must fit its socket's buffer."""
        values = [(protocol, v) for protocol, vs in self.latencies.items() for v in vs]
        messages = []
        for start in range(0, max(len(values), 1), most):
            latencies: dict[str, list[float]] = {}
            for protocol, value in values[start : start + most]:
                latencies.setdefault(protocol, []).append(value)
            first = start == 0
            body = {
                "requests": [[*k, n] for k, n in self.requests.items()] if first else [],
                "latencies": latencies,
                "accepted": self.accepted if first else 0,
                "reused": self.reused if first else 0,
            }
            messages.append(json.dumps(body, separators=(",", ":")).encode())
        return messages

    @classmethod
    def decode(cls, data: bytes) -> Tally:
        """Raises ``ValueError`` on anything but what :meth:`encode` makes."""
        try:
            body: Any = json.loads(data)
            tally = cls(
                {
                    (str(protocol), str(verdict), str(direction)): _count(count)
                    for protocol, verdict, direction, count in body["requests"]
                },
                {
                    str(protocol): [float(v) for v in values]
                    for protocol, values in body["latencies"].items()
                },
                _count(body["accepted"]),
                _count(body["reused"]),
            )
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a proxy tally: {exc}") from None
        return tally


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"count {value!r}")
    return value


class Recorder:
    """Tallies into the Prometheus metrics: one increment per label set and bucket."""

    def __init__(self) -> None:
        self._requests: dict[RequestKey, Any] = {}

    def record(self, tally: Tally, process: int) -> None:
        for key, count in tally.requests.items():
            counter = self._requests.get(key)
            if counter is None:
                counter = self._requests[key] = REQUESTS.labels(*key)
            counter.inc(count)
        for protocol, values in tally.latencies.items():
            metrics.observe_many(LATENCY.labels(protocol), values)
        if tally.accepted:
            CONNECTIONS.labels(str(process)).inc(tally.accepted)
        if tally.reused:
            REUSED.inc(tally.reused)
