"""The NATS bus: connect with retry, typed request/reply, micro services, JetStream KV helpers.

Every request gets exactly one reply: the result struct, or an error reply carrying the NATS
micro error headers and an :class:`~shared.messages.ErrorBody`. A payload that does not decode
is answered with ``invalid_argument`` naming the field, and counted; the service keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service
from prometheus_client import Counter, Histogram

from shared import gcpause, kv_watch, log, roles
from shared.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MembraneError,
    PermissionDenied,
    Unavailable,
)
from shared.errors import from_code as error_from_code
from shared.kv_watch import KVEvent as KVEvent  # re-exported: KV consumers import it here
from shared.messages import ErrorBody, Message
from shared.subjects import MICRO_INFO

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)
T = TypeVar("T")
Handler = Callable[[Req], Awaitable[Message]]

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
MEMBRANE_CODE_HEADER = "Membrane-Error-Code"

# NATS micro error codes are HTTP-like numbers; membrane's own code travels in its own header.
_HTTP_STATUS = {
    "invalid_argument": "400",
    "not_found": "404",
    "already_exists": "409",
    "permission_denied": "403",
    "resource_exhausted": "429",
    "unavailable": "503",
    "deadline_exceeded": "504",
    "internal": "500",
}

REQUESTS = Counter(
    "membrane_bus_requests_total",
    "Requests served, by service, endpoint and result code",
    ["service", "endpoint", "code"],
)
REQUEST_SECONDS = Histogram(
    "membrane_bus_request_duration_seconds",
    "Time to serve a request, from receipt to reply",
    ["service", "endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
MALFORMED = Counter(
    "membrane_bus_malformed_messages_total",
    "Messages that did not decode into the endpoint's payload type",
    ["service", "endpoint"],
)

_encoder = msgspec.json.Encoder()
# A role that may read a stream may create a push consumer on it, and nats-server (2.9) does not
# check the consumer's deliver subject against the creator's permissions: JetStream delivers
# with the account's rights. An agent could so write a payload into its own `nodes` key and have
# it delivered to `membrane.policy.apply`. Such a delivery always carries a JetStream reply
# subject (an ack or flow-control subject) or a status header (idle heartbeat), which no real
# request or event has: every core subscription of membrane drops it (docs/security.md).
JETSTREAM_DELIVERIES = Counter(
    "membrane_bus_jetstream_deliveries_dropped_total",
    "Messages a JetStream consumer delivered to a core subscription (a deliver-subject "
    "injection), dropped",
    ["subscription"],
)
_JETSTREAM_REPLIES = ("$JS.ACK.", "$JS.FC.")
# a connection attempt ends after this many connect timeouts (TCP, TLS, INFO, PONG: each
# bounded by nats-py, but not its clean-up after a failure), and a cancelled one is not
# waited for longer than this
ATTEMPT_TIMEOUTS = 5
CANCEL_WAIT_S = 2.0


def from_jetstream(msg: Msg) -> bool:
    """Whether a message on a core subscription was delivered by a JetStream consumer."""
    reply: str = msg.reply or ""
    return reply.startswith(_JETSTREAM_REPLIES) or "Status" in (msg.headers or {})


# the server's -ERR for what a user's permissions refuse (nats.py lowercases it)
_DENIED_RE = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')

_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")

_log = log.get("bus")
BULK_BYTES = 1 << 20  # requests this big are decoded with the cyclic collector paused
_NO_PAUSE = contextlib.nullcontext()


def _userinfo(url: str) -> str | None:
    """The ``user[:password]`` part of one URL, or None.

    Up to the last '@' of the authority, since a password may itself contain '@'.
    """
    userinfo, at, _host = urllib.parse.urlsplit(url).netloc.rpartition("@")
    return userinfo if at else None


def redact(url: str) -> str:
    """The URL(s) with passwords and tokens masked, for logs and messages; the rest as written."""
    parts = []
    for one in url.split(","):
        userinfo = _userinfo(one.strip())
        if userinfo is not None:
            user, colon, _secret = userinfo.partition(":")
            # NATS reads a lone userinfo as a token; elsewhere (redis://user@) it is a name
            is_token = not colon and one.strip().startswith(("nats:", "tls:"))
            masked = f"{user}:***" if colon else "***" if is_token else userinfo
            one = one.replace(f"{userinfo}@", f"{masked}@", 1)
        parts.append(one)
    return ",".join(parts)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, type_: type[Req]) -> Req:
    """Decode a payload; a bad one raises InvalidArgument naming the offending field."""
    try:
        return msgspec.json.decode(data or b"{}", type=type_)
    except msgspec.ValidationError as exc:
        match = _PATH_RE.search(str(exc))
        field = match.group(1) if match and match.group(1) else None
        reason = str(exc).split(" - at ")[0]
        raise InvalidArgument(f"malformed {type_.__name__}: {reason}", field=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"malformed {type_.__name__}: {exc}") from None


class ServiceInfo(msgspec.Struct, kw_only=True):
    """A replica's answer to $SRV.INFO (the NATS micro protocol's own schema)."""

    name: str
    id: str
    version: str
    description: str = ""
    metadata: dict[str, str] = {}
    endpoints: list[dict[str, object]] = []


class Bus:
    """A connection to NATS with JetStream, shared by everything in one process."""

    def __init__(
        self, nc: Client, name: str, closing: asyncio.Event | None = None, user: str = ""
    ) -> None:
        self.nc = nc
        self._closing = closing or asyncio.Event()
        self.js: JetStreamContext = nc.jetstream()
        self.name = name
        self.user = user
        self._services: list[MicroService] = []
        self._pub_heads: dict[str, bytes] = {}  # subject -> "PUB <subject> " (publish_many)
        # requests waiting for a reply, by subject (lowercased, as the server's -ERR comes):
        # a publish the server refuses gets no reply, only an -ERR; the waiting request is
        # cancelled and raises PermissionDenied at once instead of timing out
        self._requests: dict[str, set[asyncio.Task[Any]]] = {}
        self._denied: set[asyncio.Task[Any]] = set()

    def _on_denied(self, operation: str, subject: str) -> None:
        _log.error(
            "not permitted: the server refused this credential",
            user=self.user,
            operation=operation,
            subject=subject,
        )
        if operation == "publish":
            for task in self._requests.pop(subject, set()):
                self._denied.add(task)
                task.cancel()

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        retry_for: float | None = None,
        connect_timeout: float = 2.0,
    ) -> Bus:
        """Connect, retrying with backoff; ``retry_for=None`` retries until cancelled.

        Once connected, the client reconnects by itself for as long as the process lives.
        """
        closing = asyncio.Event()

        async def on_disconnect() -> None:
            if not closing.is_set():
                _log.warning("nats disconnected, reconnecting", url=redact(url))

        last_error = ""
        # the server answers a bad credential with -ERR and closes at once; when the client
        # is still writing, the kernel turns that into a reset and the -ERR is lost, so an
        # authorization failure seen on any attempt is the reason given at the end
        refused_credentials = ""
        connected = asyncio.Event()
        made: list[Bus] = []
        credentials = _credentials(url)
        attempt_failed = asyncio.Event()

        async def on_reconnect() -> None:
            _log.info("nats reconnected")
            if made:  # its KV watches make their consumers again at once: a restarted
                kv_watch.reconnected(made[0].nc)  # server has lost them

        async def on_error(exc: Exception) -> None:
            nonlocal last_error, refused_credentials
            last_error = _describe(exc)
            if "authorization" in last_error.lower():
                refused_credentials = last_error
            if not connected.is_set():
                attempt_failed.set()
            if (denied := _DENIED_RE.search(last_error.lower())) and made:
                made[0]._on_denied(denied[1], denied[2])
            elif connected.is_set():  # before that, the connect loop below reports it
                _log.warning("nats error", error=_describe(exc))

        deadline = None if retry_for is None else time.monotonic() + retry_for
        delay = 0.2
        while True:
            attempt_failed.clear()
            try:
                # nats-py may never return from a connect that failed: a TLS handshake it could
                # not verify (a plain URL to a TLS-only server), or one that timed out (a
                # process starved of CPU for the server's 2 s): its clean-up then waits for the
                # TLS transport to close, which it never does. So the first error the callback
                # hears ends the attempt (this loop retries), and an attempt is bounded anyway
                nc = await _unless(
                    attempt_failed,
                    nats.connect(
                        **credentials,
                        name=name,
                        connect_timeout=connect_timeout,
                        allow_reconnect=True,
                        # nats-py retries a failed *first* connect forever when this is -1, so
                        # this loop owns that (with its deadline); once connected, the client
                        # reconnects on its own without limit
                        max_reconnect_attempts=1,
                        reconnect_time_wait=1.0,
                        error_cb=on_error,
                        disconnected_cb=on_disconnect,
                        reconnected_cb=on_reconnect,
                    ),
                    ATTEMPT_TIMEOUTS * connect_timeout,
                )
                nc.options["max_reconnect_attempts"] = -1
                made.append(cls(nc, name, closing, str(credentials.get("user", ""))))
                connected.set()
                return made[0]
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                # nats-py reports the real cause (refused, authorization) to the error callback
                # and then raises a generic "no servers" error
                reason, last_error = refused_credentials or last_error or _describe(exc), ""
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"cannot reach NATS at {redact(url)}: {reason}"
                        " (is the cluster up? try `membrane up`)"
                    ) from None
                _log.warning(
                    "nats unreachable, retrying",
                    url=redact(url),
                    reason=reason,
                    retry_in=round(delay, 1),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def flush(self) -> None:
        """Return once the server has processed everything this connection sent so far."""
        await flush_connection(self.nc)

    async def close(self) -> None:
        """Stop every micro service (waiting for in-flight requests), then drain."""
        self._closing.set()
        for service in self._services:
            await service.stop()
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (TimeoutError, nats.errors.Error):
                await self.nc.close()

    async def subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]], **options: Any
    ) -> Subscription:
        """A core subscription (``nats.aio.Client.subscribe``'s options) that never hands
        ``cb`` a message a JetStream consumer delivered (see ``from_jetstream``)."""
        dropped = JETSTREAM_DELIVERIES.labels(subject)

        async def guarded(msg: Msg) -> None:
            if from_jetstream(msg):
                dropped.inc()
                return
            await cb(msg)

        return await self.nc.subscribe(subject, cb=guarded, **options)

    # --- publish and request/reply --------------------------------------------------------

    async def publish(self, subject: str, payload: Message) -> None:
        """Fire-and-forget; while disconnected, nats.py buffers (bounded) and then raises."""
        try:
            await self.nc.publish(subject, encode(payload))
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise Unavailable(f"cannot publish on {subject}: {exc}") from None

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Fire-and-forget ``(subject, payload)`` messages, in order, as one write.

        For the monitor's republish: nats.py's publish costs about 3 us a message (checks,
        command building, a flush check), a third of the budget of a flow at 150,000 flows/s.
        Here the PUB commands are built in one pass and handed to the client's pending buffer
        at once, as nats.py's own publish does one at a time (its ``_send_command``). While
        disconnected, or with a client without that method, it publishes one by one so that
        nats.py's buffering rules apply. Subjects are the caller's own (no validation).
        """
        nc = self.nc
        send = getattr(nc, "_send_command", None)
        flush_queue = getattr(nc, "_flush_queue", None)
        if send is None or flush_queue is None or not nc.is_connected:
            for subject, payload in messages:
                try:
                    await nc.publish(subject, payload)
                except (
                    nats.errors.ConnectionClosedError,
                    nats.errors.OutboundBufferLimitError,
                ) as exc:
                    raise Unavailable(f"cannot publish on {subject}: {exc}") from None
            return
        heads = self._pub_heads
        if len(heads) > 4096:
            heads.clear()
        parts: list[bytes] = []
        size = 0
        limit = nc.max_payload
        for subject, payload in messages:
            head = heads.get(subject)
            if head is None:
                head = heads[subject] = b"PUB " + subject.encode() + b" "
            if len(payload) > limit:
                raise nats.errors.MaxPayloadError
            # the payload as it is, not copied into a PUB command of its own first: a monitor
            # batch is megabytes
            parts += (b"%b%d\r\n" % (head, len(payload)), payload, b"\r\n")
            size += len(payload)
        if not parts:
            return
        nc.stats["out_msgs"] += len(parts) // 3
        nc.stats["out_bytes"] += size
        await send(b"".join(parts))
        if flush_queue.empty():  # as nats.py's publish: wake its flusher
            await nc._flush_pending()

    async def request(
        self, subject: str, payload: Message, reply_type: type[Res], *, timeout: float = 5.0
    ) -> Res:
        """Send a typed request; return the typed result or raise the typed error."""
        task = asyncio.current_task()
        assert task is not None
        key = subject.lower()
        waiting = self._requests.setdefault(key, set())
        waiting.add(task)
        try:
            msg = await self.nc.request(subject, encode(payload), timeout=timeout)
        except asyncio.CancelledError:
            if task not in self._denied:
                raise
            self._denied.discard(task)
            task.uncancel()
            raise PermissionDenied(
                f"not permitted: the NATS user {self.user or '(anonymous)'!r} may not send "
                f"{subject} (its role does not allow it; roles: docs/security.md)"
            ) from None
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no service is answering on {subject}") from None
        except nats.errors.TimeoutError:
            raise DeadlineExceeded(f"no reply on {subject} within {timeout:g}s") from None
        except nats.errors.ConnectionClosedError:
            raise Unavailable("the NATS connection is closed") from None
        finally:
            waiting.discard(task)
            if not waiting and self._requests.get(key) is waiting:
                del self._requests[key]
        headers = msg.headers or {}
        if ERROR_HEADER in headers:
            try:
                body = msgspec.json.decode(msg.data, type=ErrorBody)
            except (msgspec.DecodeError, msgspec.ValidationError):
                body = ErrorBody(
                    code=headers.get(MEMBRANE_CODE_HEADER, "internal"),
                    message=headers[ERROR_HEADER],
                )
            raise error_from_code(body.code, body.message, body.field)
        try:
            return msgspec.json.decode(msg.data, type=reply_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Internal(
                f"reply on {subject} did not decode as {reply_type.__name__}: {exc}"
            ) from None

    # --- micro services -------------------------------------------------------------------

    async def add_service(
        self,
        name: str,
        version: str,
        description: str,
        metadata: dict[str, str] | None = None,
        *,
        queue_group: str = "",
        concurrency: int = 64,
    ) -> MicroService:
        """Register a NATS micro service, so every replica answers $SRV.PING/INFO/STATS.

        ``queue_group`` and ``concurrency`` are what its endpoints use unless they say otherwise.
        """
        service = await add_service(
            self.nc,
            name=name,
            version=version,
            description=description,
            metadata=metadata or {},
        )
        micro = MicroService(service, name, queue_group=queue_group, concurrency=concurrency)
        self._services.append(micro)
        return micro

    async def discover(self, service: str = "", timeout: float = 0.5) -> list[ServiceInfo]:
        """Every replica of ``service`` (all services if empty) answering $SRV.INFO in time."""
        subject = f"{MICRO_INFO}.{service}" if service else MICRO_INFO
        inbox = self.nc.new_inbox()
        found: list[ServiceInfo] = []
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subject, b"", reply=inbox)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except nats.errors.TimeoutError:
                    break
                if not msg.data:  # the server's "no responders" status: nobody is up yet
                    continue
                try:
                    found.append(msgspec.json.decode(msg.data, type=ServiceInfo))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    _log.warning("undecodable $SRV.INFO reply", data=msg.data[:200])
        finally:
            await sub.unsubscribe()
        return sorted(found, key=lambda info: (info.name, info.metadata.get("replica", info.id)))

    # --- JetStream KV ---------------------------------------------------------------------

    async def kv(
        self,
        bucket: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        description: str = "",
        replicas: int = 1,
    ) -> KeyValue:
        """Bind to a KV bucket, creating it first if it does not exist (idempotent).

        ``replicas`` > 1 keeps copies on that many servers of a NATS cluster, so that losing
        one server loses no bucket; it applies when the bucket is created.
        """
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await self.js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=history,
                    ttl=ttl,
                    description=description,
                    replicas=replicas,
                )
            )
        except nats.js.errors.BadRequestError:
            # another process created it between our two calls
            return await self.js.key_value(bucket)

    @staticmethod
    async def snapshot(kv: KeyValue, keys: str = ">") -> dict[str, bytes]:
        """The current value of every key (deleted keys left out), read once."""
        found: dict[str, bytes] = {}
        async with contextlib.aclosing(Bus.watch(kv, keys)) as events:
            async for event in events:
                if event is None:
                    break
                if event.value is None:
                    found.pop(event.key, None)
                else:
                    found[event.key] = event.value
        return found

    @staticmethod
    def watch(kv: KeyValue, keys: str = ">") -> AsyncGenerator[KVEvent | None, None]:
        """Yield the current value of every key, then ``None`` once caught up, then changes
        (see shared/kv_watch.py). Close it (``contextlib.aclosing``) when done."""
        return kv_watch.watch(kv, keys)


