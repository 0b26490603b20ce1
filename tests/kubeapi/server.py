"""A fake Kubernetes API server, faithful where list/watch clients depend on it.

No API server can be installed from the package registries here, so the bridge's tests talk to
this one through the official client and a kubeconfig. What it reproduces, because reflectors
depend on it:

- one integer resourceVersion counter for every object (etcd's revision), as a string on the
  wire; lists carry the counter at the time of the list;
- an event log with a compaction horizon: a watch from a resourceVersion older than the horizon
  gets ``200`` then an ``ERROR`` event with a 410 Status (what the watch cache sends); a list
  with ``resourceVersionMatch=Exact`` that old gets a 410 Status; ``expire_watches`` sends the
  410 ``ERROR`` in the middle of open streams;
- a watch without a resourceVersion (or "0") starts with synthetic ``ADDED`` events for the
  current state; with one, it replays the log after it;
- ``BOOKMARK`` events only when ``allowWatchBookmarks`` is set, carrying a resourceVersion that
  every event the watcher was sent is at or below; one just before a timeout closes the stream;
- ``timeoutSeconds`` closes the stream (capped by ``max_watch_seconds``, for very short watches);
- label selectors (equality and set-based), and only the field selectors the real server
  allows: ``metadata.name``/``metadata.namespace`` everywhere, ``spec.nodeName`` (and a few
  more) for pods; anything else is 400; an object that stops matching a watch's selector is
  sent as ``DELETED``, one that starts matching as ``ADDED``;
- 409 for a create of an existing object and for a write with a stale resourceVersion;
- discovery (``/api``, ``/apis``, ``/apis/cilium.io/v2``...);
- fault hooks: ``fail`` (429 with Retry-After, 500...), ``drop_watches`` (connections cut
  without a word), ``max_watch_seconds``;
- a request log of (verb, group, resource) for the RBAC check, and bearer-token authentication.

It runs in its own thread with its own event loop, so that synchronous test code and fixtures of
any scope can drive it; every public method is thread-safe.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.kubeapi.selectors import FieldMatcher, Requirement, SelectorError, parse_fields
from tests.kubeapi.selectors import parse_labels as parse_label_selector

Obj = dict[str, Any]

_COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    custom: bool = False  # a CRD: lists carry apiVersion/kind on items; name/namespace fields only
    fields: frozenset[str] = _COMMON_FIELDS
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "namespaces", "Namespace", False, short_names=("ns",)),
    Resource(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        fields=_COMMON_FIELDS
        | {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        },
        short_names=("po",),
    ),
    Resource(
        "",
        "v1",
        "services",
        "Service",
        True,
        fields=_COMMON_FIELDS | {"spec.clusterIP", "spec.type"},
        short_names=("svc",),
    ),
    Resource("", "v1", "nodes", "Node", False, fields=_COMMON_FIELDS | {"spec.unschedulable"}),
    Resource(
        "",
        "v1",
        "events",
        "Event",
        True,
        fields=_COMMON_FIELDS
        | {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "reason",
            "type",
        },
    ),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    Resource(
        "cilium.io",
        "v2",
        "ciliumnetworkpolicies",
        "CiliumNetworkPolicy",
        True,
        custom=True,
        short_names=("cnp",),
    ),
    Resource(
        "cilium.io",
        "v2",
        "ciliumclusterwidenetworkpolicies",
        "CiliumClusterwideNetworkPolicy",
        False,
        custom=True,
        short_names=("ccnp",),
    ),
)
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code: int, reason: str, message: str, details: Mapping[str, Any]) -> Obj:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


@dataclass(frozen=True)
class Event:
    rv: int
    resource: Resource
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    old: Obj | None  # before a MODIFIED, so selector watches see objects enter and leave


@dataclass(frozen=True)
class LoggedRequest:
    verb: str  # get | list | watch | create | update | patch | delete
    group: str
    resource: str  # plural, with "/subresource" when one was addressed
    namespace: str
    name: str
    resource_version: str = ""  # what a list or watch asked for


@dataclass
class Fault:
    status: int
    resource: str | None
    verb: str | None
    times: int
    retry_after: int | None


@dataclass(eq=False)  # compared and hashed by identity: a set of open watches
class _Watcher:
    resource: Resource
    namespace: str
    labels: list[Requirement]
    fields: FieldMatcher
    queue: asyncio.Queue[Obj | None]
    bookmarks: bool
    transport: Any = None

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return all(r.matches(labels) for r in self.labels) and self.fields(obj)

    def translate(self, event: Event) -> str | None:
        """The event type this watcher sees, if any (selector entries and exits)."""
        now = self.matches(event.obj)
        if event.type == "MODIFIED":
            before = self.matches(event.old)
            if before and now:
                return "MODIFIED"
            if now:
                return "ADDED"
            return "DELETED" if before else None
        return event.type if now else None


@dataclass
class Store:
    rv: int = 1
    horizon: int = 0  # events at or below it are compacted away
    objects: dict[tuple[str, str, str], dict[tuple[str, str], Obj]] = field(default_factory=dict)
    log: list[Event] = field(default_factory=list)


class FakeKubeAPI:
    """The server; ``start`` it, point a kubeconfig at ``url``, drive it with the methods."""

    def __init__(self, token: str = "test-token", bookmark_interval: float = 1.0) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds: float | None = None
        self.default_watch_seconds = 1800.0
        self.requests: list[LoggedRequest] = []
        self._faults: list[Fault] = []
        self._store = Store()
        self._lock = threading.RLock()
        self._watchers: set[_Watcher] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopped: asyncio.Event | None = None
        self.port = 0

    # --- life cycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKubeAPI:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._serve(ready))
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-kube-api", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake API server did not start")
        return self

    async def _serve(self, ready: threading.Event) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._stopped = asyncio.Event()
        ready.set()
        await self._stopped.wait()
        self._close_watchers()
        await self._runner.cleanup()

    def stop(self) -> None:
        """Stop serving; ``start`` again serves the same store on the same port (a restart)."""
        if self._loop is None or self._stopped is None:
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "bridge", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "bridge"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # --- fault hooks ------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        *,
        resource: str | None = None,
        verb: str | None = None,
        times: int = 1,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (429 with Retry-After)."""
        with self._lock:
            self._faults.append(Fault(status, resource, verb, times, retry_after))

    def drop_watches(self) -> int:
        """Cut every open watch connection without a word, as a lost load balancer does."""
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            if watcher.transport is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(watcher.transport.abort)
        return len(watchers)

    def expire_watches(self) -> int:
        """Send every open watch a mid-stream ``ERROR`` 410 and close it."""
        with self._lock:
            watchers = list(self._watchers)
            for watcher in watchers:
                self._send(watcher, _error_event(410, "Expired", "too old resource version"))
                self._send(watcher, None)
        return len(watchers)

    def compact(self, up_to: int | None = None) -> int:
        """Forget the event log up to ``up_to`` (default: everything so far); the horizon."""
        with self._lock:
            horizon = self._store.rv if up_to is None else up_to
            self._store.horizon = max(self._store.horizon, horizon)
            self._store.log = [e for e in self._store.log if e.rv > self._store.horizon]
            return self._store.horizon

    def open_watches(self, plural: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watchers if plural in (None, w.resource.plural))

    # --- the store, for tests ---------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._store.rv

    def resource(self, plural: str) -> Resource:
        for r in RESOURCES:
            if r.plural == plural:
                return r
        raise KeyError(plural)

    def create(self, obj: Obj) -> Obj:
        resource = self._resource_of(obj)
        namespace = obj["metadata"].get("namespace", "default") if resource.namespaced else ""
        return copy.deepcopy(self._create(resource, namespace, copy.deepcopy(obj)))

    def apply(self, obj: Obj) -> Obj:
        """Create or replace (ignoring the resourceVersion), as ``kubectl apply`` ends up."""
        resource = self._resource_of(obj)
        namespace = obj["metadata"].get("namespace", "default") if resource.namespaced else ""
        body = copy.deepcopy(obj)
        body["metadata"].pop("resourceVersion", None)
        with self._lock:
            if self.get(resource.plural, namespace, obj["metadata"]["name"]) is None:
                return copy.deepcopy(self._create(resource, namespace, body))
            return copy.deepcopy(self._replace(resource, namespace, body["metadata"]["name"], body))

    def delete(self, plural: str, namespace: str, name: str) -> None:
        resource = self.resource(plural)
        self._delete(resource, namespace if resource.namespaced else "", name)

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        resource = self.resource(plural)
        with self._lock:
            bucket = self._store.objects.get(_bucket_key(resource), {})
            found = bucket.get((namespace if resource.namespaced else "", name))
            return copy.deepcopy(found) if found is not None else None

    def items(self, plural: str) -> list[Obj]:
        resource = self.resource(plural)
        with self._lock:
            bucket = self._store.objects.get(_bucket_key(resource), {})
            return [copy.deepcopy(o) for _, o in sorted(bucket.items())]

    def _resource_of(self, obj: Obj) -> Resource:
        for r in RESOURCES:
            if r.kind == obj.get("kind") and r.api_version == obj.get("apiVersion"):
                return r
        raise KeyError(f"{obj.get('apiVersion')}/{obj.get('kind')}")

    # --- store operations (under the lock) ---------------------------------------------------

    def _bump(self) -> int:
        self._store.rv += 1
        return self._store.rv

    def _record(self, resource: Resource, type_: str, obj: Obj, old: Obj | None) -> None:
        event = Event(int(obj["metadata"]["resourceVersion"]), resource, type_, obj, old)
        self._store.log.append(event)
        for watcher in list(self._watchers):
            if watcher.resource == resource:
                seen = watcher.translate(event)
                if seen is not None:
                    self._send(watcher, _watch_event(seen, event.obj, resource))

    def _create(self, resource: Resource, namespace: str, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        with self._lock:
            bucket = self._store.objects.setdefault(_bucket_key(resource), {})
            if (namespace, name) in bucket:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f"{resource.plural}{'.' + resource.group if resource.group else ''} "
                    f'"{name}" already exists',
                    name=name,
                    group=resource.group,
                    kind=resource.plural,
                )
            if resource.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if resource.plural == "namespaces":
                labels = meta.setdefault("labels", {})
                labels["kubernetes.io/metadata.name"] = name
            obj["apiVersion"] = resource.api_version
            obj["kind"] = resource.kind
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            meta["generation"] = 1
            meta["resourceVersion"] = str(self._bump())
            bucket[(namespace, name)] = obj
            self._record(resource, "ADDED", obj, None)
            return obj

    def _replace(
        self, resource: Resource, namespace: str, name: str, obj: Obj, subresource: str = ""
    ) -> Obj:
        with self._lock:
            bucket = self._store.objects.setdefault(_bucket_key(resource), {})
            current = bucket.get((namespace, name))
            if current is None:
                raise _not_found(resource, name)
            meta = obj.setdefault("metadata", {})
            wanted = meta.get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {resource.plural} "{name}": the object '
                    "has been modified; please apply your changes to the latest version and "
                    "try again",
                    name=name,
                    kind=resource.plural,
                )
            if subresource == "status":
                new = copy.deepcopy(current)
                new["status"] = obj.get("status")
            else:
                new = obj
                new["status"] = obj.get("status", current.get("status"))
                if new.get("status") is None:
                    new.pop("status", None)
                if new.get("spec") != current.get("spec"):
                    meta["generation"] = current["metadata"].get("generation", 1) + 1
                else:
                    meta["generation"] = current["metadata"].get("generation", 1)
                for key in ("uid", "creationTimestamp"):
                    meta[key] = current["metadata"][key]
                meta["name"] = name
                if resource.namespaced:
                    meta["namespace"] = namespace
                if resource.plural == "namespaces":
                    meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
                new["apiVersion"] = resource.api_version
                new["kind"] = resource.kind
            new["metadata"]["resourceVersion"] = str(self._bump())
            bucket[(namespace, name)] = new
            self._record(resource, "MODIFIED", new, current)
            return new

    def _delete(self, resource: Resource, namespace: str, name: str) -> Obj:
        with self._lock:
            bucket = self._store.objects.setdefault(_bucket_key(resource), {})
            current = bucket.pop((namespace, name), None)
            if current is None:
                raise _not_found(resource, name)
            gone = copy.deepcopy(current)
            gone["metadata"]["resourceVersion"] = str(self._bump())
            self._record(resource, "DELETED", gone, None)
            return gone

    # --- HTTP -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            parts = [p for p in request.path.split("/") if p]
            if not parts or parts[0] not in ("api", "apis"):
                raise ApiError(404, "NotFound", f"the server could not find {request.path}")
            discovery = self._discovery(parts)
            if discovery is not None:
                return web.json_response(discovery)
            return await self._resource_request(request, parts)
        except ApiError as exc:
            headers = {}
            if "retry_after" in exc.details:
                headers["Retry-After"] = str(exc.details.pop("retry_after"))
            return web.json_response(exc.status(), status=exc.code, headers=headers)

    def _discovery(self, parts: list[str]) -> Obj | None:
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if parts == ["apis"]:
            groups: dict[str, list[str]] = {}
            for r in RESOURCES:
                if r.group:
                    groups.setdefault(r.group, [])
                    if r.version not in groups[r.group]:
                        groups[r.group].append(r.version)
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                        "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                    }
                    for g, vs in sorted(groups.items())
                ],
            }
        if parts in (["api", "v1"],) or (len(parts) == 3 and parts[0] == "apis"):
            group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
            found = [r for r in RESOURCES if (r.group, r.version) == (group, version)]
            if not found:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": found[0].api_version,
                "resources": [
                    {
                        "name": r.plural,
                        "singularName": r.kind.lower(),
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": list(r.verbs),
                        **({"shortNames": list(r.short_names)} if r.short_names else {}),
                    }
                    for r in found
                ],
            }
        return None

    def _route(self, parts: list[str]) -> tuple[Resource, str, str, str]:
        """(resource, namespace, name, subresource) of a resource path."""
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) < 4:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            group, version, rest = parts[1], parts[2], parts[3:]
        namespace = name = sub = ""
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (group == "" and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, plural, tail = rest[1], rest[2], rest[3:]
        else:
            plural, tail = rest[0], rest[1:]
        if tail:
            name = tail[0]
        if len(tail) > 1:
            sub = tail[1]
        resource = _BY_PATH.get((group, version, plural))
        if resource is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if namespace and not resource.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return resource, namespace, name, sub

    async def _resource_request(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        resource, namespace, name, sub = self._route(parts)
        query = request.query
        method = request.method
        watching = query.get("watch") in ("1", "true", "True")
        verb = {
            "GET": "watch" if watching else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }.get(method, method.lower())
        logged = resource.plural + (f"/{sub}" if sub else "")
        with self._lock:
            self.requests.append(
                LoggedRequest(
                    verb,
                    resource.group,
                    logged,
                    namespace,
                    name,
                    query.get("resourceVersion", ""),
                )
            )
            self._raise_fault(resource.plural, verb)
        if verb == "watch":
            return await self._watch(request, resource, namespace)
        if verb == "list":
            return web.json_response(self._list(resource, namespace, query))
        if verb == "get":
            obj = self.get(resource.plural, namespace, name)
            if obj is None:
                raise _not_found(resource, name)
            return web.json_response(obj)
        if verb in ("create", "update", "patch"):
            try:
                body = await request.json()
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            if verb == "create":
                if resource.namespaced:
                    body.setdefault("metadata", {})
                    given = body["metadata"].get("namespace")
                    if given and given != namespace:
                        raise ApiError(
                            400,
                            "BadRequest",
                            "the namespace of the provided object does not match the namespace "
                            "sent on the request",
                        )
                created = self._create(resource, namespace, body)
                return web.json_response(created, status=201)
            if verb == "patch":
                current = self.get(resource.plural, namespace, name)
                if current is None:
                    raise _not_found(resource, name)
                body = _merge_patch(current, body)
            return web.json_response(self._replace(resource, namespace, name, body, sub))
        if verb == "delete":
            gone = self._delete(resource, namespace, name)
            return web.json_response(gone)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _raise_fault(self, plural: str, verb: str) -> None:
        for fault in self._faults:
            if fault.resource not in (None, plural) or fault.verb not in (None, verb):
                continue
            fault.times -= 1
            if fault.times <= 0:
                self._faults.remove(fault)
            reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}
            details: dict[str, Any] = {}
            if fault.retry_after is not None:
                details["retry_after"] = fault.retry_after
                details["retryAfterSeconds"] = fault.retry_after
            raise ApiError(
                fault.status, reason.get(fault.status, "Unknown"), "injected fault", **details
            )

    def _selectors(
        self, resource: Resource, query: Mapping[str, str]
    ) -> tuple[list[Requirement], FieldMatcher]:
        try:
            labels = parse_label_selector(query.get("labelSelector", ""))
            fields = parse_fields(query.get("fieldSelector", ""), resource.fields)
        except SelectorError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from exc
        return labels, fields

    def _list(self, resource: Resource, namespace: str, query: Mapping[str, str]) -> Obj:
        labels, fields = self._selectors(resource, query)
        probe = _Watcher(resource, namespace, labels, fields, asyncio.Queue(), False)
        with self._lock:
            rv = query.get("resourceVersion", "")
            if rv and query.get("resourceVersionMatch") == "Exact":
                wanted = _parse_rv(rv)
                if wanted < self._store.horizon:
                    horizon = self._store.horizon
                    raise ApiError(
                        410, "Expired", f"too old resource version: {wanted} ({horizon})"
                    )
                if wanted != self._store.rv:
                    raise ApiError(
                        400, "BadRequest", "the fake serves Exact lists at the current version only"
                    )
            bucket = self._store.objects.get(_bucket_key(resource), {})
            items = [copy.deepcopy(o) for _, o in sorted(bucket.items()) if probe.matches(o)]
            current = self._store.rv
        if not resource.custom:  # built-in lists leave out each item's apiVersion and kind
            for item in items:
                item.pop("apiVersion", None)
                item.pop("kind", None)
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(current)},
            "items": items,
        }

    async def _watch(
        self, request: web.Request, resource: Resource, namespace: str
    ) -> web.StreamResponse:
        query = request.query
        labels, fields = self._selectors(resource, query)
        timeout = self.default_watch_seconds
        if "timeoutSeconds" in query:
            try:
                timeout = float(int(query["timeoutSeconds"]))
            except ValueError as exc:
                raise ApiError(400, "BadRequest", "timeoutSeconds must be an integer") from exc
        if self.max_watch_seconds is not None:
            timeout = min(timeout, self.max_watch_seconds)
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true", "True")
        queue: asyncio.Queue[Obj | None] = asyncio.Queue()
        watcher = _Watcher(resource, namespace, labels, fields, queue, bookmarks)
        watcher.transport = request.transport
        rv_text = query.get("resourceVersion", "")
        with self._lock:
            if rv_text in ("", "0"):
                bucket = self._store.objects.get(_bucket_key(resource), {})
                for _, obj in sorted(bucket.items()):
                    if watcher.matches(obj):
                        queue.put_nowait(_watch_event("ADDED", obj, resource))
            else:
                since = _parse_rv(rv_text)
                if since < self._store.horizon:
                    queue.put_nowait(
                        _error_event(
                            410,
                            "Expired",
                            f"too old resource version: {since} ({self._store.horizon})",
                        )
                    )
                    queue.put_nowait(None)
                else:
                    for event in self._store.log:
                        if event.rv > since and event.resource == resource:
                            seen = watcher.translate(event)
                            if seen is not None:
                                queue.put_nowait(_watch_event(seen, event.obj, resource))
            self._watchers.add(watcher)
        # registered before the headers go out: a client that has its response is watching
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        deadline = time.monotonic() + timeout
        closing = False
        try:
            await response.prepare(request)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 and not closing:
                    closing = True
                    with self._lock:  # queued behind every event already sent to the watcher
                        if bookmarks:
                            self._send(watcher, self._bookmark(resource))
                        self._send(watcher, None)
                wait = None if closing else left
                if bookmarks and not closing:
                    wait = min(left, self.bookmark_interval)
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if bookmarks and not closing:
                        with self._lock:
                            self._send(watcher, self._bookmark(resource))
                    continue
                if item is None:
                    break
                await response.write(json.dumps(item).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                self._watchers.discard(watcher)
        return response

    def _bookmark(self, resource: Resource) -> Obj:
        """A bookmark at the store's version: sent through the watcher's queue, so it comes
        after every event at or below that version that the watcher was sent."""
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": resource.kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self._store.rv)},
            },
        }

    def _send(self, watcher: _Watcher, item: Obj | None) -> None:
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(watcher.queue.put_nowait, item)

    def _close_watchers(self) -> None:
        with self._lock:
            for watcher in list(self._watchers):
                watcher.queue.put_nowait(None)
                if watcher.transport is not None:
                    watcher.transport.abort()


def _bucket_key(resource: Resource) -> tuple[str, str, str]:
    return (resource.group, resource.version, resource.plural)


def _not_found(resource: Resource, name: str) -> ApiError:
    group = f".{resource.group}" if resource.group else ""
    return ApiError(
        404,
        "NotFound",
        f'{resource.plural}{group} "{name}" not found',
        name=name,
        group=resource.group,
        kind=resource.plural,
    )


def _parse_rv(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise ApiError(400, "BadRequest", f"invalid resource version: {text!r}") from exc


def _watch_event(type_: str, obj: Obj, resource: Resource) -> Obj:
    del resource  # watch events carry apiVersion/kind on the object, built-in or not
    return {"type": type_, "object": copy.deepcopy(obj)}


def _error_event(code: int, reason: str, message: str) -> Obj:
    return {"type": "ERROR", "object": status_object(code, reason, message, {})}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result
