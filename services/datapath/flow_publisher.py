"""Read flow events from the datapath's ring buffer and publish them in batches on the bus.

The ring buffer is read from the event loop whenever its fd is readable, in bounded chunks so
that the loop keeps turning; publishing runs in its own task behind a bounded queue. When the
bus falls behind, reading pauses and the ring buffer holds the events (what it cannot hold the
datapath counts as lost); when the bus is stuck for longer than the publish timeout, reading
goes on and batches the queue cannot take are dropped. Either way the loss is counted, in the
batches' ``lost`` and in ``membrane_datapath_flows_dropped_total``, and logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from prometheus_client import Counter

from services.datapath.events import RECORD, Decoder, WireBatch, WireFlow
from shared import log, subjects
from shared.bus import Bus

MAX_FLOWS: Final = 512
MAX_DELAY_S: Final = 0.05
# The datapath submits events without waking the reader (a wake-up costs the sending packet
# microseconds), so the ring is also drained on this timer.
POLL_INTERVAL_S: Final = 0.01
# records decoded per wake-up: about 10 ms of work, so timers and the sender keep running
DRAIN_CHUNK: Final = 8192
# batches waiting for the bus: at half of it reading pauses (the ring buffer holds what comes
# meanwhile), at all of it new batches are dropped (and counted)
MAX_QUEUED: Final = 64
PUBLISH_TIMEOUT_S: Final = 2.0
# a flush reads at most this many chunks, in case the datapath writes as fast as it reads
FLUSH_CHUNKS: Final = 128
LOG_EVERY_S: Final = 10.0

FLOWS_PUBLISHED = Counter(
    "membrane_datapath_flows_published_total", "Flows handed to the bus by the flow publisher"
)
FLOW_BATCHES = Counter(
    "membrane_datapath_flow_batches_total", "Flow batches handed to the bus by the flow publisher"
)
FLOWS_DROPPED = Counter(
    "membrane_datapath_flows_dropped_total",
    "Flows read from the ring buffer but not published (bus unavailable or too slow)",
)

_log = log.get("flows")


class RecordSource(Protocol):
    """Where records come from: a :class:`~services.datapath.ringbuf.RingBuffer`."""

    def fileno(self) -> int: ...

    def drain_unpack(
        self, record: struct.Struct, max_records: int = ...
    ) -> list[tuple[Any, ...]]: ...


class FlowPublisher:
    """Publishes a node's flows as FlowBatch on ``membrane.flows.<node>``.

    A batch goes out once it holds ``max_flows`` flows or ``max_delay`` seconds after its
    first flow, whichever comes first. ``lost_events`` returns the cumulative count of events
    the datapath could not put in the ring buffer; each batch carries the increase since the
    previous one (counted from this publisher's construction), and an increase with no flows
    to carry it goes out in a batch of its own.
    """

    def __init__(
        self,
        bus: Bus,
        node: str,
        ring: RecordSource,
        lost_events: Callable[[], int],
        *,
        max_flows: int = MAX_FLOWS,
        max_delay: float = MAX_DELAY_S,
        max_queued: int = MAX_QUEUED,
        publish_timeout: float = PUBLISH_TIMEOUT_S,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> None:
        self._bus = bus
        self._node = node
        self._subject = subjects.flows(node)
        self._ring = ring
        self._lost_events = lost_events
        self._max_flows = max_flows
        self._max_delay = max_delay
        self._max_queued = max_queued
        self._publish_timeout = publish_timeout
        self._poll_interval = poll_interval
        self._decoder = Decoder(node)
        # records per wake-up: bounded in time, and never more batches than the queue takes
        self._chunk = max(1, min(DRAIN_CHUNK, max_flows * max(1, max_queued // 4)))
        self._pending: list[WireFlow] = []
        self._timer: asyncio.TimerHandle | None = None
        self._queue: collections.deque[WireBatch] = collections.deque()
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()  # keeps batches in order between sender and flush
        self._lost_seen = self._read_lost() or 0
        self._lost_carry = 0  # lost counts of batches that never made it out
        self._failure: asyncio.Future[None] | None = None
        self._reading = False  # the ring buffer's fd is (to be) watched by run()
        self._paused_since: float | None = None
        self._unlogged_drops = 0
        self._drop_reason = ""
        self._last_drop_log = -LOG_EVERY_S
        self._lost_read_failed = False

    async def run(self) -> None:
        """Read and publish until cancelled; what was read by then is published first."""
        loop = asyncio.get_running_loop()
        self._failure = loop.create_future()
        sender = asyncio.create_task(self._send_queued(), name=f"flows-send-{self._node}")
        fd = self._ring.fileno()
        loop.add_reader(fd, self._on_readable)
        self._reading = True
        try:
            while True:
                await asyncio.wait({self._failure}, timeout=self._poll_interval)
                if self._failure.done():
                    self._failure.result()  # the reader failed: stop, so a supervisor sees it
                if self._reading and self._paused_since is None:
                    self._on_readable()
                if not self._pending:
                    self._cut()  # only when the lost count moved: no flows to carry it
                paused = self._paused_since
                if paused is not None and time.monotonic() - paused > self._publish_timeout:
                    self._resume()  # the bus is stuck: read on, and drop what it cannot take
                self._log_drops()  # drops that came after the last line
        finally:
            self._reading = False
            loop.remove_reader(fd)
            try:
                await asyncio.wait_for(self.flush(), self._publish_timeout)
            except Exception:
                _log.warning("final flow flush failed", node=self._node, exc_info=True)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def flush(self) -> None:
        """Publish every flow read so far and what the ring buffer holds now."""
        for _ in range(FLUSH_CHUNKS):
            read = self._read_ring()
            await self._send_all()
            if read < self._chunk:
                break
        self._cut()
        await self._send_all()

    # --- reading (event loop callbacks: no awaits, bounded work) -------------------------------

    def _on_readable(self) -> None:
        try:
            self._read_ring()
        except Exception as exc:
            # the fd stays readable: retrying would spin; let run() end instead
            asyncio.get_running_loop().remove_reader(self._ring.fileno())
            if self._failure is not None and not self._failure.done():
                self._failure.set_exception(exc)

    def _read_ring(self) -> int:
        """Read a chunk of records into batches; how many records there were."""
        records = self._ring.drain_unpack(RECORD, self._chunk)
        if not records:
            return 0
        pending = self._pending
        if not pending:
            self._start_timer()
        pending.extend(self._decoder.wire(records))
        size = self._max_flows
        if len(pending) < size:
            return len(records)
        full = len(pending) - len(pending) % size
        for start in range(0, full, size):
            self._enqueue(pending[start : start + size])
        del pending[:full]
        self._cancel_timer()
        if pending:
            self._start_timer()  # the rest starts a new batch, timed from now
        return len(records)

    def _start_timer(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._cut()

    def _cut(self) -> None:
        """Queue the pending flows as a batch; an empty one only if events were lost."""
        self._cancel_timer()
        flows, self._pending = self._pending, []
        if flows or self._lost_carry or self._lost_moved():
            self._enqueue(flows)

    def _enqueue(self, flows: list[WireFlow]) -> None:
        lost = self._take_lost()
        if len(self._queue) >= self._max_queued:
            self._lost_carry += lost
            self._dropped(len(flows), "the bus is not keeping up")
            return
        self._queue.append(WireBatch(node=self._node, flows=flows, lost=lost))
        self._wake.set()
        if len(self._queue) >= self._max_queued // 2:
            self._pause()

    def _pause(self) -> None:
        if self._reading and self._paused_since is None:
            asyncio.get_running_loop().remove_reader(self._ring.fileno())
            self._paused_since = time.monotonic()

    def _resume(self) -> None:
        if self._paused_since is not None:
            self._paused_since = None
            if self._reading:
                asyncio.get_running_loop().add_reader(self._ring.fileno(), self._on_readable)

    # --- lost events ----------------------------------------------------------------------

    def _read_lost(self) -> int | None:
        try:
            value = self._lost_events()
        except Exception:
            if not self._lost_read_failed:  # once per failure streak
                _log.warning("cannot read the lost events counter", exc_info=True)
            self._lost_read_failed = True
            return None
        self._lost_read_failed = False
        return value

    def _lost_moved(self) -> bool:
        value = self._read_lost()
        return value is not None and value != self._lost_seen

    def _take_lost(self) -> int:
        lost, self._lost_carry = self._lost_carry, 0
        value = self._read_lost()
        if value is not None:
            # a smaller value means the map was recreated: all of it is new
            lost += value - self._lost_seen if value >= self._lost_seen else value
            self._lost_seen = value
        return lost

    # --- sending --------------------------------------------------------------------------

    async def _send_queued(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_all()

    async def _send_all(self) -> None:
        async with self._sending:
            while self._queue:
                await self._send(self._queue.popleft())
                if len(self._queue) <= self._max_queued // 4:
                    self._resume()

    async def _send(self, batch: WireBatch) -> None:
        try:
            await asyncio.wait_for(self._bus.publish(self._subject, batch), self._publish_timeout)
        except Exception as exc:  # any failure costs this batch, never the publisher
            self._lost_carry += batch.lost
            self._dropped(len(batch.flows), str(exc) or type(exc).__name__)
            return
        FLOWS_PUBLISHED.inc(len(batch.flows))
        FLOW_BATCHES.inc()

    def _dropped(self, count: int, why: str) -> None:
        if not count:
            return  # a batch of only a lost count: that count was carried over, not dropped
        FLOWS_DROPPED.inc(count)
        self._unlogged_drops += count
        self._drop_reason = why
        self._log_drops()

    def _log_drops(self) -> None:
        """One line per LOG_EVERY_S at most, with the flows dropped since the previous one."""
        now = time.monotonic()
        if self._unlogged_drops and now - self._last_drop_log >= LOG_EVERY_S:
            _log.warning(
                "flows dropped",
                node=self._node,
                flows=self._unlogged_drops,
                reason=self._drop_reason,
            )
            self._unlogged_drops = 0
            self._last_drop_log = now
