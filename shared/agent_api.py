"""The datapath agent's local API: a unix socket for the CNI plugin and the CLI on its node.

A request is one JSON document and a newline, its reply one JSON document and a newline. The
CNI plugin and the CLI send one request per connection (:func:`call`); the DNS proxy keeps one
connection open for its ``fqdn.learn`` requests (:class:`Channel`), which the agent answers in
the order they came. A reply is either ``result`` or an ``error`` (the same ``ErrorBody`` as on
the bus), so callers re-raise the agent's error class.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from shared.errors import InvalidArgument, MembraneError, Unavailable, from_code
from shared.messages import ContainerPort, Endpoint, ErrorBody, FQDNName, Message

DEFAULT_SOCKET_DIR = Path("/run/membrane")
MAX_REQUEST_BYTES = 1 << 20
# a reply is one line too, and a dump of a full conntrack map (65,536 entries) is tens of MB:
# asyncio's default line limit (64 KiB) failed `membrane bpf ct` past a few hundred entries
MAX_REPLY_BYTES = 1 << 28
R = TypeVar("R")


def default_socket(node: str) -> Path:
    """Where the agent of ``node`` listens unless told otherwise."""
    return DEFAULT_SOCKET_DIR / node / "agent.sock"


def fqdn_socket(agent_socket: Path) -> Path:
    """The agent's second socket, beside its main one: only ``fqdn.learn``, for the node's DNS
    proxy (which needs nothing else of the agent: least privilege)."""
    return agent_socket.with_name("fqdn.sock")


# --- requests ----------------------------------------------------------------------------------


class AddEndpoint(Message):
    """Wire a pod. An empty ``netns`` makes the agent create the pod's namespace itself."""

    namespace: str
    name: str
    labels: dict[str, str] = {}
    service_account: str = "default"
    ports: list[ContainerPort] = []
    netns: str = ""
    ifname: str = "eth0"
    container_id: str = ""
    owner: str = ""


class EndpointRef(Message):
    """Names one endpoint: by namespace/name, or (for the CNI plugin) by container id."""

    namespace: str = ""
    name: str = ""
    container_id: str = ""


class EndpointList(Message):
    endpoints: list[Endpoint]


class DumpRequest(Message):
    """``table``: endpoints | ipcache | policy | ct | metrics; ``pod`` selects one policy."""

    table: str
    namespace: str = ""
    pod: str = ""


class DumpReply(Message):
    table: str
    node: str
    rows: list[dict[str, Any]]


class CNIExec(Message):
    """``cni``: a CNI invocation forwarded as it came (the compiled plugin, cni/membrane-cni.c):
    the ``CNI_*`` (and ``MEMBRANE_*``) environment and the network configuration text."""

    env: dict[str, str]
    config: str = ""


class FQDNLearn(Message):
    """``fqdn.learn`` (the node's DNS proxy, on the fqdn socket): addresses a local endpoint was
    just answered. The agent installs each in the toFQDNs peer sets of the endpoint's policy
    whose selector matches the name, with its CIDR identity in the ipcache, before it replies."""

    endpoint_ip: str
    names: list[FQDNName]


class FQDNLearnReply(Message):
    """``installed``: in every matching set of the endpoint's policy, in the maps now;
    ``pending``: not done by the fast path (the cluster-wide path will, or not); addresses no
    toFQDNs selector of the endpoint's policy matches are in neither."""

    installed: list[str] = []
    pending: list[str] = []


class CNIOutput(Message):
    """What the plugin prints on stdout, and its exit status."""

    status: int
    output: str


class Request(msgspec.Struct, kw_only=True):
    # "endpoint.add" | "endpoint.delete" | "endpoint.get" | "endpoint.list" | "dump" | "cni"
    op: str
    body: msgspec.Raw = msgspec.Raw(b"{}")


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    # msgspec cannot decode an object into ``Raw | None``: JSON null stands for "no result"
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: ErrorBody | None = None


# --- client ------------------------------------------------------------------------------------


