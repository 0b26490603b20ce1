"""Process plumbing shared by every service: guarded background tasks and signal handling."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from shared import log
from shared.errors import Unavailable

_log = log.get("runtime")

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # the ``ip netns`` convention


def enter_netns(target: str) -> None:
    """Move this whole process into a network namespace (a name under /run/netns, or a path),
    before any thread exists."""
    path = target if "/" in target else str(NETNS_DIR / target)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise Unavailable(f"cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


CANCEL_AGAIN_S = 0.2  # TaskGroup.close: how long a cancelled task has before it is cancelled again


class TaskGroup:
    """Background tasks, one per concern, none of which may vanish silently.

    A task that crashes is logged and restarted after a backoff; ``close`` cancels them all.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(
        self, name: str, factory: Callable[[], Awaitable[None]], *, restart_delay: float = 1.0
    ) -> None:
        async def guarded() -> None:
            delay = restart_delay
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _log.exception(
                        "background task crashed, restarting", task=name, restart_in=delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel every task and wait for them. A cancellation can be lost -- Python 3.11's
        ``asyncio.wait_for`` swallows it when the awaited reply lands in the same loop
        iteration (nats.py's requests wait that way), and the task then goes on, here waiting
        for its next watch event forever -- so a task still running is cancelled again."""
        while running := {task for task in self._tasks if not task.done()}:
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=CANCEL_AGAIN_S)


async def wait_for_shutdown() -> str:
    """Block until SIGTERM or SIGINT; returns the signal's name."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def periodically(interval: float, action: Callable[[], Awaitable[None]]) -> None:
    """Run ``action`` every ``interval`` seconds; an error is logged and the loop goes on."""
    while True:
        await asyncio.sleep(interval)
        try:
            await action()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("periodic task failed", action=getattr(action, "__name__", "?"))


def unblock_aiohttp() -> None:
    """Let aiohttp be imported again: the Kubernetes client (``kubernetes.aio``) runs on it.

    ``membrane/__init__`` hides it from nats.py to keep every CLI command's start-up short.
    """
    if "aiohttp" in sys.modules and sys.modules["aiohttp"] is None:
        del sys.modules["aiohttp"]
