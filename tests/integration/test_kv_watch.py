"""Bus.watch on a real JetStream bucket: snapshot, one caught-up marker, then changes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

import pytest

from membrane.servers import ServerProcess
from shared import kv_watch
from shared.bus import Bus, KVEvent

Events = AsyncGenerator[KVEvent | None, None]


async def take(events: Events, count: int) -> list[KVEvent | None]:
    return [await asyncio.wait_for(anext(events), 5) for _ in range(count)]


async def test_an_empty_bucket_is_caught_up_at_once_and_then_changes_arrive(bus: Bus) -> None:
    kv = await bus.kv("watch-empty")
    async with contextlib.aclosing(Bus.watch(kv)) as events:
        assert await take(events, 1) == [None]
        revision = await kv.put("a", b"1")
        await kv.delete("a")
        first, second = await take(events, 2)
        assert first == KVEvent("a", b"1", revision)
        assert second is not None and second.key == "a" and second.value is None


async def test_the_snapshot_then_one_marker_then_changes(bus: Bus) -> None:
    kv = await bus.kv("watch-full")
    for i in range(50):
        await kv.put(f"k{i}", str(i).encode())
    await kv.put("k7", b"seven")  # only the last value of a key is in the snapshot
    await kv.delete("k9")  # a deleted key comes as a deletion
    async with contextlib.aclosing(Bus.watch(kv)) as events:
        snapshot = await take(events, 51)
        assert snapshot[-1] is None and None not in snapshot[:-1]
        by_key = {e.key: e.value for e in snapshot if e is not None}
        assert by_key["k7"] == b"seven" and by_key["k9"] is None and len(by_key) == 50
        revisions = [e.revision for e in snapshot if e is not None]
        assert revisions == sorted(revisions)  # stream order
        await kv.put("k1", b"again")
        assert [(e.key, e.value) for e in await take(events, 1) if e] == [("k1", b"again")]
        await kv.purge("k2")
        (purged,) = await take(events, 1)
        assert purged is not None and purged.key == "k2" and purged.value is None
        with pytest.raises(asyncio.TimeoutError):  # no second marker, nothing else
            await asyncio.wait_for(anext(events), 0.3)


async def test_a_key_filter(bus: Bus) -> None:
    kv = await bus.kv("watch-filter")
    await kv.put("web.a", b"1")
    await kv.put("db.a", b"2")
    async with contextlib.aclosing(Bus.watch(kv, "db.>")) as events:
        assert await take(events, 2) == [KVEvent("db.a", b"2", 2), None]
    async with contextlib.aclosing(Bus.watch(kv, "none.>")) as events:
        assert await take(events, 1) == [None]


async def test_closing_removes_the_consumer(bus: Bus) -> None:
    kv = await bus.kv("watch-close")
    await kv.put("a", b"1")
    async with contextlib.aclosing(Bus.watch(kv)) as events:
        await take(events, 2)
        assert (await bus.js.stream_info("KV_watch-close")).state.consumer_count == 1
    assert (await bus.js.stream_info("KV_watch-close")).state.consumer_count == 0


async def test_a_slow_reader_gets_everything_in_order(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_watch, "MAX_BUFFERED", 100)  # the subscription waits for room often
    kv = await bus.kv("watch-slow")
    async with contextlib.aclosing(Bus.watch(kv)) as events:
        assert await take(events, 1) == [None]
        for i in range(2000):
            await bus.nc.publish(f"$KV.watch-slow.k{i}", str(i).encode())
        got: list[bytes | None] = []
        for _ in range(2000):
            event = await asyncio.wait_for(anext(events), 5)
            assert event is not None
            got.append(event.value)
            if len(got) % 200 == 0:
                await asyncio.sleep(0.01)
        assert got == [str(i).encode() for i in range(2000)]


async def test_a_large_snapshot_is_read_quickly(bus: Bus) -> None:
    kv = await bus.kv("watch-large")
    for i in range(20_000):
        await bus.nc.publish(f"$KV.watch-large.k{i}", b'{"name":"s","frontends":[]}')
    await kv.put("last", b"x")
    started = time.perf_counter()
    count = 0
    async with contextlib.aclosing(Bus.watch(kv)) as events:
        async for event in events:
            if event is None:
                break
            count += 1
    seconds = time.perf_counter() - started
    assert count == 20_001
    # about 0.2 s here (nats.py's own KV watch: 0.35 s); the bound only catches a regression
    assert seconds < 3, seconds


async def test_a_snapshot_has_every_key_while_keys_are_rewritten(bus: Bus) -> None:
    """Heartbeats rewrite their keys all the time: a key rewritten while a watch delivers its
    snapshot loses its old message (history 1) and comes again as a new one, after the
    message the server marked with nothing pending. The snapshot must still hold it."""
    kv = await bus.kv("watch-busy")
    keys = [f"node-{i}" for i in range(300)]
    for key in keys:
        await kv.put(key, b"1")
    stop = asyncio.Event()

    async def heartbeats() -> None:
        n = 0
        while not stop.is_set():
            await kv.put(keys[n % 20], str(n).encode())  # the first 20 keys, over and over
            n += 1
            await asyncio.sleep(0)

    writer = asyncio.create_task(heartbeats())
    try:
        for _ in range(40):
            snapshot = await Bus.snapshot(kv)
            assert set(snapshot) == set(keys), sorted(set(keys) - set(snapshot))[:5]
    finally:
        stop.set()
        await writer


async def test_a_target_never_reached_catches_up_after_a_wait(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a purge of the stream itself takes messages away without a marker: the snapshot
    then waits CATCH_UP_WAIT_S for them and is caught up anyway."""

    async def beyond(_: object) -> int:
        return 10**9

    monkeypatch.setattr(kv_watch, "_last_sequence", beyond)
    monkeypatch.setattr(kv_watch, "CATCH_UP_WAIT_S", 0.3)
    kv = await bus.kv("watch-purged")
    await kv.put("a", b"1")
    started = time.perf_counter()
    async with contextlib.aclosing(Bus.watch(kv)) as events:
        assert await take(events, 2) == [KVEvent("a", b"1", 1), None]
    assert 0.3 <= time.perf_counter() - started < 3


