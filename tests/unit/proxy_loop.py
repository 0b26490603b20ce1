"""A proxied connection over real loopback TCP, for the proxy's protocol tests: bytes in, what
the proxy answered and reported out. The views these tests use never allow a request (an
upstream would be the original destination: this very listener)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.proxy.connection import accepting
from services.proxy.view import View
from shared import identities
from shared.messages import L7Info, PolicyEntry, ResolvedPolicy


def world_view(rules: list[dict[str, Any]], rule_name: str = "default/empire[0]") -> View:
    """Loopback is "world": a view whose ingress lets it send what the L7 ``rules`` allow (one
    rule, id 1, named ``rule_name``)."""
    view = View()
    entry = PolicyEntry(peer=0, protocol=6, port=0, rule_id=1, l7=rules)
    policy = ResolvedPolicy(
        identity=identities.WORLD, revision=1, ingress_enforced=True, ingress=[entry],
        rules={1: rule_name},
    )  # fmt: skip
    view.set_resolved(str(identities.WORLD), msgspec.json.encode(policy))
    return view


async def exchange(view: View, data: bytes, *, close: bool = True) -> tuple[bytes, list[L7Info]]:
    """``data`` sent to a proxied connection (then the write side closed, unless ``close`` is
    false); everything it answered, and what it reported. The handler never raises."""
    reported: list[L7Info] = []
    failures: list[BaseException] = []

    # the listener's protocol, as the service makes it
    new_connection = accepting(view, lambda _c, _v, l7: reported.append(l7), failures.append)
    server = await asyncio.get_running_loop().create_server(new_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if close:
        writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    server.close()
    await server.wait_closed()
    assert not failures, (data, failures)
    return answer, reported
