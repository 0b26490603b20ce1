"""The bridge's reflector against the fake API server, in client-go's reflector scenarios.

client-go's reflector_test.go checks: list → sync → increments (TestReflectorListAndWatch);
watches resume from the last bookmark (TestReflectorResyncChan/WatchListBookmark); 410 Gone
relists and the store loses what vanished (TestReflectorListAndWatchWithErrors, the "too old
resource version" cases); a watch that ends or breaks resumes from the last version without a
list (TestReflectorWatchHandlerError); 429/5xx back off (TestBackoffOnTooManyRequests).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.k8s.kubeclient import CNPS, NAMESPACES, Kind, KubeClient
from services.k8s.reflector import Backoff, Reflector
from shared.errors import InvalidArgument, Unavailable
from tests.conftest import eventually
from tests.kubeapi.objects import cnp
from tests.kubeapi.objects import namespace as ns
from tests.kubeapi.server import FakeKubeAPI

Obj = dict[str, Any]


class Recorder:
    """A handler that keeps what it was told; refuses and fails on demand."""

    def __init__(self) -> None:
        self.state: dict[str, Obj] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()
        self.unavailable = False

    async def upsert(self, kind: Kind, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        self.calls.append(("upsert", name))
        if name in self.refuse:
            raise InvalidArgument(f"{name} is refused", field="spec")
        if self.unavailable:
            raise Unavailable("the bus is away")
        assert obj["kind"] == kind.kind  # filled in for built-in list items
        self.state[name] = obj

    async def delete(self, kind: Kind, obj: Obj) -> None:
        self.calls.append(("delete", obj["metadata"]["name"]))
        self.state.pop(obj["metadata"]["name"], None)


@pytest.fixture
async def kube(kube_api: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[KubeClient]:
    client = await KubeClient.connect(str(kube_api.write_kubeconfig(tmp_path / "kubeconfig")))
    yield client
    await client.close()


@pytest.fixture
async def running(
    kube_api: FakeKubeAPI, kube: KubeClient
) -> AsyncIterator[tuple[Reflector, Recorder, list[float]]]:
    recorder = Recorder()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0.01)

    kube_api.create(ns("a"))
    kube_api.create(ns("b"))
    reflector = Reflector(
        kube,
        NAMESPACES,
        recorder,
        min_watch_timeout=1,
        backoff=Backoff(initial=0.05, ceiling=0.2),
        sleep=sleep,
    )
    task = asyncio.create_task(reflector.run())
    await asyncio.wait_for(reflector.synced.wait(), 5)
    yield reflector, recorder, slept
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def lists(kube_api: FakeKubeAPI, plural: str = "namespaces") -> int:
    return sum(1 for r in kube_api.requests if r.verb == "list" and r.resource == plural)


def watches(kube_api: FakeKubeAPI, plural: str = "namespaces") -> list[str]:
    requests = kube_api.requests
    return [r.resource_version for r in requests if r.verb == "watch" and r.resource == plural]


async def test_list_sync_then_increments(
    kube_api: FakeKubeAPI, running: tuple[Reflector, Recorder, list[float]]
) -> None:
    reflector, recorder, _ = running
    # synced means the whole first list was handed over
    assert set(recorder.state) == {"a", "b"}
    kube_api.create(ns("c"))
    kube_api.apply(ns("a", team="x"))
    kube_api.delete("namespaces", "", "b")

    async def caught_up() -> None:
        assert set(recorder.state) == {"a", "c"}
        assert recorder.state["a"]["metadata"]["labels"]["team"] == "x"

    await eventually(caught_up, timeout=5, what="the watch's increments")
    assert lists(kube_api) == 1
    assert reflector.last_rv == str(kube_api.resource_version)


async def test_resumes_from_bookmark(
    kube_api: FakeKubeAPI, running: tuple[Reflector, Recorder, list[float]]
) -> None:
    await eventually(lambda: _watching(kube_api), timeout=5, what="an open watch")
    listed_at = watches(kube_api)[0]
    kube_api.create(cnp("other"))  # moves the global version; namespaces see only bookmarks of it

    async def resumed() -> None:
        assert len(watches(kube_api)) >= 2
        assert int(watches(kube_api)[-1]) > int(listed_at)

    await eventually(resumed, timeout=8, what="a second watch from the bookmark's version")
    assert lists(kube_api) == 1


async def test_gone_relists_and_deletes_what_vanished(
    kube_api: FakeKubeAPI, running: tuple[Reflector, Recorder, list[float]]
) -> None:
    _, recorder, _ = running
    kube_api.stop()  # the bridge loses the API server; meanwhile b goes and c comes
    kube_api.delete("namespaces", "", "b")
    kube_api.create(ns("c"))
    kube_api.compact()
    await asyncio.sleep(0.3)
    assert set(recorder.state) == {"a", "b"}  # nothing deleted because the server is away
    kube_api.start()

    async def resynced() -> None:
        assert set(recorder.state) == {"a", "c"}

    await eventually(resynced, timeout=10, what="a relist after 410")
    assert lists(kube_api) == 2
    assert ("upsert", "a") not in recorder.calls[2:]  # unchanged objects are not handed again


async def test_mid_stream_gone_relists(
    kube_api: FakeKubeAPI, running: tuple[Reflector, Recorder, list[float]]
) -> None:
    del running  # started, synced and watching
    await eventually(lambda: _watching(kube_api), timeout=5, what="an open watch")
    kube_api.expire_watches()
    await eventually(lambda: _listed_twice(kube_api), timeout=5, what="a relist")


async def _watching(kube_api: FakeKubeAPI) -> None:
    assert kube_api.open_watches("namespaces") == 1


async def _listed_twice(kube_api: FakeKubeAPI) -> None:
    assert lists(kube_api) == 2


async def test_dropped_connection_rewatches_from_last_version(
    kube_api: FakeKubeAPI, running: tuple[Reflector, Recorder, list[float]]
) -> None:
    reflector, recorder, slept = running
    await eventually(lambda: _watching(kube_api), timeout=5, what="an open watch")
    kube_api.create(ns("c"))
    await eventually(lambda: _has(recorder, "c"), timeout=5, what="c through the watch")
    seen = reflector.last_rv
    before = len(watches(kube_api))
    kube_api.drop_watches()

    async def rewatched() -> None:
        assert len(watches(kube_api)) > before
        assert int(watches(kube_api)[before]) >= int(seen)

    await eventually(rewatched, timeout=5, what="a new watch")
    assert lists(kube_api) == 1
    assert slept  # it backed off before watching again


async def _has(recorder: Recorder, name: str) -> None:
    assert name in recorder.state


async def test_backs_off_on_429_and_500(kube_api: FakeKubeAPI, kube: KubeClient) -> None:
    recorder = Recorder()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    kube_api.create(ns("a"))
    kube_api.fail(429, resource="namespaces", verb="list", retry_after=3)
    kube_api.fail(500, resource="namespaces", verb="list")
    reflector = Reflector(
        kube, NAMESPACES, recorder, min_watch_timeout=1, backoff=Backoff(0.05, 0.2), sleep=sleep
    )
    task = asyncio.create_task(reflector.run())
    await asyncio.wait_for(reflector.synced.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert slept[0] >= 3  # Retry-After honoured
    assert 0.05 <= slept[1] < 3
    assert lists(kube_api) == 3


async def test_refused_object_does_not_stop_the_watch(
    kube_api: FakeKubeAPI, running: tuple[Reflector, Recorder, list[float]]
) -> None:
    reflector, recorder, _ = running
    recorder.refuse.add("bad")
    kube_api.create(ns("bad"))
    kube_api.create(ns("good"))
    await eventually(lambda: _has(recorder, "good"), timeout=5, what="the next object")
    assert ("upsert", "bad") in recorder.calls and "bad" not in recorder.state
    assert not reflector.pending  # a refusal is final until the object changes


async def test_retries_when_the_bus_is_away(
    kube_api: FakeKubeAPI, running: tuple[Reflector, Recorder, list[float]]
) -> None:
    reflector, recorder, _ = running
    recorder.unavailable = True
    kube_api.create(ns("c"))

    async def pending() -> None:
        assert "c" in reflector.pending

    await eventually(pending, timeout=5, what="c waiting")
    recorder.unavailable = False
    await reflector.retry_pending()
    assert "c" in recorder.state and not reflector.pending


async def test_custom_resources(kube_api: FakeKubeAPI, kube: KubeClient) -> None:
    recorder = Recorder()
    kube_api.create(cnp("p1", "x"))
    reflector = Reflector(kube, CNPS, recorder, min_watch_timeout=1)
    task = asyncio.create_task(reflector.run())
    await asyncio.wait_for(reflector.synced.wait(), 5)
    kube_api.create(cnp("p2", "y"))
    await eventually(lambda: _has(recorder, "p2"), timeout=5, what="a CNP through the watch")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert set(reflector.known) == {"x/p1", "y/p2"}