async def test_a_restarted_watch_deletes_what_vanished_meanwhile(bus: Bus) -> None:
    kv = await bus.kv("watch-resync")
    await kv.put("a", b"1")
    await kv.put("b", b"2")
    known = {"a", "b", "gone"}  # held from an earlier watch; "gone" was deleted since
    async with contextlib.aclosing(Bus.watch(kv)) as watch:
        events = kv_watch.resyncing(watch, known)
        got = [await asyncio.wait_for(anext(events), 5) for _ in range(4)]
    assert got == [KVEvent("a", b"1", 1), KVEvent("b", b"2", 2), KVEvent("gone", None, 0), None]
    assert known == {"a", "b"}


async def test_follow_hands_on_in_order_to_plain_and_coroutine_callbacks(bus: Bus) -> None:
    """kv_watch.follow, the loop every KV consumer runs: snapshot, one synced call, changes;
    a coroutine callback is awaited before the next event, and ``known`` resyncs."""
    kv = await bus.kv("watch-follow")
    await kv.put("a", b"1")
    seen: list[tuple[str, bytes | None] | str] = []
    synced = asyncio.Event()
    changed = asyncio.Event()

    async def on_event(event: KVEvent) -> None:
        await asyncio.sleep(0)  # awaited before the next event is handed on
        seen.append((event.key, event.value))
        if event.key == "c":
            changed.set()

    def on_synced() -> None:
        seen.append("synced")
        synced.set()

    known = {"a", "gone"}
    task = asyncio.create_task(kv_watch.follow(kv, on_event, on_synced, known))
    try:
        await asyncio.wait_for(synced.wait(), 5)
        await kv.put("c", b"3")
        await asyncio.wait_for(changed.wait(), 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert seen == [("a", b"1"), ("gone", None), "synced", ("c", b"3")]
    assert known == {"a", "c"}


async def test_a_watch_comes_back_at_once_after_nats_server_restarted(
    nats_server: ServerProcess, bus: Bus
) -> None:
    """A restarted server has lost the watch's consumer. The connection's reconnect makes it
    again from the next sequence, without waiting for two missed idle heartbeats
    (2 x HEARTBEAT_S); nothing written meanwhile is missed."""
    kv = await bus.kv("watch-restart")
    await kv.put("a", b"1")
    async with contextlib.aclosing(Bus.watch(kv)) as events:
        assert [e.key if e else None for e in await take(events, 2)] == ["a", None]
        reconnects = bus.nc.stats["reconnects"]
        nats_server.stop()
        nats_server.start()
        started = time.monotonic()
        while bus.nc.stats["reconnects"] == reconnects or not bus.nc.is_connected:
            assert time.monotonic() - started < 10, "no reconnect"
            await asyncio.sleep(0.01)
        reconnected = time.monotonic()
        revision = await kv.put("b", b"2")
        (event,) = [await asyncio.wait_for(anext(events), 2 * kv_watch.HEARTBEAT_S - 1)]
        assert event == KVEvent("b", b"2", revision)
        assert time.monotonic() - reconnected < kv_watch.HEARTBEAT_S
