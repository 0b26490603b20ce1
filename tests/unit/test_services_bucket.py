"""The ``services`` bucket's shards (shared/services_bucket.py): what readers see of them is
what was written, per service, for either format; a single change is a single service."""

from __future__ import annotations

import random

import msgspec
import pytest

from services.datapath import lb_sync as lb_sync_module
from services.datapath.lb_sync import LBSync
from shared import services_bucket, subjects
from shared.bus import KVEvent
from shared.messages import LBBackend, LBFrontend, LBService
from shared.services_bucket import (
    FORMAT,
    ServicesView,
    decode_shard,
    encode_shard,
    shard_key,
    shard_number,
    shard_of,
)


def svc(i: int, namespace: str = "bench", port: int = 8080, revision: int = 1) -> LBService:
    return LBService(
        namespace=namespace,
        name=f"s{i}",
        frontends=[
            LBFrontend(
                id=i + 1,
                ip=f"10.96.{i // 250}.{i % 250 + 1}",
                port=80,
                protocol="TCP",
                backends=[
                    LBBackend(id=2 * i + 1, ip=f"10.250.{i // 100}.{2 * (i % 100)}", port=port),
                    LBBackend(id=2 * i + 2, ip=f"10.250.{i // 100}.{2 * (i % 100) + 1}", port=port),
                ],
            )
        ],
        algorithm="random",
        maglev_size=401,
        revision=revision,
        source="kubernetes",
    )


def key(r: LBService) -> str:
    return subjects.service_key(r.namespace, r.name)


def shards(records: list[LBService]) -> dict[str, bytes]:
    """Bucket key -> value, as the lb service writes them."""
    content: dict[int, dict[str, bytes]] = {}
    for r in records:
        content.setdefault(shard_of(key(r)), {})[key(r)] = msgspec.json.encode(r)
    return {shard_key(n): encode_shard(c) for n, c in content.items()}


def test_shard_keys_are_never_service_keys() -> None:
    # a Kubernetes namespace is a DNS label: it cannot start with "_"
    assert shard_number(shard_key(17)) == 17
    assert shard_number("shard.17") is None and shard_number("default.web") is None
    assert shard_number("_shard.x") is None
    assert all(0 <= shard_of(f"ns.s{i}") < services_bucket.SHARDS for i in range(1000))


def test_round_trip_and_both_formats_read_alike() -> None:
    """Differential: a bucket of shards and a bucket of format-1 keys give readers the same
    services, record for record, and decode to what was written."""
    rng = random.Random(19)
    records = [svc(i, namespace=rng.choice(["a", "b", "kube-system"])) for i in range(3000)]
    sharded, legacy = ServicesView(), ServicesView()
    seen_sharded: dict[str, bytes | None] = {}
    for bucket_key, value in shards(records).items():
        assert shard_number(bucket_key) is not None
        decoded = decode_shard(value)
        assert all(shard_of(k) == shard_number(bucket_key) for k in decoded)
        seen_sharded.update(sharded.update(bucket_key, value))
    seen_legacy: dict[str, bytes | None] = {}
    for r in records:
        seen_legacy.update(legacy.update(key(r), msgspec.json.encode(r)))
    assert seen_sharded == seen_legacy
    assert len(seen_sharded) == len(records)
    for r in records:
        value = seen_sharded[key(r)]
        assert value is not None and msgspec.json.decode(value, type=LBService) == r
    assert sharded.errors == legacy.errors == 0


