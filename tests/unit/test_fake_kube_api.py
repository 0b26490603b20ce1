"""The fake API server behaves as the real one where reflectors depend on it.

Driven through the official client (``kubernetes.aio``) and a kubeconfig, as the bridge is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes.aio import client, config

from tests.kubeapi.objects import namespace as ns
from tests.kubeapi.objects import pod
from tests.kubeapi.server import FakeKubeAPI

Obj = dict[str, Any]


@pytest.fixture
async def core(kube_api: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[client.CoreV1Api]:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(kube_api.write_kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=configuration,
    )
    async with client.ApiClient(configuration) as api_client:
        yield client.CoreV1Api(api_client)


async def lines(response: aiohttp.ClientResponse) -> list[Obj]:
    events = []
    while line := await response.content.readline():
        events.append(json.loads(line))
    return events


async def test_list_then_watch_from_its_version(
    kube_api: FakeKubeAPI, core: client.CoreV1Api
) -> None:
    kube_api.create(ns("a"))
    listed = await (await core.list_namespace_without_preload_content()).json()
    rv = listed["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
    assert "kind" not in listed["items"][0]  # built-in list items carry no kind, as the real one
    kube_api.create(ns("b"))
    kube_api.delete("namespaces", "", "a")
    stream = await core.list_namespace_without_preload_content(
        watch=True, resource_version=rv, timeout_seconds=1
    )
    events = await lines(stream)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("DELETED", "a"),
    ]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(rv)


async def test_bookmarks_only_when_asked(kube_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    kube_api.create(ns("a"))
    rv = str(kube_api.resource_version)
    plain = await lines(
        await core.list_namespace_without_preload_content(
            watch=True, resource_version=rv, timeout_seconds=1
        )
    )
    assert plain == []
    marked = await lines(
        await core.list_namespace_without_preload_content(
            watch=True, resource_version=rv, timeout_seconds=1, allow_watch_bookmarks=True
        )
    )
    assert marked and {e["type"] for e in marked} == {"BOOKMARK"}
    assert marked[-1]["object"]["metadata"]["resourceVersion"] == rv


async def test_compacted_version_gives_410(kube_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    kube_api.create(ns("a"))
    old = str(kube_api.resource_version)
    kube_api.create(ns("b"))
    kube_api.compact()
    events = await lines(
        await core.list_namespace_without_preload_content(
            watch=True, resource_version=old, timeout_seconds=5
        )
    )
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
    listed = await core.list_namespace_without_preload_content(
        resource_version=old, resource_version_match="Exact"
    )
    assert listed.status == 410
    assert (await listed.json())["reason"] == "Expired"


async def test_mid_stream_410(kube_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    stream = await core.list_namespace_without_preload_content(
        watch=True, resource_version=str(kube_api.resource_version), timeout_seconds=10
    )
    assert kube_api.open_watches("namespaces") == 1
    kube_api.create(ns("a"))
    assert kube_api.expire_watches() == 1
    events = await lines(stream)
    assert [e["type"] for e in events] == ["ADDED", "ERROR"]
    assert events[-1]["object"]["code"] == 410


async def test_selectors(kube_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    kube_api.create(pod("p1", "node-1", app="web"))
    kube_api.create(pod("p2", "node-2", app="db"))
    on_node = await (
        await core.list_pod_for_all_namespaces_without_preload_content(
            field_selector="spec.nodeName=node-1"
        )
    ).json()
    assert [i["metadata"]["name"] for i in on_node["items"]] == ["p1"]
    chosen = await (
        await core.list_pod_for_all_namespaces_without_preload_content(
            label_selector="app in (web,cache),!missing"
        )
    ).json()
    assert [i["metadata"]["name"] for i in chosen["items"]] == ["p1"]
    bad = await core.list_pod_for_all_namespaces_without_preload_content(
        field_selector="spec.containers=x"
    )
    assert bad.status == 400
    assert "field label not supported: spec.containers" in (await bad.json())["message"]
    # a custom resource allows only metadata.name and metadata.namespace
    custom = client.CustomObjectsApi(core.api_client)
    ok = await custom.list_cluster_custom_object_without_preload_content(
        "cilium.io", "v2", "ciliumnetworkpolicies", field_selector="metadata.name=x"
    )
    assert ok.status == 200
    refused = await custom.list_cluster_custom_object_without_preload_content(
        "cilium.io", "v2", "ciliumnetworkpolicies", field_selector="spec.endpointSelector=x"
    )
    assert refused.status == 400


async def test_selector_exit_is_a_delete(kube_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    kube_api.create(pod("p1", "node-1", app="web"))
    rv = str(kube_api.resource_version)
    relabelled = pod("p1", "node-1", app="db")
    kube_api.apply(relabelled)
    kube_api.apply(pod("p1", "node-1", app="web"))
    events = await lines(
        await core.list_pod_for_all_namespaces_without_preload_content(
            watch=True, resource_version=rv, label_selector="app=web", timeout_seconds=1
        )
    )
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]


async def test_conflicts(kube_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    created = kube_api.create(ns("a"))
    again = await core.create_namespace_without_preload_content(ns("a"))
    assert again.status == 409 and (await again.json())["reason"] == "AlreadyExists"
    kube_api.apply(ns("a", team="x"))  # moves the resourceVersion on
    stale = await core.replace_namespace_without_preload_content("a", created)
    assert stale.status == 409 and (await stale.json())["reason"] == "Conflict"


async def test_discovery_for_cilium(core: client.CoreV1Api) -> None:
    groups = await client.ApisApi(core.api_client).get_api_versions()
    assert "cilium.io" in [g.name for g in groups.groups]
    configuration = core.api_client.configuration
    response = await core.api_client.rest_client.request(
        "GET",
        f"{configuration.host}/apis/cilium.io/v2",
        headers={"Authorization": await configuration.get_api_key_with_prefix("BearerToken")},
    )
    body = json.loads(await response.read())
    names = {r["name"]: r for r in body["resources"]}
    assert names["ciliumnetworkpolicies"]["shortNames"] == ["cnp"]
    assert names["ciliumclusterwidenetworkpolicies"]["namespaced"] is False


async def test_faults(kube_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    kube_api.fail(429, resource="namespaces", verb="list", retry_after=2)
    throttled = await core.list_namespace_without_preload_content()
    assert throttled.status == 429 and throttled.headers["Retry-After"] == "2"
    assert (await core.list_namespace_without_preload_content()).status == 200
    kube_api.max_watch_seconds = 0.2  # very short watches, whatever the client asks
    short = await core.list_namespace_without_preload_content(watch=True, timeout_seconds=60)
    assert await lines(short) == []
    kube_api.max_watch_seconds = None
    stream = await core.list_namespace_without_preload_content(watch=True, timeout_seconds=60)
    assert kube_api.open_watches("namespaces") == 1
    assert kube_api.drop_watches() == 1
    with pytest.raises(aiohttp.ClientPayloadError):
        await lines(stream)


async def test_token_required(kube_api: FakeKubeAPI) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{kube_api.url}/api/v1/pods") as r:
        assert r.status == 401
    verbs = {(r.verb, r.resource) for r in kube_api.requests}
    assert ("list", "pods") not in verbs  # refused before it counts as a use
