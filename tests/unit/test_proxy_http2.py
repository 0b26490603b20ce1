"""The proxy's HTTP/2 (h2c, gRPC) handling of what a client sends, over real loopback TCP with
h2 as the client (no upstream: the view allows nothing, so the proxy answers every stream), and
a fuzz run with a fixed seed: whatever arrives, the connection ends cleanly, nothing is
forwarded and only the proxy's own denials come back."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
import pytest

from services.proxy.http2 import PREFACE
from shared.messages import L7Info
from tests.unit import proxy_loop
from tests.unit.test_proxy_http import deny_all

SEED = 20261203
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def request(path: str, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"deathstar:50051"),
        *extra,
    ]


def grpc_client(streams: int) -> tuple[h2.connection.H2Connection, bytes]:
    """A client and its opening: preface, settings, ``streams`` gRPC calls with a message."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for i in range(streams):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, request(f"/empire.DeathStar/Call{i}", GRPC))
        client.send_data(sid, b"\x00\x00\x00\x00\x05hello", end_stream=True)
    return client, client.data_to_send()


async def exchange(data: bytes) -> tuple[bytes, list[L7Info]]:
    return await proxy_loop.exchange(deny_all(), data)


def events_of(answer: bytes) -> list[h2.events.Event]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    return client.receive_data(answer)


async def test_each_denied_call_gets_permission_denied_and_the_connection_stays() -> None:
    client, opening = grpc_client(3)
    answer, reported = await exchange(opening)
    events = client.receive_data(answer)
    trailers_only = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert [e.stream_id for e in trailers_only] == [1, 3, 5]
    for event in trailers_only:
        headers = dict(event.headers)
        assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"7", headers
        assert event.stream_ended is not None  # trailers-only: nothing after it
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    assert [(r.protocol, r.url, r.grpc_status) for r in reported] == [
        ("grpc", f"/empire.DeathStar/Call{i}", 7) for i in range(3)
    ]


async def test_a_denied_plain_http2_request_gets_403() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, request("/v1/exhaust-port", []), end_stream=True)
    answer, reported = await exchange(client.data_to_send())
    events = client.receive_data(answer)
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(response.headers)[b":status"] == b"403"
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert body == b"Access denied\r\n"
    assert [(r.protocol, r.status) for r in reported] == [("http2", 403)]


async def test_malformed_frames_close_with_goaway_and_a_flow_says_why() -> None:
    # a HEADERS frame on stream 0 is a connection error (PROTOCOL_ERROR)
    bad = (
        PREFACE
        + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        + b"\x00\x00\x01\x01\x05\x00\x00\x00\x00\x82"
    )
    answer, reported = await exchange(bad)
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events_of(answer))
    (flow,) = reported
    assert flow.protocol == "http2" and flow.error.startswith("malformed HTTP/2"), flow


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(PREFACE), len(out) + 1)  # the preface kept: HTTP/2 is tried
        kind = rng.randrange(3)
        if kind == 0 and at < len(out):
            out[at] = rng.randrange(256)
        elif kind == 1:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            del out[at : at + rng.randint(1, 16)]
    return bytes(out)


@pytest.mark.parametrize("batch", range(3))
async def test_fuzz_never_crashes_and_never_forwards(batch: int) -> None:
    rng = random.Random(SEED + batch)
    _, valid = grpc_client(2)
    for _ in range(40):
        data = _mutate(rng, valid) if rng.random() < 0.85 else PREFACE + rng.randbytes(64)
        _, reported = await exchange(data)
        # nothing forwarded (the view allows nothing): every report is a denial or an error
        for flow in reported:
            assert flow.grpc_status == 7 or flow.status == 403 or flow.error, (data, flow)
