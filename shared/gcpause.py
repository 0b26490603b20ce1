"""The cyclic garbage collector paused while a bulk of objects is built.

Building tens of thousands of documents or records allocates millions of container objects
that all stay alive; the collector, triggered by allocation counts, traverses them again and
again for nothing (they hold no reference cycles): that was more than half of reading 20,000
Services. Reference counting still frees everything as usual while paused. Nested and
concurrent pauses (coroutines of one process) keep the collector off until the last ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    hold()
    try:
        yield
    finally:
        release()


def hold() -> None:
    """Pause the collector until the matching :func:`release` (a pause that spans turns of
    the event loop: a burst of messages handled over several)."""
    global _depth, _was_enabled
    if _depth == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _depth += 1


def release(*, freeze: bool = True) -> None:
    """End a :func:`hold`. ``freeze``: what was built meanwhile stays out of later
    collections (otherwise the first one after the pause traverses all of it at once, a stall
    of tens of milliseconds in a service; objects still go by reference counting when they
    are dropped), as :func:`paused` does; without, a cycle made meanwhile can still be
    collected, for the price of that one traversal."""
    global _depth
    _depth -= 1
    if _depth == 0:
        if freeze:
            gc.freeze()
        if _was_enabled:
            gc.enable()


# Collections start after this many net allocations of container objects (CPython's default
# is 700). A service decodes a message into a few dozen objects and drops them; at 700, a burst
# of tens of thousands of KV entries ran a young collection every few dozen messages, and each
# promoted survivors that older collections then traversed again: about a fifth of an agent's
# CPU while 20,000 services arrived. Memory held by cycles waits a little longer; nothing else.
SERVICE_THRESHOLDS = (10_000, 20, 100)


def tune_for_service() -> None:
    """Set a long-running service's collector up, once its modules are imported.

    Everything imported so far (modules, classes, compiled BPF programs' metadata) lives as
    long as the process: freezing it keeps it out of every later full collection.
    """
    gc.freeze()
    gc.set_threshold(*SERVICE_THRESHOLDS)
