"""The bus server membrane runs: what the rest of the design assumes of it."""

from __future__ import annotations

import asyncio

from membrane.servers import ServerProcess
from shared.bus import Bus

CONSUMERS = 3000
# nats-server 2.9.10 (Debian 12's, which membrane ran before) kept about 6 KB for every
# consumer ever created (nats-server#4289): ~18 MB for these; 2.10.26 grows well under 1 MB
MAX_GROWTH_KB = 6 * 1024


def _resident_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_consumers_created_and_deleted_leave_no_memory_behind(
    nats_server: ServerProcess, bus: Bus
) -> None:
    """Every watch, and every snapshot (each CLI lookup, each agent's pod lookup), creates an
    ordered consumer and deletes it; a churning cluster creates them without end, so the
    server must give back what each one took."""
    assert nats_server.process is not None
    kv = await bus.kv("leak-check")
    for index in range(10):
        await kv.put(f"k{index}", b"x" * 100)
    for _ in range(300):  # the server's own caches and pools warm up first
        await Bus.snapshot(kv, "k3")
    await asyncio.sleep(1.0)
    before = _resident_kb(nats_server.process.pid)
    for _ in range(CONSUMERS):
        assert await Bus.snapshot(kv, "k3") == {"k3": b"x" * 100}
    await asyncio.sleep(2.0)
    grown = _resident_kb(nats_server.process.pid) - before
    assert grown < MAX_GROWTH_KB, f"nats-server grew {grown} kB over {CONSUMERS} consumers"