async def flush_connection(nc: Client) -> None:
    """Return once the server has processed everything ``nc`` sent so far.

    nats.py's ``flush`` writes its PING straight to the socket while earlier commands (a SUB, a
    PUB) may still wait in its buffer for the flusher task, so under load the PONG came back
    before the server had seen them: a subscription said to be in place missed the first
    messages ("no responders", a queue group member left out). The buffer goes out first here.
    """
    await nc._flush_pending(force_flush=True)
    await nc.flush()


async def send_pending(nc: Client) -> None:
    """Return once what ``nc`` holds in its buffer is written to its socket: without waiting
    for the flusher task's turn, nor for the server's answer (as :func:`flush_connection`)."""
    await nc._flush_pending(force_flush=True)  # waits for the flusher's write


class MicroService:
    """A NATS micro service whose endpoints decode, dispatch, reply and count."""

    def __init__(
        self, service: Service, name: str, *, queue_group: str = "", concurrency: int = 64
    ) -> None:
        self._service = service
        self.name = name
        self.queue_group = queue_group
        self.concurrency = concurrency
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def id(self) -> str:
        return self._service.id

    async def endpoint(
        self,
        name: str,
        subject: str,
        request_type: type[Req],
        handler: Callable[[Req], Awaitable[Message]],
        *,
        queue_group: str = "",
        concurrency: int = 0,
        subject_names: Callable[[Req], str] | None = None,
    ) -> None:
        """Serve ``subject``; up to ``concurrency`` requests run at once per replica (the
        service's queue group and concurrency unless given).

        ``subject_names``: ``subject`` ends in ``*``, a token the bus's permissions give one
        requester (a node's agent may publish only under its own node's token), and the
        request's own claim (``subject_names(request)``, e.g. its node) must be that token;
        otherwise it is refused (permission denied), whatever the body says.

        The NATS client delivers a subscription's messages one at a time, so each request is
        handed to its own task; the semaphore bounds them and pushes back on the subscription.
        """
        queue_group = queue_group or self.queue_group
        if not queue_group:
            raise ValueError(f"endpoint {name} of {self.name} has no queue group")
        slots = asyncio.Semaphore(concurrency or self.concurrency)
        # the metric children of this endpoint, looked up once instead of per request
        seconds = REQUEST_SECONDS.labels(self.name, name)
        malformed = MALFORMED.labels(self.name, name)

        async def serve(request: Request) -> None:
            started = time.perf_counter()
            code = "ok"
            try:
                try:
                    # a bulk request (megabytes of documents) decodes into a million objects
                    # that all stay: the collector would only traverse them (half the time)
                    with gcpause.paused() if len(request.data) >= BULK_BYTES else _NO_PAUSE:
                        payload = decode(request.data, request_type)
                except InvalidArgument as exc:
                    malformed.inc()
                    _log.warning("malformed request", endpoint=name, error=str(exc))
                    raise
                if subject_names is not None:
                    _check_subject_names(request.subject, subject_names(payload))
                result = await handler(payload)
                await request.respond(encode(result))
            except MembraneError as exc:
                code = exc.code
                await _respond_error(request, exc)
            except Exception as exc:  # a bug: answer, log, keep serving
                code = "internal"
                _log.exception("request failed", endpoint=name)
                await _respond_error(request, Internal(f"{type(exc).__name__}: {exc}"))
            finally:
                slots.release()
                REQUESTS.labels(self.name, name, code).inc()
                seconds.observe(time.perf_counter() - started)

        dropped = JETSTREAM_DELIVERIES.labels(subject)

        async def dispatch(request: Request) -> None:
            if from_jetstream(request._msg):
                dropped.inc()  # no reply: the reply subject is JetStream's, not a requester's
                return
            await slots.acquire()
            task = asyncio.create_task(serve(request))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        await self._service.add_endpoint(
            EndpointConfig(name=name, subject=subject, handler=dispatch, queue_group=queue_group)
        )
        # served from the moment this returns: callers announce readiness after it
        await flush_connection(self._service._client)

    async def stop(self) -> None:
        """Stop taking requests and wait for the ones in flight (graceful drain)."""
        await self._service.stop()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=10)


