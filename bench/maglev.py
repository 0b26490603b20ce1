"""Maglev at scale: table sizes per service, their memory in the kernel, spread and disruption.

    sudo .venv/bin/python bench/maglev.py [--services 20000]

1. Spread and disruption, from the tables every agent computes (``shared/maglev.py``; a
   flow's slot is a uniform hash of its tuple, so a backend's share of flows is its share of
   slots): each backend's share against even for 2 to 64 backends; the slots of other
   backends that move when one of 10 backends is removed (each of the 10 in turn, 5 seeds),
   at the size chosen per service and at the former fixed 16,381.
2. Memory: a two-node cluster (``membrane up``, removed with ``down --purge``) gets
   ``--services`` Services with two backends each (EndpointSlices, Maglev selection) through
   the lb service's apply endpoint (in requests of 2,000); the time until every service entry
   is in both nodes' maps, then the kernel's own count of each lb map's memory (``memlock``
   of the map's fdinfo) per node, and a sample of the tables read back from the kernel
   against the computed ones, and the CPU time both agents spent meanwhile (each computes
   every table: ``MEMBRANE_MAGLEV_LIB=none`` runs the agents with the Python fill loop instead of
   the compiled one, for a side-by-side run).
   The baseline, in the same run: the former layout (one hash entry per slot, 16,381 slots
   per service), its bytes per entry measured on a scratch map of that layout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from bench.datapath import BPFFS, obj_get  # noqa: E402
from bench.lb import Membrane, Plan, TwoNodeCluster  # noqa: E402
from membrane.client import lb as lb_client  # noqa: E402
from shared import bpf_layouts, maglev  # noqa: E402
from shared.bus import Bus  # noqa: E402

GOAL_MEMORY_MB = 64.0
GOAL_SHARE = 0.02
GOAL_DISRUPTION = 0.01
OLD_SIZE = maglev.DEFAULT_SIZE
CHUNK = 2000
LB_MAPS = ("lb_services", "lb_backends", "lb_slots", "lb_maglev")


def spread(counts: list[int]) -> float:
    """The largest deviation of a backend's share from even, relative to even."""
    even = sum(counts) / len(counts)
    return max(abs(c - even) / even for c in counts)


def disruption(size: int, seeds: int = 5) -> tuple[float, float]:
    """(mean, worst) share of the other backends' slots that move when one of 10 goes."""
    values = []
    for seed in range(seeds):
        ids = [100 + 7 * i + seed for i in range(10)]
        before = maglev.table(ids, size, seed)
        for gone in ids:
            after = maglev.table([i for i in ids if i != gone], size, seed)
            moved = sum(1 for a, b in zip(before, after, strict=True) if a != gone and a != b)
            values.append(moved / size)
    return sum(values) / len(values), max(values)


