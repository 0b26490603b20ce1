"""Fire-and-forget batches that reached no subscriber, told apart from those that did.

Core NATS drops a message nobody is subscribed to without a word. A publisher that counts what it
loses (the agent's and the L7 proxy's flow batches: no monitor replica running, or one that
reconnected and has not subscribed again yet) gives each message a reply subject of its own,
``<inbox>.<seq>``, which no subscriber answers; nats-server does, with the "no responders"
status (503), when it delivered the message to no one. :class:`UnheardBatches` hands out those
reply subjects, remembers what each message carried, and gives it back when the 503 comes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

STATUS_HEADER: Final = "Status"
NO_RESPONDERS: Final = "503"
REMEMBERED: Final = 4096  # messages whose fate is still open; older ones were long delivered

Carried = TypeVar("Carried")


class UnheardBatches(Generic[Carried]):
    """``unheard(carried)`` is called for each message nats-server delivered to no one, with what
    :meth:`reply` was given for it; ``forgotten()`` when it was too old to be remembered."""

    def __init__(
        self, unheard: Callable[[Carried], None], forgotten: Callable[[], None] | None = None
    ) -> None:
        self._unheard = unheard
        self._forgotten = forgotten
        self._subscription: Subscription | None = None
        self._prefix = ""
        self._seq = 0
        self._open: dict[int, Carried] = {}

    @property
    def watching(self) -> bool:
        return self._subscription is not None

    async def start(self, nc: Client) -> None:
        """Subscribe to the reply subjects (once). Raises what subscribing raises; until it
        succeeds, :meth:`reply` gives no reply subject and a lost message goes unnoticed."""
        if self._subscription is not None:
            return
        prefix = nc.new_inbox()
        self._subscription = await nc.subscribe(f"{prefix}.*", cb=self._on_reply)
        self._prefix = f"{prefix}."

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    def reply(self) -> str:
        """The reply subject for the next message ("" while not watching)."""
        if self._subscription is None:
            return ""
        self._seq += 1
        return f"{self._prefix}{self._seq}"

    def sent(self, reply: str, carried: Carried) -> None:
        """The message with reply subject ``reply`` went out, carrying ``carried``."""
        if not reply:
            return
        remembered = self._open
        remembered[int(reply.rpartition(".")[2])] = carried
        if len(remembered) > REMEMBERED:
            del remembered[next(iter(remembered))]  # the oldest: long delivered

    async def _on_reply(self, msg: Msg) -> None:
        if (msg.headers or {}).get(STATUS_HEADER) != NO_RESPONDERS:
            return  # nothing else answers; a stray message changes nothing
        seq = msg.subject.rpartition(".")[2]
        carried = self._open.pop(int(seq), None) if seq.isdigit() else None
        if carried is None:
            if self._forgotten is not None:
                self._forgotten()
            return
        self._unheard(carried)
