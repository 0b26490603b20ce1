"""The pods of Kubernetes' netpol e2e suite on a 2-node membrane cluster, and how to probe them.

Namespaces x, y, z (labelled ``ns: <name>``, plus ``kubernetes.io/metadata.name``) each hold
pods a, b, c (labelled ``pod: <name>``), spread over both nodes; every pod serves TCP and UDP
on ports 80 and 81, with the upstream container port names (``serve-80-tcp`` ...). One
``netprobe.py agent`` process per pod serves those ports for the whole module and answers each
probe request by trying all its targets at once, so a round of the matrix costs one bounded
timeout whatever its size. SCTP is probed only where the kernel has it.

A :class:`Reachability` is upstream's truth table (``NewReachability`` with ``Expect``,
``ExpectPeer``, ``ExpectAllIngress``, ``ExpectAllEgress``), so a ported case reads like its
original.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import membrane_command
from tests.e2e.cluster import PROBE, Cluster

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
NODE_OF = {"a": 0, "b": 1, "c": 0}  # index into cluster.nodes: every case crosses nodes
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
PROBE_TIMEOUT = 1.0  # per connection; a round of the matrix takes about this long
SETTLE = 20.0  # how long a policy change may take to reach every node's maps


def sctp_missing() -> str:
    """Why SCTP cannot be probed here ("" when it can)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError as exc:
        return f"the kernel has no SCTP ({exc.strerror}): SCTP cases are skipped"
    return "membrane's datapath does not parse SCTP ports yet: SCTP cases are skipped"


@dataclass(frozen=True)
class Pod:
    ns: str
    name: str
    ip: str
    node: str

    def __str__(self) -> str:
        return f"{self.ns}/{self.name}"


Key = tuple[str, str]  # (from "ns/pod", to "ns/pod")


class Reachability:
    """Upstream's truth table: every ordered pair of pods, allowed or not (loopback ignored)."""

    def __init__(self, pods: Iterable[Pod], default: bool) -> None:
        self.pods = [str(p) for p in pods]
        self.allowed: dict[Key, bool] = {
            (a, b): default for a in self.pods for b in self.pods if a != b
        }

    def expect(self, src: str, dst: str, allowed: bool) -> Reachability:
        if src != dst:
            self.allowed[(src, dst)] = allowed
        return self

    def expect_peer(
        self,
        src_ns: str = "",
        src_pod: str = "",
        dst_ns: str = "",
        dst_pod: str = "",
        *,
        allowed: bool,
    ) -> Reachability:
        """Every pair whose ends match the (possibly empty = any) namespace and pod names."""
        for a, b in self.allowed:
            if _matches(a, src_ns, src_pod) and _matches(b, dst_ns, dst_pod):
                self.allowed[(a, b)] = allowed
        return self

    def expect_all_ingress(self, pod: str, allowed: bool) -> Reachability:
        for a, b in self.allowed:
            if b == pod:
                self.allowed[(a, b)] = allowed
        return self

    def expect_all_egress(self, pod: str, allowed: bool) -> Reachability:
        for a, b in self.allowed:
            if a == pod:
                self.allowed[(a, b)] = allowed
        return self


def _matches(pod: str, ns: str, name: str) -> bool:
    pod_ns, _, pod_name = pod.partition("/")
    return (not ns or ns == pod_ns) and (not name or name == pod_name)


Probe = tuple[str, int]  # (protocol, port)
Matrix = dict[tuple[str, str, str, int], bool]  # (from, to, protocol, port) -> answered