def memlock(fd: int) -> int:
    """The kernel's count of a map's memory (its map_mem_usage), from the fd's fdinfo."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    raise RuntimeError("no memlock in fdinfo")


def old_layout_bytes_per_entry(entries: int = 200_000) -> float:
    """The former lb_maglev (hash, key (frontend id, slot), value one backend id, no
    preallocation): a scratch map of that layout filled with ``entries``, as the kernel counts
    it, minus the empty map (its buckets)."""
    from bcc import BPF

    bpf = BPF(
        text=b"""
        struct k { u32 id; u32 slot; };
        BPF_F_TABLE("hash", struct k, u32, old_maglev, 4194304, BPF_F_NO_PREALLOC);
        """
    )
    try:
        table = bpf[b"old_maglev"]
        empty = memlock(table.map_fd)
        keys = (table.Key * entries)()
        values = (table.Leaf * entries)()
        for i in range(entries):
            keys[i].id, keys[i].slot = i // OLD_SIZE, i % OLD_SIZE
            values[i] = i
        table.items_update_batch(keys, values)
        return (memlock(table.map_fd) - empty) / entries
    finally:
        bpf.cleanup()


def agent_pids(cluster: TwoNodeCluster) -> list[int]:
    """The cluster's datapath agents (processes whose environment names its state directory)."""
    marker = f"MEMBRANE_STATE_DIR={cluster.state}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if b"datapath" in cmdline and marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return sorted(pids)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fill(cluster: TwoNodeCluster, n: int) -> dict[str, Any]:
    lb = Membrane(cluster, Plan(cluster.octet, n, algorithm="maglev"))
    bus = await Bus.connect(cluster.nats_url, "bench", retry_for=10)
    agents = agent_pids(cluster)
    cpu_before = [cpu_seconds(pid) for pid in agents]
    try:
        # in requests of CHUNK services, each in both nodes' maps before the next: where a
        # run stops shows (docs/scale.md: the lb service's publish acknowledgement timed out
        # here after 4,000 services, in one request or in these, random selection too)
        seconds = 0.0
        for first in range(0, n, CHUNK):
            seconds += await lb.bulk(bus, first, min(n, first + CHUNK))
            print(f"  {min(n, first + CHUNK)} services in both nodes' maps", flush=True)
        cpu = [cpu_seconds(pid) - before for pid, before in zip(agents, cpu_before, strict=True)]
        sample = [await lb_client.get(bus, "bench", f"s{i}") for i in (0, n // 2, n - 1)]
    finally:
        await bus.close()
    memory = {}
    for node in lb.nodes:
        fds = {m: obj_get(BPFFS / "membrane" / node / m) for m in LB_MAPS}
        try:
            memory[node] = {m: memlock(fd) for m, fd in fds.items()}
            for record in sample:  # the kernel's table is the one every node computes
                f = record.frontends[0]
                want = maglev.table(
                    [b.id for b in f.backends], record.maglev_size, record.maglev_seed
                )
                if kernel_table(fds["lb_maglev"], f.id, record.maglev_size) != want:
                    raise RuntimeError(f"{node}: table of {record.name} differs")
        finally:
            for fd in fds.values():
                os.close(fd)
    return {"seconds": seconds, "memory": memory, "size": sample[0].maglev_size, "cpu": cpu}


def kernel_table(fd: int, fid: int, size: int) -> list[int]:
    from bench.datapath import MapEntry

    n = bpf_layouts.LB_MAGLEV_CHUNK_SLOTS
    table: list[int] = []
    for chunk in range(-(-size // n)):
        value = MapEntry(fd, bpf_layouts.LB_SLOT_KEY.pack(fid, chunk), n * 4).get()
        if value is None:
            raise RuntimeError(f"frontend {fid}: chunk {chunk} missing")
        table.extend(bpf_layouts.LB_MAGLEV_CHUNK.unpack(value))
    return table[:size]


def run(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/maglev.py needs root (namespaces, BPF)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    print("1. spread and disruption (the tables every agent computes)", flush=True)
    worst_share = 0.0
    for backends in (2, 3, 5, 10, 16, 17, 64):
        size = maglev.size_for(backends)
        ids = list(range(1, backends + 1))
        share = spread(list(Counter(maglev.table(ids, size, seed=7)).values()))
        worst_share = max(worst_share, share)
        print(f"  {backends:>3} backends: table {size:>6}, largest share off even {share:.2%}")
    new_size = maglev.size_for(10)
    new_mean, new_worst = disruption(new_size)
    old_mean, old_worst = disruption(OLD_SIZE)
    small_mean, small_worst = disruption(maglev.next_prime(maglev.SPREAD * 10))
    print(
        f"  one of 10 backends removed, other backends' slots moved: table {new_size} (chosen) "
        f"mean {new_mean:.2%} worst {new_worst:.2%}; {OLD_SIZE} (former fixed) mean "
        f"{old_mean:.2%} worst {old_worst:.2%}; {maglev.next_prime(maglev.SPREAD * 10)} "
        f"(100 per backend only) mean {small_mean:.2%} worst {small_worst:.2%}",
        flush=True,
    )
    print("2. memory: the former layout's bytes per entry (scratch map)", flush=True)
    per_entry = old_layout_bytes_per_entry()
    with tempfile.TemporaryDirectory(prefix="membrane-maglev-bench-") as tmp:
        cluster = TwoNodeCluster(Path(tmp) / "state")
        print(f"starting a two-node cluster {cluster.name} ...", flush=True)
        cluster.up()
        try:
            res = uvloop.run(fill(cluster, args.services))
        finally:
            cluster.down()
    n = args.services
    old_mb = per_entry * OLD_SIZE * n / 1e6
    old_sized_mb = per_entry * res["size"] * n / 1e6
    print()
    print(f"== Maglev, {n} services x 2 backends (load average {os.getloadavg()[0]:.2f}) ==")
    print(
        f"applied through the apply endpoint in requests of {CHUNK}, to every node's maps: "
        f"{res['seconds']:.2f} s; the agents' CPU meanwhile "
        f"{' and '.join(f'{c:.2f}' for c in res['cpu'])} s (Maglev fill loop "
        f"{'compiled' if maglev.COMPILED else 'in Python'}, the same in the agents)"
    )
    for node, maps in res["memory"].items():
        total = sum(maps.values()) / 1e6
        parts = ", ".join(f"{m} {v / 1e6:.1f}" for m, v in maps.items())
        print(
            f"{node}: lb maps {total:.1f} MB ({parts}) (goal <= {GOAL_MEMORY_MB:g} MB: "
            f"{'met' if total <= GOAL_MEMORY_MB else 'NOT met'}); former layout, lb_maglev "
            f"alone: {old_mb:,.0f} MB at {OLD_SIZE} slots ({old_mb / total:.0f}x), "
            f"{old_sized_mb:.1f} MB at {res['size']} slots one entry each "
            f"({old_sized_mb / (maps['lb_maglev'] / 1e6):.1f}x this lb_maglev)"
        )
    print(
        f"table size per two-backend service: {res['size']} (former {OLD_SIZE}); "
        f"former layout {per_entry:.1f} bytes per slot, now "
        f"{res['memory'][next(iter(res['memory']))]['lb_maglev'] / (n * res['size']):.1f}"
    )
    print(
        f"largest share off even, 2 to 64 backends: {worst_share:.2%} (goal <= "
        f"{GOAL_SHARE:.0%}: {'met' if worst_share <= GOAL_SHARE else 'NOT met'})"
    )
    print(
        f"one of 10 backends removed: {new_mean:.2%} of the other flows move, worst {new_worst:.2%}"
        f" (goal <= {GOAL_DISRUPTION:.0%}: {'met' if new_worst <= GOAL_DISRUPTION else 'NOT met'}"
        f"; former fixed {OLD_SIZE}: {old_mean:.2%}, {new_mean / old_mean:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--services", type=int, default=20000)
    run(parser.parse_args())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
