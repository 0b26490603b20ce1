"""A proxied connection over real loopback TCP, for the proxy's protocol tests: bytes in, what
the proxy answered and reported out. The views these tests use never allow a request (an
upstream would be the original destination: this very listener)."""

from __future__ import annotations

import asyncio

from services.proxy.connection import accepting
from services.proxy.view import View
from shared.messages import L7Info


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
