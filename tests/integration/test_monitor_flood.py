"""A flood of flow batches faster than a monitor replica enriches them: every flow is
enriched or counted lost at the monitor's intake, none dropped by nats-server uncounted.

The replica runs as its own process (``membrane run monitor``), as in a deployment; the
batches come at 50 MiB a second, a fraction of what it can read (binary batches: twice the
flows it enriches). Before the replica gave its loop back to the intake until messages
stopped coming, it read only ~256 KiB of its socket per batch it enriched (per 8 JSON
batches), nats-server's buffer for it passed 64 MiB within seconds, nats-server cut it off as
a slow consumer and the batches in that buffer were lost without any stage counting them (a
replica of that code fails this test both ways).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator

import msgspec
import pytest

from bench.monitor_stages import batches
from membrane.servers import ServerProcess, terminate
from membrane.supervisor import die_with_parent
from shared import flow_wire, subjects
from shared.bus import Bus
from shared.flow_api import MonitorStatus
from shared.flow_decode import Decoder, WireBatch
from shared.messages import Empty
from tests.conftest import eventually, membrane_command

NODE = "bench-node"
BATCHES = 600  # 120-140 MiB
RATE = 50 << 20  # bytes a second


@pytest.fixture
def replica(nats_server: ServerProcess) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(
        os.environ,
        MEMBRANE_NATS_URL=nats_server.url,
        MEMBRANE_LOG_FORMAT="json",
        MEMBRANE_REPLICA="flooded",
    )
    proc = subprocess.Popen(membrane_command("run", "monitor"), env=env, preexec_fn=die_with_parent)
    yield proc
    terminate([proc])


def json_batches(binary: list[bytes]) -> list[bytes]:
    """The same flows as an agent on the JSON wire sends them: FlowBatch of 512."""
    out = []
    for data in binary:
        batch = flow_wire.decode(data)
        records = batch.unpack()
        for start in range(0, len(records), 512):
            flows = Decoder(NODE).wire(records[start : start + 512], batch.clock_offset_ns)
            out.append(msgspec.json.encode(WireBatch(node=NODE, flows=flows)))
    return out


@pytest.mark.parametrize("wire", ["binary", "json"])
async def test_a_flood_is_enriched_or_counted_lost_at_the_intake(
    bus: Bus, replica: subprocess.Popen[bytes], wire: str
) -> None:
    deadline = time.monotonic() + 30
    while not (found := await bus.discover(subjects.MONITOR_SERVICE, timeout=0.2)):
        assert time.monotonic() < deadline, "the monitor replica did not come up"
    status_subject = subjects.monitor_status(found[0].id)
    payloads = batches(4096 * 8)
    if wire == "json":
        payloads = json_batches(payloads)
    per_batch = 4096 if wire == "binary" else 512
    subject = subjects.flows(NODE)
    started = time.monotonic()
    for n in range(BATCHES):
        payload = payloads[n % len(payloads)]
        await bus.nc.publish(subject, payload)
        # paced: a fraction of what the replica can read
        await asyncio.sleep(max(0.0, started + (n + 1) * len(payload) / RATE - time.monotonic()))
    await bus.nc.flush(timeout=30)
    seen_lost = (0, 0)

    async def settled() -> None:
        nonlocal seen_lost
        status = await bus.request(status_subject, Empty(), MonitorStatus)
        seen_lost = (status.flows_seen, status.flows_lost)
        assert sum(seen_lost) == BATCHES * per_batch

    await eventually(settled, timeout=60, what="every flow enriched or counted lost")
    seen, lost = seen_lost
    assert seen > 0
    if wire == "binary":
        # 50 MiB/s of binary batches is ~900,000 flows/s, more than a replica enriches: the
        # excess was counted at the intake (JSON: ~130,000 flows/s, about what it enriches)
        assert lost > 0
    assert replica.poll() is None