def test_a_single_change_is_a_single_service() -> None:
    """Incremental: one record changed in a bucket of 20,000 rewrites one shard, and a reader
    sees exactly that service change -- not the shard's other services, nor the bucket."""
    records = [svc(i) for i in range(20000)]
    values = shards(records)
    view = ServicesView()
    for bucket_key, value in values.items():
        view.update(bucket_key, value)
    changed = svc(4242, port=9090, revision=2)
    after = shards([changed if r.name == "s4242" else r for r in records])
    rewritten = [k for k in after if after[k] != values[k]]
    assert rewritten == [shard_key(shard_of(key(changed)))]
    assert len(decode_shard(after[rewritten[0]])) < 60  # about 20 of 20,000
    changes = view.update(rewritten[0], after[rewritten[0]])
    assert changes == [(key(changed), msgspec.json.encode(changed))]
    # the same shard again (a watch's resync): nothing
    assert view.update(rewritten[0], after[rewritten[0]]) == []
    # a service deleted: its shard without it
    gone = [r for r in records if r.name != "s7"]
    shard7 = shard_key(shard_of("bench.s7"))
    assert view.update(shard7, shards(gone)[shard7]) == [("bench.s7", None)]


def test_format_1_keys_give_way_to_shards_during_an_upgrade() -> None:
    view = ServicesView()
    old = msgspec.json.encode(svc(1))
    assert view.update("bench.s1", old) == [("bench.s1", old)]
    s = shard_key(shard_of("bench.s1"))
    assert view.update(s, encode_shard({"bench.s1": old})) == []  # the same record: no change
    assert view.update("bench.s1", None) == []  # the old key deleted: the shard's holds
    newer = msgspec.json.encode(svc(1, port=1, revision=2))
    assert view.update(s, encode_shard({"bench.s1": newer})) == [("bench.s1", newer)]
    assert view.update(s, None) == [("bench.s1", None)]
    # a shard that goes while an old key still holds the service: the old record again
    view.update("bench.s1", old)
    view.update(s, encode_shard({"bench.s1": newer}))
    assert view.update(s, None) == [("bench.s1", old)]


@pytest.mark.parametrize(
    "value", [b"{not json", b'{"format": 3, "services": {}}', b'{"services": {}}', b"[]"]
)
def test_an_unreadable_or_newer_shard_takes_its_services_out(value: bytes) -> None:
    view = ServicesView()
    s = shard_key(shard_of("bench.s1"))
    record = msgspec.json.encode(svc(1))
    view.update(s, encode_shard({"bench.s1": record}))
    assert view.update(s, value) == [("bench.s1", None)]
    assert view.errors == 1
    with pytest.raises(ValueError):
        decode_shard(value)


def test_format_is_written() -> None:
    value = encode_shard({"a.b": b"{}"})
    assert msgspec.json.decode(value)["format"] == FORMAT == 2


async def test_agent_applies_only_the_changed_service_of_a_shard() -> None:
    """The datapath agent: a rewritten shard of 20,000 services' bucket programs only the
    service whose record changed (map writes counted)."""
    tables: dict[str, dict[bytes, bytes]] = {n: {} for n in lb_sync_module.MAP_NAMES}
    sync = LBSync(tables)
    records = [svc(i) for i in range(2000)]
    for n, (bucket_key, value) in enumerate(shards(records).items()):
        sync.on_record(KVEvent(key=bucket_key, value=value, revision=n + 1))
    await sync.drain()
    assert len(sync.records) == 2000
    assert len(tables["lb_services"]) == 2000 and len(tables["lb_backends"]) == 4000
    applied: list[str] = []
    real_apply = sync._apply

    def counting(k: str, record: LBService | None, ops: lb_sync_module.Ops) -> None:
        applied.append(k)
        real_apply(k, record, ops)

    sync._apply = counting  # type: ignore[method-assign]
    changed = svc(1234, port=9090, revision=2)
    s = shard_key(shard_of(key(changed)))
    updated = shards([changed if r.name == "s1234" else r for r in records])[s]
    sync.on_record(KVEvent(key=s, value=updated, revision=9999))
    await sync.drain()
    assert applied == ["bench.s1234"]
    backend = lb_sync_module._U32.pack(changed.frontends[0].backends[0].id)
    assert tables["lb_backends"][backend] == lb_sync_module.backend_value(
        changed.frontends[0].backends[0].ip, 9090, False
    )
