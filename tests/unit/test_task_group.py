"""shared/runtime.py TaskGroup: background tasks restarted when they crash, all stopped on close."""

from __future__ import annotations

import asyncio
import contextlib

from shared.runtime import TaskGroup


async def test_close_stops_a_task_that_lost_its_first_cancellation() -> None:
    # Python 3.11's asyncio.wait_for swallows a cancellation that arrives as the awaited reply
    # lands (nats.py's requests); the task then goes on to wait for its next event. The policy
    # service hung on SIGTERM that way, until its supervisor's SIGKILL. close() must cancel
    # such a task again.
    started = asyncio.Event()

    async def swallows_once() -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)  # the first cancellation, lost
        await asyncio.sleep(3600)  # waits on, as a watch would

    group = TaskGroup()
    group.spawn("stubborn", swallows_once)
    await started.wait()
    await asyncio.wait_for(group.close(), 5)


async def test_a_crashed_task_is_restarted_and_close_stops_it() -> None:
    runs = 0

    async def crashes_once() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("first run fails")
        await asyncio.sleep(3600)

    group = TaskGroup()
    group.spawn("crashy", crashes_once, restart_delay=0.01)
    for _ in range(200):
        if runs == 2:
            break
        await asyncio.sleep(0.01)
    assert runs == 2
    await asyncio.wait_for(group.close(), 5)
