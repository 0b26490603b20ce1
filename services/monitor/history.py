"""The JetStream stream of DROPPED and AUDIT enriched flows: created by the monitor, read for
history queries older than the replicas' rings."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from shared import subjects
from shared.bus import Bus
from shared.flow_api import EnrichedFlow

HISTORY_WAIT_S: Final = 2.0


async def read(
    bus: Bus,
    test: Callable[[EnrichedFlow], bool],
    *,
    since: float,
    last: int,
    scan: int,
) -> list[EnrichedFlow]:
    """Matching flows of the history stream, oldest first: from ``since``, else the newest
    ``scan`` flows; at most ``scan`` are read either way."""
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
    else:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(first, end - scan + 1),
        )
    found: collections.deque[EnrichedFlow] = collections.deque(maxlen=last or None)
    sub = await bus.js.subscribe(
        subjects.EVENTS_FLOWS_ALL,
        stream=subjects.STREAM_FLOW_HISTORY,
        ordered_consumer=True,
        config=config,
    )
    try:
        for _ in range(scan):
            try:
                msg = await sub.next_msg(timeout=HISTORY_WAIT_S)
            except nats.errors.TimeoutError:
                break
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                flow = msgspec.json.decode(msg.data, type=EnrichedFlow)
                # the stream orders by arrival; a flow may be older than its message
                if test(flow) and flow.time >= since:
                    found.append(flow)
            if msg.metadata.sequence.stream >= end or msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return list(found)


async def ensure_stream(bus: Bus, *, max_flows: int, max_age: float, replicas: int) -> None:
    config = StreamConfig(
        name=subjects.STREAM_FLOW_HISTORY,
        description="DROPPED and AUDIT enriched flows, for `membrane observe` history",
        subjects=[
            f"{subjects.EVENTS_FLOWS_PREFIX}.DROPPED.>",
            f"{subjects.EVENTS_FLOWS_PREFIX}.AUDIT.>",
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