def _check_subject_names(subject: str, claimed: str) -> None:
    """The request's claim is its subject's last token (see ``MicroService.endpoint``)."""
    token = subject.rsplit(".", 1)[-1]
    if token != claimed:
        raise PermissionDenied(
            f"the request names {claimed!r} but was sent on {subject!r}: a requester may speak "
            "only for the name in its own subject"
        )


async def _respond_error(request: Request, exc: MembraneError) -> None:
    body = ErrorBody(code=exc.code, message=exc.message, field=exc.field)
    try:
        await request.respond_error(
            _HTTP_STATUS.get(exc.code, "500"),
            str(exc),
            data=encode(body),
            headers={MEMBRANE_CODE_HEADER: exc.code},
        )
    except (nats.errors.Error, ValueError) as send_exc:
        _log.warning("could not send error reply", error=str(send_exc))


def _credentials(url: str) -> dict[str, Any]:
    """Servers without userinfo, and the credentials as options of their own.

    nats-py applies userinfo only to the URL it came with; servers learned from the cluster
    (and reconnects to them) would go without. As options, they apply to every server.
    ``?ca=PATH`` (the local cluster's ``tls://`` URLs, membrane/servers.py) is the CA the server
    is verified with; a ``tls://`` URL without it verifies against the system's CAs.
    """
    servers: list[str] = []
    options: dict[str, Any] = {}
    for one in (u.strip() for u in url.split(",") if u.strip()):
        one, _, query = one.partition("?")
        if ca := urllib.parse.parse_qs(query).get("ca"):
            options["tls"] = ssl.create_default_context(cafile=ca[0])
        userinfo = _userinfo(one)
        if userinfo is not None:
            user, colon, password = userinfo.partition(":")
            if colon:
                user = urllib.parse.unquote(user)
                options.update(
                    user=user,
                    password=urllib.parse.unquote(password),
                    # replies to this user arrive under a prefix of its own, the only inbox
                    # its role may subscribe to (shared/roles.py)
                    **(
                        {"inbox_prefix": roles.inbox_prefix(user)}
                        if roles.USER_RE.match(user)
                        else {}
                    ),
                )
            else:
                options["token"] = urllib.parse.unquote(user)
            one = one.replace(f"{userinfo}@", "", 1)
        servers.append(one)
    return {"servers": servers, **options}


async def _unless(event: asyncio.Event, work: Awaitable[Client], timeout: float) -> Client:
    """``work``'s connection, or TimeoutError as soon as ``event`` is set or after ``timeout``
    (``work`` cancelled, and not waited for longer than ``CANCEL_WAIT_S``: a cancellation that
    nats-py swallows or a clean-up that never ends must not hold the caller)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
        # connected after all (the cancellation was lost): that connection goes
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().close()
        raise TimeoutError("the connection attempt failed")
    return task.result()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, nats.errors.NoServersError):
        return "no server answered (connection refused or timed out)"
    return str(exc) or type(exc).__name__


__all__ = ["Bus", "KVEvent", "MicroService", "ServiceInfo", "decode", "encode", "redact"]
