"""List → synced → watch, with client-go's reflector semantics, for one resource.

- The first list is applied completely before the reflector reports ``synced``.
- Watches start at the last resourceVersion seen (from the list, an event or a bookmark), ask
  for bookmarks, and carry a bounded ``timeoutSeconds`` drawn between the minimum and twice it
  (as client-go, so that a fleet of watchers does not reconnect in step).
- A watch that ends (timeout) is started again from the last version, at once.
- A dropped connection, or an API server that does not answer, keeps everything known and
  watches again from the last version after a backoff: nothing is deleted because the server
  is away.
- ``410 Gone`` (as a Status or an ``ERROR`` event) means the version was compacted away: list
  again, apply what changed and delete what vanished while the watch was away.
- 429 and 5xx back off (Retry-After when the server gives one), exponentially up to a ceiling,
  with jitter.
- An object the handler refuses is the handler's to report; it never stops the watch. A handler
  that fails for a reason that may pass (the bus away) gets the object again later.

The handler sees each object at most once per resourceVersion: a relist applies only the
objects whose version changed, so a resync costs what changed, not the size of the cluster.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from services.k8s.kubeclient import ApiError, ConnectionLost, Kind, KubeClient
from shared import log
from shared.errors import MembraneError

Obj = dict[str, Any]

EVENTS = Counter(
    "membrane_k8s_watch_events_total", "Watch events received, by kind and type", ["kind", "type"]
)
RESTARTS = Counter(
    "membrane_k8s_watch_restarts_total",
    "Lists and watches started again, by kind and cause",
    ["kind", "cause"],
)
HANDLER_ERRORS = Counter(
    "membrane_k8s_handler_errors_total",
    "Objects the bridge could not pass on, by kind and whether it retries",
    ["kind", "retrying"],
)
OBJECTS = Gauge("membrane_k8s_objects", "Objects known from the API server, by kind", ["kind"])


class Handler(Protocol):
    async def upsert(self, kind: Kind, obj: Obj) -> None: ...

    async def delete(self, kind: Kind, obj: Obj) -> None: ...


class Gone(Exception):
    """410: the resourceVersion was compacted away; list again."""


@dataclass
class Backoff:
    """Exponential with jitter, as client-go's (0.8 s doubling to 30 s)."""

    initial: float = 0.8
    ceiling: float = 30.0
    current: float = 0.0

    def next(self, hint: float | None = None) -> float:
        self.current = min(self.ceiling, self.current * 2 if self.current else self.initial)
        delay = self.current * (1 + random.random() * 0.2)
        return max(delay, hint or 0.0)

    def reset(self) -> None:
        self.current = 0.0


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or ""
    return f"{namespace}/{meta.get('name', '')}" if namespace else str(meta.get("name", ""))


def resource_version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Reflector:
    def __init__(
        self,
        kube: KubeClient,
        kind: Kind,
        handler: Handler,
        *,
        min_watch_timeout: int = 300,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.handler = handler
        self.min_watch_timeout = min_watch_timeout
        self.backoff = backoff or Backoff()
        self.sleep = sleep
        self.known: dict[str, Obj] = {}
        self.last_rv = ""
        self.synced = asyncio.Event()
        self.pending: dict[str, tuple[str, Obj]] = {}  # (upsert|delete, object) to retry
        self.log = log.get("k8s", kind=kind.kind)

    async def run(self) -> None:
        relist = True
        while True:
            try:
                if relist:
                    await self.list_and_replace()
                    relist = False
                    self.synced.set()
                await self.watch_once()
                self.backoff.reset()
                RESTARTS.labels(self.kind.kind, "timeout").inc()
            except Gone:
                relist = True
                RESTARTS.labels(self.kind.kind, "gone").inc()
                self.log.info("resource version too old, listing again", since=self.last_rv)
            except ApiError as exc:
                RESTARTS.labels(self.kind.kind, str(exc.status)).inc()
                delay = self.backoff.next(exc.retry_after)
                self.log.warning("API error, backing off", error=str(exc), retry_in=delay)
                await self.sleep(delay)
            except ConnectionLost as exc:
                RESTARTS.labels(self.kind.kind, "connection").inc()
                delay = self.backoff.next()
                self.log.warning("API server unreachable, keeping state", error=str(exc))
                await self.sleep(delay)

    async def list_and_replace(self) -> None:
        items, rv = await self.kube.list(self.kind)
        fresh = {object_key(item): item for item in items}
        for key, item in fresh.items():
            old = self.known.get(key)
            if old is None or resource_version(old) != resource_version(item):
                await self._upsert(key, item)
        for key in [k for k in self.known if k not in fresh]:
            await self._delete(key, self.known[key])
        self.last_rv = rv
        self.log.info("listed", objects=len(fresh), resource_version=rv)

    async def watch_once(self) -> None:
        timeout = random.randint(self.min_watch_timeout, 2 * self.min_watch_timeout)
        async for event in self.kube.watch(self.kind, self.last_rv, timeout):
            EVENTS.labels(self.kind.kind, event.type).inc()
            if event.type == "ERROR":
                status = event.object
                code = int(status.get("code") or 0)
                if code == 410:
                    raise Gone()
                raise ApiError(
                    code, str(status.get("reason", "")), str(status.get("message", "")), None
                )
            rv = resource_version(event.object)
            if event.type == "BOOKMARK":
                self.last_rv = rv or self.last_rv
                continue
            key = object_key(event.object)
            if event.type == "DELETED":
                if key in self.known:
                    await self._delete(key, event.object)
            else:
                await self._upsert(key, event.object)
            self.last_rv = rv or self.last_rv

    async def _upsert(self, key: str, obj: Obj) -> None:
        self.known[key] = obj
        OBJECTS.labels(self.kind.kind).set(len(self.known))
        await self._hand_over(key, "upsert", obj)

    async def _delete(self, key: str, obj: Obj) -> None:
        self.known.pop(key, None)
        OBJECTS.labels(self.kind.kind).set(len(self.known))
        await self._hand_over(key, "delete", obj)

    async def _hand_over(self, key: str, op: str, obj: Obj) -> None:
        self.pending.pop(key, None)  # the newest state of a key replaces a failed older one
        try:
            if op == "upsert":
                await self.handler.upsert(self.kind, obj)
            else:
                await self.handler.delete(self.kind, obj)
        except (MembraneError, TimeoutError) as exc:
            retrying = not isinstance(exc, MembraneError) or exc.retryable
            HANDLER_ERRORS.labels(self.kind.kind, str(retrying).lower()).inc()
            if retrying:
                self.pending[key] = (op, obj)
            self.log.warning("not passed on", object=key, error=str(exc), retrying=retrying)
        except Exception:  # a bug in the handler must not stop the watch of every object
            HANDLER_ERRORS.labels(self.kind.kind, "false").inc()
            self.log.exception("handler failed", object=key)

    async def retry_pending(self) -> None:
        """Hand over again what failed for a reason that may have passed (the bus away)."""
        for key, (op, obj) in list(self.pending.items()):
            await self._hand_over(key, op, obj)
