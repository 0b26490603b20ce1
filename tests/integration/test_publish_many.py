"""Bus.publish_many on a real nats-server: every message, on its subject, in order."""

from __future__ import annotations

from nats.aio.msg import Msg

from membrane.servers import ServerProcess
from shared.bus import Bus
from tests.conftest import eventually


async def test_publish_many_delivers_each_message_on_its_subject_in_order(bus: Bus) -> None:
    got: list[tuple[str, bytes]] = []

    async def on_message(msg: Msg) -> None:
        got.append((msg.subject, msg.data))

    await bus.nc.subscribe("t.>", cb=on_message)
    await bus.nc.flush()
    sent = [(f"t.{n % 3}.x", b"%d:" % n + b"y" * (n % 700)) for n in range(5000)]
    sent.append(("t.empty", b""))
    out_msgs = bus.nc.stats["out_msgs"]
    await bus.publish_many(sent[:2500])
    await bus.publish_many(sent[2500:])
    await bus.publish_many([])

    async def all_there() -> None:
        assert len(got) == len(sent)

    await eventually(all_there, timeout=10, what="every message")
    assert got == sent
    assert bus.nc.stats["out_msgs"] - out_msgs == len(sent)


async def test_while_disconnected_it_publishes_as_nats_py_does(
    nats_server: ServerProcess, bus: Bus
) -> None:
    """Buffered by the client for the reconnect (not written into a dead connection)."""
    got: list[bytes] = []

    async def on_message(msg: Msg) -> None:
        got.append(msg.data)

    await bus.nc.subscribe("d.>", cb=on_message)
    await bus.nc.flush()
    nats_server.stop()

    async def away() -> None:
        assert not bus.nc.is_connected

    await eventually(away, timeout=10, what="the client sees the server gone")
    await bus.publish_many([("d.1", b"a"), ("d.2", b"b")])
    nats_server.start()

    async def back() -> None:
        assert got == [b"a", b"b"]

    await eventually(back, timeout=20, what="the buffered messages after the reconnect")
