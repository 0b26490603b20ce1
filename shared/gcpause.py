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
    global _depth, _was_enabled
    if _depth == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            # what the bulk built stays out of later collections: otherwise the first one after
            # the pause traverses all of it at once, a stall of tens of milliseconds in a
            # service (objects still go by reference counting when they are dropped)
            gc.freeze()
            if _was_enabled:
                gc.enable()
