"""The JetStream stream of DROPPED and AUDIT enriched flows: created by the monitor, read for
history queries older than the replicas' rings."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from shared import subjects
from shared.bus import Bus
from shared.flow_api import EnrichedFlow, decode_flow_batch

HISTORY_WAIT_S: Final = 2.0
# messages of the first window back from the end (newest flows); each next window is twice
HISTORY_WINDOW: Final = 64


async def read(
    bus: Bus,
    test: Callable[[EnrichedFlow], bool],
    *,
    since: float,
    last: int,
    scan: int,
) -> list[EnrichedFlow]:
    """Matching flows of the history stream, oldest first: from ``since``, else the newest
    ``scan`` flows; at most ``scan`` are read either way. A message holds a batch of flows
    (JSON lines; a message of the former per-flow subjects is a batch of one)."""
    try:
        info = await bus.js.stream_info(subjects.STREAM_FLOW_HISTORY)
    except nats.js.errors.NotFoundError:
        return []
    first, end = info.state.first_seq, info.state.last_seq
    if not info.state.messages or end < first:
        return []
    if since:
        start = datetime.fromtimestamp(since, UTC)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
        flows = await _read(bus, config, end, scan)
        return _matching(flows[:scan], test, since, last)
    # the newest `scan` flows: windows of messages back from the end, each twice the last,
    # until they hold `scan` flows (a message holds one flow or many)
    windows: list[list[EnrichedFlow]] = []
    held, stop, size = 0, end, HISTORY_WINDOW
    while held < scan and stop >= first:
        begin = max(first, stop - size + 1)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=begin)
        window = await _read(bus, config, stop)  # all of it: its newest flows count
        windows.append(window)
        held += len(window)
        stop, size = begin - 1, size * 2
    flows = [flow for window in reversed(windows) for flow in window]
    return _matching(flows[-scan:], test, since, last)


def _matching(
    flows: list[EnrichedFlow], test: Callable[[EnrichedFlow], bool], since: float, last: int
) -> list[EnrichedFlow]:
    # the stream orders by arrival; a flow may be older than its message
    found = [flow for flow in flows if test(flow) and flow.time >= since]
    return found[-last:] if last else found


async def _read(
    bus: Bus, config: ConsumerConfig, end: int, scan: int = sys.maxsize
) -> list[EnrichedFlow]:
    """The flows of the messages from the config's start to sequence ``end``, reading no
    further once ``scan`` flows are read."""
    flows: list[EnrichedFlow] = []
    sub = await bus.js.subscribe(
        subjects.EVENTS_ALL,  # batches, and flows kept from the former per-flow subjects
        stream=subjects.STREAM_FLOW_HISTORY,
        ordered_consumer=True,
        config=config,
    )
    try:
        while len(flows) < scan:
            try:
                msg = await sub.next_msg(timeout=HISTORY_WAIT_S)
            except nats.errors.TimeoutError:
                break
            if msg.metadata.sequence.stream > end:
                break
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                flows.extend(decode_flow_batch(msg.data))
            if msg.metadata.sequence.stream >= end or msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return flows


async def ensure_stream(bus: Bus, *, max_flows: int, max_age: float, replicas: int) -> None:
    config = StreamConfig(
        name=subjects.STREAM_FLOW_HISTORY,
        description="DROPPED and AUDIT enriched flows, for `membrane observe` history",
        subjects=[
            f"{subjects.EVENTS_FLOW_BATCHES_PREFIX}.DROPPED.>",
            f"{subjects.EVENTS_FLOW_BATCHES_PREFIX}.AUDIT.>",
        ],
        storage=StorageType.FILE,
        max_msgs=max_flows,
        max_age=max_age,
        num_replicas=replicas,
    )
    try:
        await bus.js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # it exists (created by another replica, or with older limits): take these limits
        await bus.js.update_stream(config)
