"""The ``membrane`` command. It reaches the services only over NATS, like any other client."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import uvloop

from membrane import (
    cli_credentials,
    cli_fqdn,
    cli_get,
    cli_k8s,
    cli_lb,
    cli_nodes,
    cli_observe,
    cli_policy,
    cli_policy_diff,
    cli_policy_suggest,
    cli_status,
    cli_ui,
    cli_workloads,
    cliutil,
    output,
    resources,
)
from membrane.client import identity
from membrane.registry import SERVICES
from membrane.state import DEFAULT_RANGES, ClusterInfo, StateDir
from shared import config, gcpause, log, malloc_tuning
from shared.bus import Bus, ServiceInfo, redact
from shared.errors import InvalidArgument, MembraneError
from shared.messages import AllocateReply, ReleaseReply

Command = Callable[[argparse.Namespace], int]


# --- local cluster ---------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from membrane import nodes, stack  # pyroute2 and the services: only for up and down

    state = cliutil.state_dir(args)
    given = {flag: getattr(args, flag) for flag in UP_DEFAULTS if getattr(args, flag) is not None}
    running = state.read_cluster() if state.supervisor_pid() is not None else None
    if running is not None:
        return _already_up(state, running, given)
    wanted = {**UP_DEFAULTS, **given}
    replicas = {name: entry.default_replicas for name, entry in SERVICES.items()}
    if args.identity_replicas is not None:
        replicas["identity"] = args.identity_replicas
    topology = nodes.Topology(
        name=str(wanted["name"]),
        nodes=int(wanted["nodes"]),
        underlay=ipaddress.IPv4Network(wanted["underlay_cidr"]),
        cluster_cidr=ipaddress.IPv4Network(wanted["cluster_cidr"]),
        service_cidr=ipaddress.IPv4Network(wanted["service_cidr"]),
    )
    started = time.monotonic()
    # as everywhere: the flag, else the environment; neither means "start our own"
    info = stack.up(
        state,
        cliutil.say,
        nats_url=args.nats_url or os.environ.get("MEMBRANE_NATS_URL"),
        redis_url=args.redis_url or os.environ.get("MEMBRANE_REDIS_URL"),
        replicas=replicas,
        topology=topology,
        routing=str(wanted["routing"]),
        use_tls=not args.plain,
    )
    cliutil.say(f"cluster is up ({time.monotonic() - started:.1f}s)")
    print()
    print(
        output.table(
            ["PART", "WHERE"],
            [
                ["nats", redact(info.nats_url) + (" (external)" if info.nats_external else "")],
                ["redis", redact(info.redis_url) + (" (external)" if info.redis_external else "")],
                *[[name, f"{count} replica(s)"] for name, count in replicas.items() if count],
                *[[node, "node (datapath agent)"] for node in topology.node_names()],
                ["state", str(state.root)],
                ["logs", str(state.logs)],
            ],
        )
    )
    print()
    print(
        "Next: `membrane pod create web --labels app=web`, `membrane pod list`, "
        "`membrane status`; stop with `membrane down`."
    )
    return 0


# what `up` starts unless told otherwise (its flags default to None: given or not matters)
UP_DEFAULTS: dict[str, object] = {
    "nodes": 2,
    "name": "membrane",
    "routing": "tunnel",
    "underlay_cidr": str(DEFAULT_RANGES[0]),
    "cluster_cidr": str(DEFAULT_RANGES[1]),
    "service_cidr": str(DEFAULT_RANGES[2]),
}


def _already_up(state: StateDir, info: ClusterInfo, given: dict[str, object]) -> int:
    """``up`` on a running cluster: nothing to do, or a refusal naming what differs (nodes,
    routing and ranges are fixed while it runs; `down` then `up` changes them and keeps
    identities, policies and services)."""
    have = {
        "nodes": info.nodes,
        "name": info.name,
        "routing": info.routing,
        "underlay_cidr": info.underlay_cidr,
        "cluster_cidr": info.cluster_cidr,
        "service_cidr": info.service_cidr,
    }
    differ = [k for k, v in given.items() if str(v) != str(have[k])]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (it runs {have[k]})" for k in differ)
        raise InvalidArgument(
            f"the cluster in {state.root} is already up; {flags}: run `membrane down` first, "
            "then `membrane up` with the new flags (identities, policies and services are kept)",
            field=f"--{differ[0].replace('_', '-')}",
        )
    cliutil.say(
        f"already up (state directory {state.root}): {info.nodes} node(s), {info.routing} routing"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from membrane import stack

    stack.down(cliutil.state_dir(args), cliutil.say, purge=args.purge)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = cliutil.state_dir(args)
    processes = state.processes()
    cluster = state.read_cluster()
    with_nodes = cluster is None or bool(cluster.nodes)

    async def collect(
        bus: Bus,
    ) -> tuple[list[ServiceInfo], dict[str, Any], cli_nodes.NodesView | None]:
        # one connection and one discovery for every part of the status
        found = await bus.discover(timeout=0.5)
        summary = await cli_status.gather(bus, found)
        return found, summary, await cli_nodes.fetch(bus) if with_nodes else None

    found, summary, node_view = cliutil.with_bus(args, collect)
    if cliutil.emit_structured(
        {
            "services": [
                {"name": s.name, "id": s.id, "version": s.version, "metadata": s.metadata}
                for s in found
            ],
            "processes": [
                {"name": p.name, "pid": p.pid, "running": p.running, "restarts": p.restarts}
                for p in processes
            ],
            **summary,
            **(cli_nodes.as_json(node_view) if node_view is not None else {}),
        },
        args.output,
    ):
        return 0
    by_name: dict[str, list[Any]] = {}
    for info in found:
        by_name.setdefault(info.name, []).append(info)
    rows = [
        [
            name,
            "up",
            len(infos),
            infos[0].version,
            ", ".join(i.metadata.get("replica", i.id) for i in infos),
        ]
        for name, infos in sorted(by_name.items())
    ]
    for name, entry in SERVICES.items():
        if entry.per_node and cluster is not None and not cluster.nodes:
            continue  # a local cluster without nodes runs no agent
        if entry.kubernetes_only:
            continue  # the local cluster has no Kubernetes API to bridge
        if entry.micro_name not in by_name:
            rows.append([entry.micro_name, "DOWN", 0, "-", f"no replica of {name} answers"])
    print(output.table(["SERVICE", "STATUS", "REPLICAS", "VERSION", "INSTANCES"], rows))
    if processes:
        print()
        now = time.time()
        print(
            output.table(
                ["PROCESS", "PID", "STATE", "RESTARTS", "UPTIME", "LOG"],
                [
                    [
                        p.name,
                        p.pid,
                        "running" if p.running else "restarting",
                        p.restarts,
                        f"{now - p.started_at:.0f}s",
                        p.log,
                    ]
                    for p in processes
                ],
            )
        )
    cli_status.print_cluster(summary)
    if node_view is not None and node_view.nodes:
        print()
        print(cli_nodes.render(node_view))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    entry = SERVICES[args.service]
    settings = config.load(entry.settings, args)
    gcpause.tune_for_service()
    malloc_tuning.tune_for_service()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(entry.run(settings))  # a faster event loop: services are all network I/O
    return 0


# --- identities ------------------------------------------------------------------------------


def cmd_identity_allocate(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> AllocateReply:
        return await identity.allocate(bus, args.labels, args.owner)

    reply = cliutil.with_bus(args, go)
    if args.output == "json":
        output.emit_json(reply)
    else:
        state = "new" if reply.new else "existing"
        print(f"{reply.identity.id}\t{state}\t{', '.join(reply.identity.labels)}")
    return 0


def cmd_identity_release(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> ReleaseReply:
        return await identity.release(bus, args.id, args.owner)

    reply = cliutil.with_bus(args, go)
    if args.output == "json":
        output.emit_json(reply)
    else:
        print(f"released identity {reply.id}; {reply.references} reference(s) left")
    return 0


# --- parser ----------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """Every parser of the tree: an argument none of them knows is reported by the
    subcommand it was given to, with that subcommand's usage (argparse leaves extras to the
    top level, which prints its own usage)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after the subcommand. Below the top their
    default is "absent", so that a value given before the subcommand is not overwritten."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    for flag, kwargs in GLOBAL_OPTIONS:
        if flag not in parser._option_string_actions:  # `run SERVICE` has its own --nats-url
            parser.add_argument(flag, **kwargs, default=default(GLOBAL_DEFAULTS.get(flag)))