@dataclass
class World:
    """The 9 pods, the probe agent in each, and the matrix they observe."""

    cluster: Cluster
    pods: list[Pod]
    agents: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def pod(self, ref: str) -> Pod:
        (found,) = [p for p in self.pods if str(p) == ref]
        return found

    def observe(self, probes: Iterable[Probe]) -> Matrix:
        """One round: every pod tries all its targets at once, all pods in parallel."""
        probes = list(probes)
        for src in self.pods:
            targets = [
                f"{'udp:' if proto == 'UDP' else ''}{dst.ip}:{port}"
                for dst in self.pods
                if dst != src
                for proto, port in probes
            ]
            stdin = self.agents[str(src)].stdin
            assert stdin is not None
            stdin.write(f"{PROBE_TIMEOUT} {' '.join(targets)}\n")
            stdin.flush()
        by_ip = {p.ip: str(p) for p in self.pods}
        seen: Matrix = {}
        for src in self.pods:
            out = self.agents[str(src)].stdout
            assert out is not None
            line = out.readline()
            assert line, f"the probe agent in {src} died"
            for target, outcome in json.loads(line).items():
                proto = "UDP" if target.startswith("udp:") else "TCP"
                ip, _, port = target.removeprefix("udp:").rpartition(":")
                # a dropped TCP SYN times out; a refused one would mean a server is missing
                assert outcome in ("ok", "timeout"), f"{src} -> {target}: {outcome}"
                seen[(str(src), by_ip[ip], proto, int(port))] = outcome == "ok"
        return seen

    def settle(self, want: Reachability, probes: Iterable[Probe], what: str) -> float:
        """Observe until the packets agree with ``want``; the seconds it took. Fails with the
        differences once ``SETTLE`` has passed."""
        probes = list(probes)
        expected: Matrix = {
            (a, b, proto, port): ok for (a, b), ok in want.allowed.items() for proto, port in probes
        }
        start = time.monotonic()
        while True:
            seen = self.observe(probes)
            if seen == expected:
                return time.monotonic() - start
            if time.monotonic() - start > SETTLE:
                raise AssertionError(f"{what}: packets disagree\n" + diff(expected, seen))

    def start_agents(self, scratch: Path) -> None:
        serve = [str(p) for p in PORTS] + [f"udp:{p}" for p in PORTS]
        for pod in self.pods:
            errors = scratch / f"agent-{pod.ns}-{pod.name}.stderr"
            proc = subprocess.Popen(
                membrane_command(
                    "pod",
                    "exec",
                    "-n",
                    pod.ns,
                    pod.name,
                    "--",
                    sys.executable,
                    str(PROBE),
                    "agent",
                    *serve,
                ),
                env=self.cluster.env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors.open("w"),
                text=True,
            )
            self.agents[str(pod)] = proc
        for pod in self.pods:
            out = self.agents[str(pod)].stdout
            assert out is not None
            errors = scratch / f"agent-{pod.ns}-{pod.name}.stderr"
            assert out.readline().strip() == "ready", errors.read_text()

    def stop_agents(self) -> None:
        for proc in self.agents.values():
            proc.kill()
            proc.wait()


def diff(want: Matrix, got: Matrix) -> str:
    rows = [
        f"  {src:>4} -> {dst:<4} {port}/{proto}  expected "
        f"{'allowed' if want[k] else 'blocked'}, got {_word(got.get(k))}"
        for k in sorted(want)
        if want[k] != got.get(k)
        for src, dst, proto, port in [k]
    ]
    return f"{len(rows)} of {len(want)} connections differ:\n" + "\n".join(rows)


def _word(allowed: bool | None) -> str:
    return {True: "allowed", False: "blocked", None: "nothing"}[allowed]


def manifest(nodes: list[str]) -> str:
    docs: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"ns": ns}},
            }
        )
    ports = [
        {"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
        for port in PORTS
        for proto in PROTOCOLS
    ]
    for ns in NAMESPACES:
        for name in POD_NAMES:
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                    "spec": {
                        "nodeName": nodes[NODE_OF[name]],
                        "containers": [{"name": "cont", "ports": ports}],
                    },
                }
            )
    return "\n---\n".join(json.dumps(d) for d in docs)


def world_pods(cluster: Cluster) -> list[Pod]:
    listed = {(p["namespace"], p["name"]): p for p in cluster.json("pod", "list", "-A")}
    return [
        Pod(ns, name, str(listed[(ns, name)]["ip"]), str(listed[(ns, name)]["node"]))
        for ns in NAMESPACES
        for name in POD_NAMES
    ]
