"""The ``services`` bucket -> this node's load-balancing maps (bpf/lb.h), incrementally.

Each service's frontends are diffed against what was installed for it: only entries that
changed are written, only those that went are deleted. Events that arrive together (the
snapshot of tens of thousands of services, or a burst) are flushed together, with one batch
syscall per map. Order keeps the datapath consistent at every moment: backends, slots and
Maglev entries before the service entry that points at them; on removal, the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import msgspec
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from shared import (
    bpf_layouts,
    gcpause,
    kv_watch,
    log,
    maglev,
    protocols,
    services_bucket,
    subjects,
)
from shared.bus import KVEvent
from shared.messages import LBFrontend, LBService

PROTOCOLS = {"TCP": protocols.TCP, "UDP": protocols.UDP}  # SCTP: not translated
ALG_RANDOM, ALG_MAGLEV = 0, 1
TERMINATING = 0x1

_SERVICE_KEY = bpf_layouts.LB_SERVICE_KEY
_SERVICE_VALUE = bpf_layouts.LB_SERVICE_VALUE
_SLOT_KEY = bpf_layouts.LB_SLOT_KEY
_U32 = bpf_layouts.U32
_BACKEND = bpf_layouts.LB_BACKEND
_CHUNK = bpf_layouts.LB_MAGLEV_CHUNK
CHUNK_SLOTS = bpf_layouts.LB_MAGLEV_CHUNK_SLOTS
# the same bytes as LB_SERVICE_KEY and LB_BACKEND (an address, a network-order port, one
# byte: the protocol or the flags), packed from the port as a number: one call instead of two
_ADDRESS_PORT_BYTE = struct.Struct(">4sHBx")
assert _ADDRESS_PORT_BYTE.size == _SERVICE_KEY.size == _BACKEND.size
_inet_aton = socket.inet_aton

MAP_NAMES = ("lb_backends", "lb_slots", "lb_maglev", "lb_services")
# records applied per turn of the event loop: a burst (a bulk apply's 2,000 records, the
# snapshot of 20,000 at start) is flushed in chunks with a yield between them, so that the
# agent's other watches, heartbeats and requests are not held up for the whole burst's
# Maglev tables (about 0.2 ms of Python each); each chunk is one batch syscall per map
FLUSH_CHUNK = 500

_decode_record = msgspec.json.Decoder(LBService).decode
BAD_RECORDS = Counter("membrane_datapath_lb_bad_records_total", "services entries not decoded")
FLUSH_SECONDS = Histogram(
    "membrane_datapath_lb_flush_seconds",
    "Writing one batch of service changes into the maps",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
MAP_OPS = Counter("membrane_datapath_lb_map_ops_total", "LB map entries written or deleted", ["op"])


def service_key(ip: str, port: int, protocol: int) -> bytes:
    return _ADDRESS_PORT_BYTE.pack(_inet_aton(ip), port, protocol)


def backend_value(ip: str, port: int, terminating: bool) -> bytes:
    return _ADDRESS_PORT_BYTE.pack(_inet_aton(ip), port, TERMINATING if terminating else 0)


@dataclass
class Installed:
    """What one frontend put into the maps."""

    keys: list[bytes]  # lb_services keys (a node port has one per node address)
    value: bytes
    slots: list[int]  # backend ids of slots 0..n-1
    table: list[int]  # Maglev table (empty for random selection)
    table_of: tuple[tuple[int, ...], int, int] = ((), 0, 0)  # (active ids, size, seed)
    backends: dict[int, bytes] = field(default_factory=dict)


@dataclass
class Ops:
    updates: dict[str, dict[bytes, bytes]] = field(
        default_factory=lambda: {name: {} for name in MAP_NAMES}
    )
    deletes: dict[str, set[bytes]] = field(
        default_factory=lambda: {name: set() for name in MAP_NAMES}
    )

    def put(self, name: str, key: bytes, value: bytes) -> None:
        self.deletes[name].discard(key)
        self.updates[name][key] = value

    def remove(self, name: str, key: bytes) -> None:
        self.updates[name].pop(key, None)
        self.deletes[name].add(key)

    def __bool__(self) -> bool:
        return any(self.updates.values()) or any(self.deletes.values())


class LBSync:
    def __init__(self, tables: dict[str, Any], underlays: Mapping[str, str] | None = None) -> None:
        self.tables = tables  # bcc tables by name (a dict of fakes in unit tests)
        self.installed: dict[str, dict[int, Installed]] = {}  # service key -> frontend id ->
        self.records: dict[str, LBService] = {}
        self.backend_refs: dict[int, int] = {}
        self.backend_values: dict[int, bytes] = {}
        self.node_ips: set[str] = set()
        # node-port frontends: every member of ``nodes`` at the underlay address the identity
        # service recorded for it (``pod-cidrs``, through the ipcache guard's map: node token
        # -> address), never the address a node's own record claims -- a node could otherwise
        # have every peer load-balance traffic to an address of its choosing
        self.members: set[str] = set()  # node tokens
        self.underlays: Mapping[str, str] = underlays if underlays is not None else {}
        self.pending: dict[str, LBService | None] = {}
        self.view = services_bucket.ServicesView()
        self._flush_handle: asyncio.Handle | None = None  # the flush the loop will run next
        # the collector is paused from an entry until what it brought is in the maps: through
        # a burst (a bulk apply's 20,000 records in 1,024 shards, the snapshot at start) it
        # would only traverse again and again the records and entries that stay (a sixth of
        # the Python work of a bulk). They are not frozen after (shared/gcpause.py): a cycle
        # made meanwhile elsewhere in the agent is still collected
        self._gc_held = False
        self.synced = asyncio.Event()
        self.log = log.get("datapath.lb")

    # --- desired state -> operations ---------------------------------------------------------

    def _frontend_keys(self, f: LBFrontend, protocol: int) -> list[bytes]:
        if f.node_port:
            return [service_key(ip, f.port, protocol) for ip in sorted(self.node_ips)]
        return [service_key(f.ip, f.port, protocol)]

    def _apply(self, key: str, record: LBService | None, ops: Ops) -> None:
        old = self.installed.pop(key, {})
        new: dict[int, Installed] = {}
        if record is not None:
            self.records[key] = record
            for f in record.frontends:
                protocol = PROTOCOLS.get(f.protocol)
                if protocol is None:
                    continue
                new[f.id] = self._frontend(record, f, protocol, old.get(f.id))
        else:
            self.records.pop(key, None)
        # additions and changes: backends, then slots and tables, then the service entries
        for fid, state in new.items():
            before = old.get(fid)
            if before is None:  # the usual case (a bulk of new services): nothing to diff
                self._add(fid, state, ops)
                continue
            for bid, value in state.backends.items():
                if bid not in before.backends:
                    self._ref_backend(bid, value, ops)
                elif before.backends[bid] != value:
                    self.backend_values[bid] = value
                    ops.put("lb_backends", _U32.pack(bid), value)
            self._diff_list("lb_slots", fid, before.slots, state.slots, ops)
            self._diff_table(fid, before.table, state.table, ops)
            for k in state.keys:
                if k not in before.keys or before.value != state.value:
                    ops.put("lb_services", k, state.value)
            for k in before.keys:
                if k not in state.keys:
                    ops.remove("lb_services", k)
            for bid in before.backends:
                if bid not in state.backends:
                    self._unref_backend(bid, ops)
        for fid, before in old.items():
            if fid in new:
                continue
            for k in before.keys:
                ops.remove("lb_services", k)
            self._diff_list("lb_slots", fid, before.slots, [], ops)
            self._diff_table(fid, before.table, [], ops)
            for bid in before.backends:
                self._unref_backend(bid, ops)
        if new:
            self.installed[key] = new

    def _frontend(
        self, record: LBService, f: LBFrontend, protocol: int, before: Installed | None
    ) -> Installed:
        active = sorted(b.id for b in f.backends if not b.terminating)
        algorithm = ALG_MAGLEV if record.algorithm == "maglev" else ALG_RANDOM
        table: list[int] = []
        table_of: tuple[tuple[int, ...], int, int] = ((), 0, 0)
        size = record.maglev_size if algorithm == ALG_MAGLEV else 0
        if algorithm == ALG_MAGLEV and active:
            table_of = (tuple(active), size, record.maglev_seed)
            if before is not None and before.table_of == table_of:
                table = before.table  # the backends did not change: neither did the table
            else:
                table = maglev.table(active, size, record.maglev_seed)
        value = _SERVICE_VALUE.pack(f.id, len(active), record.affinity_timeout, size, algorithm)
        return Installed(
            keys=self._frontend_keys(f, protocol),
            value=value,
            slots=active if algorithm == ALG_RANDOM else [],
            table=table,
            table_of=table_of,
            backends={b.id: backend_value(b.ip, b.port, b.terminating) for b in f.backends},
        )

    def _add(self, fid: int, state: Installed, ops: Ops) -> None:
        """A frontend new to this node: what :meth:`_apply`'s diff gives against nothing, its
        steps (:meth:`_ref_backend`, :meth:`_diff_list`, ``Ops.put``) written out, as every
        frontend of a bulk comes this way."""
        updates, deletes = ops.updates, ops.deletes
        refs, values = self.backend_refs, self.backend_values
        for bid, value in state.backends.items():
            count = refs.get(bid, 0)
            refs[bid] = count + 1
            if count == 0 or values.get(bid) != value:
                values[bid] = value
                key = _U32.pack(bid)
                deletes["lb_backends"].discard(key)
                updates["lb_backends"][key] = value
        if state.slots:
            slots, gone = updates["lb_slots"], deletes["lb_slots"]
            pack, pack_id = _SLOT_KEY.pack, _U32.pack
            for slot, bid in enumerate(state.slots):
                key = pack(fid, slot)
                gone.discard(key)
                slots[key] = pack_id(bid)
        if state.table:
            self._diff_table(fid, [], state.table, ops)
        services, gone = updates["lb_services"], deletes["lb_services"]
        for key in state.keys:
            gone.discard(key)
            services[key] = state.value

    @staticmethod
    def _diff_list(name: str, fid: int, old: list[int], new: list[int], ops: Ops) -> None:
        pack = _SLOT_KEY.pack
        value = _U32.pack
        common = min(len(old), len(new))
        for slot in range(common):
            if old[slot] != new[slot]:
                ops.put(name, pack(fid, slot), value(new[slot]))
        for slot in range(common, len(new)):
            ops.put(name, pack(fid, slot), value(new[slot]))
        for slot in range(common, len(old)):
            ops.remove(name, pack(fid, slot))

    @staticmethod
    def _diff_table(fid: int, old: list[int], new: list[int], ops: Ops) -> None:
        """A Maglev table into lb_maglev: only the chunks in which a slot changed."""
        n = CHUNK_SLOTS
        pack = _SLOT_KEY.pack
        for chunk in range(-(-len(new) // n)):
            part = new[chunk * n : (chunk + 1) * n]
            if part != old[chunk * n : (chunk + 1) * n]:
                ops.put("lb_maglev", pack(fid, chunk), _CHUNK.pack(*part, *[0] * (n - len(part))))
        for chunk in range(-(-len(new) // n), -(-len(old) // n)):
            ops.remove("lb_maglev", pack(fid, chunk))

    def _ref_backend(self, bid: int, value: bytes, ops: Ops) -> None:
        count = self.backend_refs.get(bid, 0)
        self.backend_refs[bid] = count + 1
        if count == 0 or self.backend_values.get(bid) != value:
            self.backend_values[bid] = value
            ops.put("lb_backends", _U32.pack(bid), value)

    def _unref_backend(self, bid: int, ops: Ops) -> None:
        count = self.backend_refs.get(bid, 0) - 1
        if count > 0:
            self.backend_refs[bid] = count
            return
        self.backend_refs.pop(bid, None)
        self.backend_values.pop(bid, None)
        ops.remove("lb_backends", _U32.pack(bid))

    # --- operations -> kernel ------------------------------------------------------------------

    def write(self, ops: Ops) -> None:
        for name in MAP_NAMES:  # what the service entries point at goes in first
            items = ops.updates[name]
            if items:
                _update_batch(self.tables[name], items)
                MAP_OPS.labels("update").inc(len(items))
        for name in reversed(MAP_NAMES):  # and out last
            keys = ops.deletes[name]
            if keys:
                _delete(self.tables[name], keys)
                MAP_OPS.labels("delete").inc(len(keys))

    def flush(self) -> None:
        """Apply and write one chunk of what is pending; the rest on the loop's next turn.

        A chunk is applied and written without a yield, so the maps always hold whole
        services, backends and tables before the entries that point at them. A key changed
        again while it waits keeps its place and takes the newest record (never an older
        one after a newer)."""
        if self._flush_handle is not None:  # this call, or one queued that this one does
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self.pending:
            self._release_gc()
            return
        if len(self.pending) <= FLUSH_CHUNK:
            chunk, self.pending = self.pending, {}
        else:
            keys = list(itertools.islice(self.pending, FLUSH_CHUNK))
            chunk = {k: self.pending.pop(k) for k in keys}
        with FLUSH_SECONDS.time():
            ops = Ops()
            for key, record in chunk.items():
                self._apply(key, record, ops)
            try:
                self.write(ops)
            except OSError as exc:
                # a full map: what could not be written is retried with the next change
                self.log.error("lb map update failed", error=str(exc))
        if not self.pending:
            self._release_gc()
        self._schedule()

    def _release_gc(self) -> None:
        if self._gc_held:
            self._gc_held = False
            gcpause.release(freeze=False)

    def _schedule(self) -> None:
        if self.pending and self._flush_handle is None:
            # runs once the loop has served what else is ready: one chunk per turn
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    async def drain(self) -> None:
        """Everything pending in the maps, a chunk per turn of the loop."""
        while self.pending:
            self._schedule()
            await asyncio.sleep(0)

    def prune(self) -> int:
        """Once the snapshot is in: remove service entries a previous agent left for services
        deleted while no agent ran (their slots and tables go with the next reuse of the id)."""
        wanted = {
            k for frontends in self.installed.values() for f in frontends.values() for k in f.keys
        }
        table = self.tables["lb_services"]
        stale = {bytes(k) for k in list(table.keys()) if bytes(k) not in wanted}
        if stale:
            _delete(table, stale)
        return len(stale)

    # --- bus ------------------------------------------------------------------------------------

    def on_record(self, event: KVEvent) -> None:
        """A ``services`` entry (a shard of records, or a format-1 record): only the services
        whose record bytes changed are decoded and applied (shared/services_bucket.py)."""
        errors = self.view.errors
        if not self._gc_held:
            gcpause.hold()
            self._gc_held = True
        for key, value in self.view.update(event.key, event.value):
            record: LBService | None = None
            if value is not None:
                try:
                    record = _decode_record(value)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    BAD_RECORDS.inc()
                    record = None  # a record nobody can read takes its service out
            self.pending[key] = record
        if self.view.errors != errors:
            BAD_RECORDS.inc()
            self.log.error("services shard does not decode; its services removed", key=event.key)
        # runs once the watch has drained what arrived together: one batch per burst
        self._schedule()

    def on_node(self, event: KVEvent) -> None:
        token = subjects.node_token(event.key)
        if event.value is not None:
            self.members.add(token)
        else:
            self.members.discard(token)
        self.on_underlays()

    def on_underlays(self) -> None:
        """A member or a recorded underlay address changed: node ports follow the nodes."""
        ips = {self.underlays[t] for t in self.members if t in self.underlays}
        if ips == self.node_ips:
            return
        self.node_ips = ips
        for key, record in self.records.items():
            if any(f.node_port for f in record.frontends):
                self.pending[key] = record
        self._schedule()

    async def follow(self, kv: KeyValue, handle: Callable[[KVEvent], None]) -> None:
        async def synced() -> None:
            await self.drain()  # prune below must see the whole snapshot installed
            if handle == self.on_record and not self.synced.is_set():
                self.prune()
                self.synced.set()

        await kv_watch.follow(kv, handle, synced)

    async def run(self, services: KeyValue, nodes: KeyValue) -> None:
        await asyncio.gather(
            self.follow(nodes, self.on_node), self.follow(services, self.on_record)
        )

    # --- introspection --------------------------------------------------------------------------

    def dump(self) -> list[dict[str, Any]]:
        """The maps as the kernel has them (not this process's idea of them)."""
        backends = {}
        for k, v in self.tables["lb_backends"].items():
            ip, port, flags = _BACKEND.unpack(bytes(v))
            backends[_U32.unpack(bytes(k))[0]] = (
                f"{IPv4Address(ip)}:{int.from_bytes(port, 'big')}"
                + ("(terminating)" if flags & TERMINATING else "")
            )
        slots: dict[int, list[tuple[int, int]]] = {}
        for k, v in self.tables["lb_slots"].items():
            fid, slot = _SLOT_KEY.unpack(bytes(k))
            slots.setdefault(fid, []).append((slot, _U32.unpack(bytes(v))[0]))
        maglev_chunks: dict[int, dict[int, tuple[int, ...]]] = {}
        for k, v in self.tables["lb_maglev"].items():
            fid, chunk = _SLOT_KEY.unpack(bytes(k))
            maglev_chunks.setdefault(fid, {})[chunk] = _CHUNK.unpack(bytes(v))
        owners = {f.id: key for key, record in self.records.items() for f in record.frontends}
        rows = []
        for k, v in self.tables["lb_services"].items():
            ip, port, proto = _SERVICE_KEY.unpack(bytes(k))
            fid, count, affinity, size, algorithm = _SERVICE_VALUE.unpack(bytes(v))
            # the slots of the table the kernel holds (those of chunks present, below its size)
            table = [
                b
                for c, part in maglev_chunks.get(fid, {}).items()
                for slot, b in enumerate(part, c * CHUNK_SLOTS)
                if slot < size
            ]
            chosen = (
                sorted(set(table))
                if algorithm == ALG_MAGLEV
                else [b for _, b in sorted(slots.get(fid, []))]
            )
            rows.append(
                {
                    "frontend": f"{IPv4Address(ip)}:{int.from_bytes(port, 'big')}",
                    "protocol": protocols.NAMES.get(proto, str(proto)),
                    "id": fid,
                    "service": owners.get(fid, ""),
                    "algorithm": "maglev" if algorithm == ALG_MAGLEV else "random",
                    "backends": count,
                    "table_size": size if algorithm == ALG_MAGLEV else 0,
                    "maglev_entries": len(table) if algorithm == ALG_MAGLEV else 0,
                    "affinity_timeout": affinity,
                    "backend_addresses": [backends.get(b, f"#{b}?") for b in chosen],
                }
            )
        rows.sort(key=lambda r: (r["service"], r["frontend"]))
        return rows


def _update_batch(table: Any, items: dict[bytes, bytes]) -> None:
    if not hasattr(table, "items_update_batch"):  # a plain dict (unit tests)
        table.update(items)
        return
    keys = list(items)
    key_type, leaf_type = table.Key, table.Leaf
    for start in range(0, len(keys), 65536):
        chunk = keys[start : start + 65536]
        n = len(chunk)
        ckeys = (key_type * n).from_buffer_copy(b"".join(chunk))
        cvalues = (leaf_type * n).from_buffer_copy(b"".join(items[k] for k in chunk))
        try:
            table.items_update_batch(ckeys, cvalues)
        except Exception as exc:  # bcc raises a bare Exception
            raise OSError(str(exc)) from exc


def _delete(table: Any, keys: set[bytes]) -> None:
    if not hasattr(table, "items_delete_batch"):
        for k in keys:
            table.pop(k, None)
        return
    key_type = table.Key
    for k in keys:  # one by one: a batch delete stops at the first key already gone
        with contextlib.suppress(KeyError):
            del table[key_type.from_buffer_copy(k)]


def open_tables(bpf: Any) -> dict[str, Any]:
    return {name: bpf.get_table(name) for name in MAP_NAMES}
