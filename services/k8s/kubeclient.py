"""The API server through the official client's asyncio API (``kubernetes.aio``), as raw JSON.

Objects stay the dictionaries the API server sent: they go on to the same paths as the
documents ``membrane apply -f`` reads, so no typed model stands between (the generated models
would also drop the fields of custom resources). The client builds every URL and carries the
credentials of the kubeconfig or the pod's service account; this module only reads statuses:
an HTTP error becomes :class:`ApiError` (with Retry-After), a connection that fails or is cut
becomes :class:`ConnectionLost`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.runtime import unblock_aiohttp

unblock_aiohttp()

import aiohttp  # noqa: E402
from kubernetes.aio import client, config  # noqa: E402

Obj = dict[str, Any]


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Throttled or failing on the server's side: the same request may work later."""
        return self.status == 429 or self.status >= 500


class ConnectionLost(Exception):
    """No answer: the API server is away, or the connection was cut mid-stream."""


@dataclass(frozen=True)
class Kind:
    """One watched resource: its object kind and how the official client lists it."""

    kind: str
    api_version: str
    plural: str
    namespaced: bool
    custom: bool = False  # listed through CustomObjectsApi

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


NAMESPACES = Kind("Namespace", "v1", "namespaces", False)
PODS = Kind("Pod", "v1", "pods", True)
SERVICES = Kind("Service", "v1", "services", True)
NODES = Kind("Node", "v1", "nodes", False)
ENDPOINT_SLICES = Kind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True)
NETWORK_POLICIES = Kind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", True)
CNPS = Kind("CiliumNetworkPolicy", "cilium.io/v2", "ciliumnetworkpolicies", True, custom=True)
CCNPS = Kind(
    "CiliumClusterwideNetworkPolicy",
    "cilium.io/v2",
    "ciliumclusterwidenetworkpolicies",
    False,
    custom=True,
)
WATCHED = (NAMESPACES, PODS, SERVICES, ENDPOINT_SLICES, NETWORK_POLICIES, CNPS, CCNPS, NODES)


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | ERROR
    object: Obj


class KubeClient:
    """One API client (one connection pool) for every resource the bridge uses."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self._by_kind: dict[str, Callable[..., Awaitable[aiohttp.ClientResponse]]] = {
            "Namespace": self.core.list_namespace_without_preload_content,
            "Pod": self.core.list_pod_for_all_namespaces_without_preload_content,
            "Service": self.core.list_service_for_all_namespaces_without_preload_content,
            "Node": self.core.list_node_without_preload_content,
            "EndpointSlice": client.DiscoveryV1Api(
                api_client
            ).list_endpoint_slice_for_all_namespaces_without_preload_content,
            "NetworkPolicy": client.NetworkingV1Api(
                api_client
            ).list_network_policy_for_all_namespaces_without_preload_content,
        }

    @classmethod
    async def connect(cls, kubeconfig: str) -> KubeClient:
        """From a kubeconfig file, or (empty) the pod's service account, as kubectl does."""
        configuration = client.Configuration()
        if kubeconfig:
            await config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(client.ApiClient(configuration))

    async def close(self) -> None:
        await self.api_client.close()  # type: ignore[no-untyped-call]

    async def _call(
        self, request: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> aiohttp.ClientResponse:
        try:
            response = await request()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"the API server did not answer: {exc!r}") from exc
        if response.status >= 400:
            raise await _error(response)
        return response

    def _lister(self, kind: Kind, **params: Any) -> Callable[[], Awaitable[aiohttp.ClientResponse]]:
        if kind.custom:
            return lambda: self.custom.list_cluster_custom_object_without_preload_content(
                kind.group, kind.version, kind.plural, **params
            )
        return lambda: self._by_kind[kind.kind](**params)

    async def list(self, kind: Kind) -> tuple[list[Obj], str]:
        """Every object of ``kind`` (a consistent read) and the list's resourceVersion.

        Items of built-in lists come without ``apiVersion``/``kind``; they are filled in here.
        """
        response = await self._call(self._lister(kind))
        try:
            body = await response.json()
        except (aiohttp.ClientError, ValueError) as exc:
            raise ConnectionLost(f"the list of {kind.plural} was cut: {exc!r}") from exc
        items: list[Obj] = body.get("items") or []
        for item in items:
            item.setdefault("apiVersion", kind.api_version)
            item.setdefault("kind", kind.kind)
        return items, str(body["metadata"]["resourceVersion"])

    async def watch(
        self, kind: Kind, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[WatchEvent]:
        """The events after ``resource_version``, with bookmarks, until the server ends it."""
        response = await self._call(
            self._lister(
                kind,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
                # the server closes the stream; this only catches a server that went silent
                _request_timeout=timeout_seconds + 30,
            )
        )
        try:
            while True:
                try:
                    line = await response.content.readline()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    raise ConnectionLost(f"the watch of {kind.plural} was cut: {exc!r}") from exc
                if not line:
                    return
                try:
                    event = json.loads(line)
                    yield WatchEvent(str(event["type"]), dict(event["object"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConnectionLost(
                        f"the watch of {kind.plural} sent an unreadable event: {exc}"
                    ) from exc
        finally:
            response.release()

    async def _json(self, request: Callable[[], Awaitable[aiohttp.ClientResponse]]) -> Obj:
        response = await self._call(request)
        try:
            return dict(await response.json())
        except (aiohttp.ClientError, ValueError) as exc:
            raise ConnectionLost(f"an unreadable reply: {exc!r}") from exc

    async def read_lease(self, namespace: str, name: str) -> Obj:
        return await self._json(
            lambda: self.coordination.read_namespaced_lease_without_preload_content(name, namespace)
        )

    async def create_lease(self, namespace: str, body: Obj) -> Obj:
        return await self._json(
            lambda: self.coordination.create_namespaced_lease_without_preload_content(
                namespace, _model(client.V1Lease, body)
            )
        )

    async def replace_lease(self, namespace: str, name: str, body: Obj) -> Obj:
        """Replace, guarded by ``body``'s resourceVersion: a stale one is a 409."""
        return await self._json(
            lambda: self.coordination.replace_namespaced_lease_without_preload_content(
                name, namespace, _model(client.V1Lease, body)
            )
        )

    async def create_event(self, namespace: str, body: Obj) -> Obj:
        return await self._json(
            lambda: self.core.create_namespaced_event_without_preload_content(
                namespace, _model(client.CoreV1Event, body)
            )
        )


M = TypeVar("M")


def _model(model: type[M], body: Obj) -> M:
    """The generated model of a request body (the client serialises it back to JSON)."""
    built = model.from_dict(body)  # type: ignore[attr-defined]
    assert built is not None
    return built  # type: ignore[no-any-return]


async def _error(response: aiohttp.ClientResponse) -> ApiError:
    reason = response.reason or ""
    message = ""
    try:
        status = await response.json(content_type=None)
        reason = str(status.get("reason") or reason)
        message = str(status.get("message") or "")
    except (aiohttp.ClientError, ValueError, AttributeError):
        pass
    finally:
        response.release()
    retry_after: float | None = None
    if "Retry-After" in response.headers:
        try:
            retry_after = float(response.headers["Retry-After"])
        except ValueError:
            retry_after = None
    return ApiError(response.status, reason, message, retry_after)