GLOBAL_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    (
        "--state-dir",
        {
            "help": "local cluster state directory "
            "[env MEMBRANE_STATE_DIR, default /var/lib/membrane as root]"
        },
    ),
    (
        "--nats-url",
        {"help": "NATS to talk to [env MEMBRANE_NATS_URL, default: the local cluster's]"},
    ),
    ("--timeout", {"type": float, "help": "seconds to wait for NATS (default 5)"}),
]
GLOBAL_DEFAULTS: dict[str, object] = {"--timeout": 5.0}


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser``, depth first."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to one parser
                found.append(child)
                found.extend(_subparsers(child))
    return found


def build_parser(run_flags: bool | Collection[str] = True) -> argparse.ArgumentParser:
    """The whole command line; ``run_flags``: the settings flags of ``run SERVICE`` (True: of
    every service; or the names of the services to give them), which import the service's
    module. main() asks only for the service it runs: ``run identity`` importing the datapath
    (bcc, pyroute2) and the proxy as well cost every replica seconds of start-up under load."""
    parser = Parser(
        prog="membrane",
        description="Container networking with identity-based security and an eBPF datapath.",
    )
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the local cluster")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--identity-replicas", type=int, help="identity service replicas (default 2)")
    p.add_argument("--nodes", type=int, help="nodes to create (default 2)")
    p.add_argument("--name", help="cluster name, prefixes node names (default membrane)")
    p.add_argument("--underlay-cidr", help=f"(default {DEFAULT_RANGES[0]})")
    p.add_argument("--cluster-cidr", help=f"pod range (default {DEFAULT_RANGES[1]})")
    p.add_argument("--service-cidr", help=f"(default {DEFAULT_RANGES[2]})")
    p.add_argument(
        "--routing",
        choices=("tunnel", "native"),
        help="pod traffic between nodes: VXLAN tunnel carrying the identity (default), or "
        "native routes",
    )
    p.add_argument(
        "--no-tls",
        dest="plain",
        action="store_true",
        help="NATS and Redis in plain text (default: TLS only, with a CA of the cluster's own "
        "in the state directory)",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the local cluster and remove what it created")
    p.add_argument("--purge", action="store_true", help="also delete the state directory")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser(
        "status", help="services, replicas, processes, nodes and their latency matrix"
    )
    cliutil.output_flag(p, yaml=True)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("run", help="run one service in the foreground, as a container would")
    run_sub = p.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, entry in SERVICES.items():
        sp = run_sub.add_parser(name, help=entry.summary)
        if run_flags is True or (run_flags and name in run_flags):
            config.add_arguments(sp, entry.settings)
        sp.set_defaults(func=cmd_run, service=name)

    cli_workloads.add_parsers(sub)
    policy_sub = cli_policy.add_parsers(sub)
    cli_policy_diff.add_parser(policy_sub)
    cli_policy_suggest.add_parser(policy_sub)
    cli_ui.add_parser(sub)
    cli_observe.add_parser(sub)
    cli_lb.add_parsers(sub)
    cli_credentials.add_parser(sub)
    cli_k8s.add_parser(sub)
    cli_get.add_parsers(sub)
    cli_fqdn.add_parser(sub)

    p = sub.add_parser("identity", help="security identities")
    id_sub = p.add_subparsers(dest="identity_command", required=True, metavar="ACTION")
    cli_get.add_listing(
        id_sub,
        resources.IDENTITIES,
        list="every identity, reserved ones included",
        get="identities by number",
    )
    sp = id_sub.add_parser("allocate", help="the identity of a label set (allocated if new)")
    sp.add_argument(
        "labels",
        nargs="+",
        metavar="KEY=VALUE",
        help="labels, k8s: by default; reserved:NAME for reserved identities",
    )
    sp.add_argument("--owner", default="cli", help="who holds the reference (default cli)")
    cliutil.output_flag(sp)
    sp.set_defaults(func=cmd_identity_allocate)
    sp = id_sub.add_parser("release", help="drop a reference taken with allocate")
    sp.add_argument("id", type=int)
    sp.add_argument("--owner", default="cli")
    cliutil.output_flag(sp)
    sp.set_defaults(func=cmd_identity_release)
    for child in _subparsers(parser):
        add_global_options(child, top=False)
    return parser


def located(exc: MembraneError) -> str:
    """The error with its location said once: a message that names its field already (the
    policy parser's do, with the file and document) is not prefixed with it again."""
    if exc.field and f"{exc.field}:" in exc.message:
        return exc.message
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_flags = {a for a in argv if a in SERVICES} if "run" in argv else False
    args = build_parser(run_flags).parse_args(argv)
    if args.func is not cmd_run:
        # the CLI reports failures itself; library chatter (retries) would only be noise
        log.configure("error", "console")
    func: Command = args.func
    try:
        return func(args)
    except MembraneError as exc:
        print(f"error: {located(exc)}", file=sys.stderr)
        # a command whose exit code 1 means an answer (explain: dropped) gives errors another
        code: int = getattr(args, "error_exit", 1)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `membrane get pods | head`: the reader is gone, as for kubectl
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
