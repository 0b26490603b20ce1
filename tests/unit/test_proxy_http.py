"""The proxy's HTTP/1.1 handling of what a client sends, over real loopback TCP (no upstream:
the view allows nothing, so every request is answered by the proxy itself), and a fuzz run with
a fixed seed: whatever arrives, the connection ends cleanly and nothing but 4xx comes back."""

from __future__ import annotations

import random

import msgspec
import pytest

from services.proxy.http import MAX_HEADER_BYTES
from services.proxy.view import View
from shared import identities
from shared.messages import L7Info, ResolvedPolicy
from tests.unit import proxy_loop

SEED = 20261202
VALID = (
    b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: deathstar\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\nx-sum: 7\r\n\r\n"
    b"GET /v1 HTTP/1.1\r\nHost: deathstar\r\n\r\n"
    b"HEAD /v1 HTTP/1.1\r\nHost: deathstar\r\n\r\n"
)


def deny_all() -> View:
    """Loopback is "world" here: its ingress enforced with nothing allowed."""
    view = View()
    policy = ResolvedPolicy(identity=identities.WORLD, revision=1, ingress_enforced=True)
    view.set_resolved(str(identities.WORLD), msgspec.json.encode(policy))
    return view


async def exchange(data: bytes, *, close: bool = True) -> tuple[bytes, list[L7Info]]:
    return await proxy_loop.exchange(deny_all(), data, close=close)


async def test_pipelined_requests_each_get_403_in_order() -> None:
    answer, reported = await exchange(VALID)
    assert answer.count(b"HTTP/1.1 403 Forbidden") == 4
    assert answer.count(b"Access denied") == 4
    assert [r.method for r in reported] == ["POST", "PUT", "GET", "HEAD"]
    assert [r.url for r in reported] == ["/v1/request-landing", "/v1/exhaust-port", "/v1", "/v1"]


async def test_malformed_is_400_and_close() -> None:
    answer, _ = await exchange(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n", close=False)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request") and b"connection: close" in answer


async def test_oversized_header_block_is_431_and_close() -> None:
    big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n"
    answer, _ = await exchange(big, close=False)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")


async def test_a_header_line_that_never_ends_is_431() -> None:
    endless = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (3 * MAX_HEADER_BYTES)
    answer, _ = await exchange(endless, close=False)
    assert answer.startswith(b"HTTP/1.1 431")


async def test_denied_expect_continue_with_a_body_answers_at_once_and_closes() -> None:
    head = b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
    answer, _ = await exchange(head, close=False)  # the body never comes
    assert answer.startswith(b"HTTP/1.1 403") and b"connection: close" in answer


async def test_connection_close_is_honoured() -> None:
    answer, _ = await exchange(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", close=False)
    assert answer.count(b"HTTP/1.1 403") == 1 and b"connection: close" in answer


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.randrange(4)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 2:
            del out[at : at + rng.randint(1, 16)]
        else:
            out = out[:at]
    return bytes(out)


@pytest.mark.parametrize("batch", range(4))
async def test_fuzz_never_crashes_and_never_forwards(batch: int) -> None:
    rng = random.Random(SEED + batch)
    for _ in range(50):
        data = _mutate(rng, VALID) if rng.random() < 0.8 else rng.randbytes(rng.randint(1, 512))
        answer, _ = await exchange(data)
        # nothing to forward (the view allows nothing): only the proxy's own 4xx answers
        for line in answer.split(b"\r\n"):
            if line.startswith(b"HTTP/"):
                assert line.split(b" ")[1][:1] == b"4", (data, answer)