async def call(socket: Path, op: str, body: Message, reply_type: type[R], timeout: float) -> R:
    """Send one request to the agent at ``socket``; raises the agent's error as it was."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(socket, limit=MAX_REPLY_BYTES), timeout
        )
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise Unavailable(f"no datapath agent at {socket}: {exc.strerror or exc}") from exc
    except TimeoutError as exc:
        raise Unavailable(f"the datapath agent at {socket} did not accept in time") from exc
    try:
        request = Request(op=op, body=msgspec.Raw(msgspec.json.encode(body)))
        writer.write(msgspec.json.encode(request) + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError as exc:
        raise Unavailable(f"the datapath agent at {socket} did not answer {op} in time") from exc
    finally:
        writer.close()
    if not line:
        raise Unavailable(f"the datapath agent at {socket} closed the connection during {op}")
    return _result(socket, op, line, reply_type)


def _result(socket: Path, op: str, line: bytes, reply_type: type[R]) -> R:
    reply = msgspec.json.decode(line, type=Reply)
    if reply.error is not None:
        raise from_code(reply.error.code, reply.error.message, reply.error.field)
    if bytes(reply.result) == b"null":
        raise Unavailable(f"the datapath agent at {socket} sent an empty reply to {op}")
    return msgspec.json.decode(reply.result, type=reply_type)


class Channel:
    """Requests to the agent over one connection kept open, several in flight at once: a new
    connection per request costs a connect and an accept, more turns of both event loops, on
    the path of every DNS answer that waits for ``fqdn.learn``. The agent answers a
    connection's requests in order, so replies go to requests first in, first out; a request
    that timed out keeps its place (its late reply is read and dropped). A closed connection
    fails what is in flight (``Unavailable``); the next call connects again."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[bytes]] = deque()
        self._connecting = asyncio.Lock()

    async def call(self, op: str, body: Message, reply_type: type[R], timeout: float) -> R:
        try:
            async with asyncio.timeout(timeout):
                writer = await self._connection()
                future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                request = Request(op=op, body=msgspec.Raw(msgspec.json.encode(body)))
                # no await between the two: the order of the futures is the order on the wire
                self._waiting.append(future)
                writer.write(msgspec.json.encode(request) + b"\n")
                line = await future
        except TimeoutError as exc:
            raise Unavailable(
                f"the datapath agent at {self.socket} did not answer {op} in time"
            ) from exc
        return _result(self.socket, op, line, reply_type)

    async def _connection(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None:
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        self.socket, limit=MAX_REPLY_BYTES
                    )
                except OSError as exc:
                    raise Unavailable(
                        f"no datapath agent at {self.socket}: {exc.strerror or exc}"
                    ) from exc
                self._writer = writer
                self._reader = asyncio.get_running_loop().create_task(self._read(reader, writer))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The connection's replies to the requests waiting, in order, until it closes."""
        try:
            while line := await reader.readline():
                if not self._waiting:  # a reply nobody asked for: the stream is not to be trusted
                    break
                future = self._waiting.popleft()
                if not future.done():  # else it timed out: its reply goes nowhere
                    future.set_result(line)
        except (OSError, ValueError):  # ValueError: a line over the limit
            pass
        finally:
            self._writer = None
            writer.close()
            waiting, self._waiting = self._waiting, deque()
            for future in waiting:
                if not future.done():
                    future.set_exception(
                        Unavailable(f"the datapath agent at {self.socket} closed the connection")
                    )

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


# --- server ------------------------------------------------------------------------------------

Handler = Callable[[bytes], Awaitable[Message]]


async def serve(
    socket: Path, handlers: dict[str, Handler], on_error: Callable[[str], None] | None = None
) -> asyncio.Server:
    """Listen on ``socket`` (replacing a stale one, mode 0600) and dispatch to ``handlers``;
    ``on_error`` hears the code of every error reply (to count them)."""
    # a stale socket from a killed agent would make bind fail; nothing else is listening on it
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)  # noqa: ASYNC240

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # one request after the other, each answered before the next is read (in order),
            # until the client closes
            while line := await reader.readline():
                reply = await _dispatch(handlers, line)
                if reply.error is not None and on_error is not None:
                    on_error(reply.error.code)
                writer.write(msgspec.json.encode(reply) + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(on_client, path=socket, limit=MAX_REQUEST_BYTES)
    os.chmod(socket, 0o600)
    return server


async def _dispatch(handlers: dict[str, Handler], line: bytes) -> Reply:
    try:
        request = msgspec.json.decode(line, type=Request)
        handler = handlers.get(request.op)
        if handler is None:
            raise InvalidArgument(f"unknown operation {request.op!r}", field="op")
        result = await handler(bytes(request.body))
        return Reply(result=msgspec.Raw(msgspec.json.encode(result)))
    except msgspec.ValidationError as exc:
        return Reply(error=ErrorBody(code="invalid_argument", message=f"bad request: {exc}"))
    except msgspec.DecodeError as exc:
        return Reply(error=ErrorBody(code="invalid_argument", message=f"not JSON: {exc}"))
    except MembraneError as exc:
        return Reply(error=ErrorBody(code=exc.code, message=exc.message, field=exc.field))


def decode(body: bytes, type_: type[R]) -> R:
    """Decode a request body; a wrong field becomes InvalidArgument naming it."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"bad request: {exc}") from exc
