"""Where the CPU of ``membrane apply -f`` of a bulk goes: every process of a two-node cluster.

    sudo .venv/bin/python bench/lb_cpu.py [--services 20000] [--runs 1] [--py-spy DIR]

Starts a fresh two-node cluster per run (``membrane up``, removed with ``membrane down
--purge``), writes the bulk YAML file of ``bench/lb.py`` (Services with an EndpointSlice of
two backends each), and runs ``membrane apply -f`` of it while polling both nodes' maps as
``bench/lb.py --bulk-only`` does. Prints the wall time to every entry in both nodes' maps, the
CLI's return, and the CPU seconds (user + system, from /proc/<pid>/stat and the CLI's rusage)
each process spent from the apply's start until every entry was in, plus 1 s (so that what
reads the records after the last one lands is counted). With ``--py-spy DIR`` the lb service
and the first agent are sampled meanwhile (py-spy record, raw stacks for flame graphs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from bench.lb import Membrane, Plan, TwoNodeCluster, _Dumper, wait_all  # noqa: E402
from membrane.state import StateDir  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def processes(cluster: TwoNodeCluster) -> dict[str, int]:
    return {p.name: p.pid for p in StateDir(cluster.state).processes() if p.running}


class Timeline:
    """An observer on the bus in a thread of its own: when the apply requests and the
    ``services`` writes went by (core subscriptions: what was published, not delivered)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, str, int]] = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(20)

    async def _start(self) -> None:
        from shared.bus import Bus

        self.bus = await Bus.connect(self.url, "bench-timeline", retry_for=10)

        async def on(msg: Any) -> None:
            self.seen.append((time.perf_counter(), msg.subject, len(msg.data)))

        await self.bus.nc.subscribe("$KV.services.>", cb=on)
        await self.bus.nc.subscribe("membrane.lb.apply", cb=on)
        await self.bus.nc.flush()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.bus.close(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def summary(self, started: float) -> str:
        applies = [t - started for t, s, _ in self.seen if s == "membrane.lb.apply"]
        records = [(t - started, n) for t, s, n in self.seen if s.startswith("$KV.services.")]
        if not records:
            return f"apply requests at {', '.join(f'{a:.2f}' for a in applies)} s; no records"
        return (
            f"apply requests at {', '.join(f'{a:.2f}' for a in applies)} s; "
            f"{len(records)} services messages ({sum(n for _, n in records) / 1e6:.1f} MB) "
            f"from {records[0][0]:.2f} to {records[-1][0]:.2f} s"
        )


def once(
    cluster: TwoNodeCluster, n: int, workdir: Path, spy: Path | None, tag: str
) -> dict[str, Any]:
    plan = Plan(cluster.octet, n)
    lb = Membrane(cluster, plan)
    bulk_file = workdir / "bulk.yaml"
    bulk_file.write_text(yaml.dump_all(plan.documents(0, n), Dumper=_Dumper))
    procs = processes(cluster)
    spies = []
    if spy is not None:
        spy.mkdir(parents=True, exist_ok=True)
        agents = sorted(k for k in procs if "datapath" in k or "agent" in k)
        for name in [*(k for k in procs if k.startswith("lb")), *agents[:1]]:
            if name in procs:
                spies.append(
                    subprocess.Popen(
                        [
                            str(Path(sys.executable).parent / "py-spy"),
                            "record",
                            "--nonblocking",
                            "-r",
                            "100",
                            "-f",
                            "raw",
                            "-o",
                            str(spy / f"{tag}-{name}.txt"),
                            "-p",
                            str(procs[name]),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        time.sleep(1.0)
    entries = lb.service_entries(0, n)
    timeline = Timeline(cluster.nats_url)
    before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    command = cluster.command("apply", "-f", str(bulk_file))
    if spy is not None:
        command = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--subprocesses",
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            str(spy / f"{tag}-cli.txt"),
            "--",
            *command,
        ]
    proc = subprocess.Popen(
        command,
        env=cluster.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    done = wait_all(entries, started + 300)
    _, err = proc.communicate()
    returned = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    time.sleep(1.0)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = {name: cpu_seconds(pid) for name, pid in procs.items()}
    for s in spies:
        s.send_signal(2)
    for s in spies:
        s.wait(timeout=30)
    cpu = {name: after[name] - before[name] for name in procs}
    timeline.close()
    cli = (usage.ru_utime + usage.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    if spies:  # py-spy itself is a child: its CPU is not the CLI's
        cli = float("nan")
    return {
        "maps": done - started,
        "returned": returned,
        "cli": cli,
        "cpu": cpu,
        "load": load,
        "timeline": timeline.summary(started),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--py-spy", type=Path, default=None)
    parser.add_argument("--tag", default="run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="membrane-lbcpu-") as tmp:
            cluster = TwoNodeCluster(Path(tmp) / "state")
            cluster.up()
            try:
                time.sleep(2.0)  # start-up work settles
                res = once(cluster, args.services, Path(tmp), args.py_spy, f"{args.tag}{run}")
            finally:
                cluster.down()
        cpu = res["cpu"]
        total = sum(cpu.values()) + (res["cli"] if res["cli"] == res["cli"] else 0)
        print(
            f"[{args.tag} {run}] every entry in both nodes' maps {res['maps']:.2f} s, "
            f"CLI returned {res['returned']:.2f} s, load {res['load']:.2f}; CPU s: CLI "
            f"{res['cli']:.2f}, "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
            + f"; total {total:.2f}\n    bus: {res['timeline']}",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()
