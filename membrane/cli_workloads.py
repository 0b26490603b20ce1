"""CLI commands for workloads: ``pod``, ``apply``, ``delete`` and ``bpf``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import yaml

from membrane import cli_get, cli_pod_label, output, resources
from membrane.client import files, workloads
from membrane.cliutil import emit_structured, output_flag, parse_labels, with_bus
from shared import agent_api, gcpause, manifests
from shared import apply as apply_path
from shared.agent_api import DumpReply, DumpRequest
from shared.bus import Bus
from shared.errors import InvalidArgument
from shared.manifests import PodDoc
from shared.messages import Endpoint


def _pod_row(e: Endpoint) -> list[Any]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(e.labels.items()))
    return [e.namespace, e.name, e.node, e.ip, e.identity, labels]


def cmd_pod_create(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels or "")
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": args.name, "namespace": args.namespace, "labels": labels},
        "spec": {"containers": [{"name": "main"}]},
    }
    if args.service_account:
        manifest["spec"]["serviceAccountName"] = args.service_account  # type: ignore[index]
    (pod,) = manifests.load(yaml.safe_dump(manifest), "pod create")
    assert isinstance(pod, PodDoc)

    async def go(bus: Bus) -> Endpoint:
        return await workloads.create_pod(bus, pod, args.node or "")

    endpoint = with_bus(args, go)
    if not emit_structured(endpoint, args.output):
        # kubectl's line for what create/apply/delete did is KIND/NAME VERB (the namespace is
        # the one the command was given), so pods read as apply's and deployments' do
        print(
            f"pod/{endpoint.name} created on {endpoint.node}: "
            f"{endpoint.ip}, identity {endpoint.identity}"
        )
    return 0


def cmd_pod_delete(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> None:
        for name in args.names:
            for pod in await workloads.resolve(bus, name, args.namespace):
                await workloads.delete_pod(bus, pod.namespace, pod.name)
                print(f"pod/{pod.name} deleted")  # kubectl's KIND/NAME VERB, as apply's

    with_bus(args, go)
    return 0


def split_exec_command(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """The options given after the pod name (``pod exec web -n prod -- CMD``, kubectl's
    habit: argparse leaves them in the command) and the command after ``--``."""
    tokens = list(tokens)
    if "--" not in tokens:
        return [], tokens
    cut = tokens.index("--")
    return tokens[:cut], tokens[cut + 1 :]


def _exec_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="membrane pod exec NAME", add_help=False)
    parser.add_argument("-n", "--namespace")
    return parser


def cmd_pod_exec(args: argparse.Namespace) -> int:
    options, command = split_exec_command(args.command)
    late, unknown = _exec_options().parse_known_args(options)
    if unknown:
        raise InvalidArgument(
            f"unknown option {unknown[0]!r} before --; usage: pod exec NAME [-n NS] -- CMD",
            field="command",
        )
    namespace = late.namespace or args.namespace

    async def go(bus: Bus) -> Endpoint:
        return (await workloads.resolve(bus, args.name, namespace))[0]

    endpoint = with_bus(args, go)
    sys.stdout.flush()
    workloads.exec_in_pod(endpoint, command)
    return 0  # not reached: exec replaces this process


def cmd_apply(args: argparse.Namespace) -> int:
    text, source = files.load_file(args.filename)
    if len(text) < apply_path.STREAM_MIN_CHARS:
        return _act(args, workloads.apply, text, source)
    with gcpause.paused():  # a bulk of documents: nothing for the collector to find
        # a large file: its Services and EndpointSlices go to the lb service to be checked
        # while the rest is read (nothing changes until the whole file is valid)
        async def go(bus: Bus) -> list[str]:
            docs, sent = await apply_path.read_sending_services(bus, text, source)
            return await workloads.apply(bus, docs, source, services_sent=sent)

        lines = with_bus(args, go)
    for line in lines:
        print(line)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    return _with_manifests(args, workloads.delete)


def _with_manifests(
    args: argparse.Namespace,
    action: Callable[[Bus, Sequence[manifests.Document], str], Awaitable[list[str]]],
) -> int:
    """Validate the whole file first (nothing happens on any error), then act on it."""
    text, source = files.load_file(args.filename)
    return _act(args, action, text, source)


def _act(
    args: argparse.Namespace,
    action: Callable[[Bus, Sequence[manifests.Document], str], Awaitable[list[str]]],
    text: str,
    source: str,
) -> int:
    with gcpause.paused():  # a bulk of documents: nothing for the collector to find
        docs = manifests.load(text, source)

        async def go(bus: Bus) -> list[str]:
            return await action(bus, docs, source)

        lines = with_bus(args, go)
    for line in lines:
        print(line)
    return 0


# --- bpf introspection -----------------------------------------------------------------------

BPF_COLUMNS = {
    "endpoints": [
        "ifindex",
        "pod",
        "ip",
        "identity",
        "ingress_enforced",
        "egress_enforced",
        "policy_failed",
    ],
    "ipcache": ["cidr", "identity", "tunnel_endpoint"],
    "policy": ["direction", "identity", "protocol", "port", "prefixlen", "action", "rule"],
    "ct": [
        "scope",
        "src",
        "sport",
        "dst",
        "dport",
        "protocol",
        "packets",
        "bytes",
        "expires_in",
        "replied",
        "closing",
        "rule_id",
    ],
    "nat": [
        "kind",
        "client",
        "client_port",
        "frontend",
        "frontend_port",
        "protocol",
        "backend_id",
        "answered",
        "expires_in",
        "closing",
    ],
    "metrics": ["reason", "reason_name", "direction", "packets", "bytes"],
    "lb": [
        "service",
        "frontend",
        "protocol",
        "id",
        "algorithm",
        "backends",
        "table_size",
        "maglev_entries",
        "affinity_timeout",
        "backend_addresses",
    ],
}


def cmd_bpf(args: argparse.Namespace) -> int:
    table: str = args.table

    async def go(bus: Bus) -> list[DumpReply]:
        request = DumpRequest(table=table)
        if table == "policy":
            endpoint = (await workloads.resolve(bus, args.pod, args.namespace))[0]
            request = DumpRequest(table=table, namespace=endpoint.namespace, pod=endpoint.name)
            node_names = [endpoint.node]
        elif args.node:
            node_names = [await workloads.pick_node(bus, args.node)]
        else:
            node_names = sorted(await workloads.nodes(bus))
        replies = []
        for node in node_names:
            replies.append(
                await agent_api.call(
                    agent_api.default_socket(node),
                    "dump",
                    request,
                    DumpReply,
                    workloads.AGENT_TIMEOUT,
                )
            )
        return replies

    replies = with_bus(args, go)
    dumps = [(r.node, [_readable(row) for row in r.rows]) for r in replies]
    items = [{"node": node, "table": table, "rows": rows} for node, rows in dumps]
    if emit_structured({"items": items}, args.output):
        return 0
    columns = BPF_COLUMNS[table]
    for node, rows in dumps:
        print(f"# node {node}: {table} ({len(rows)} entries)")
        print(
            output.table(
                [c.upper() for c in columns],
                [[output.cell(r.get(c, "")) for c in columns] for r in rows],
            )
        )
    return 0


def _readable(row: dict[str, Any]) -> dict[str, Any]:
    """A map entry as every other output writes it: protocols by name, namespace/name."""
    out = dict(row)
    if isinstance(row.get("protocol"), int):
        out["protocol"] = output.protocol_name(row["protocol"])
    if isinstance(row.get("service"), str):  # the lb map's record key, namespace.name
        out["service"] = row["service"].replace(".", "/", 1)
    return out


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("pod", help="pods: network namespaces wired into a node")
    pod_sub = p.add_subparsers(dest="pod_command", required=True, metavar="ACTION")

    sp = pod_sub.add_parser("create", help="create a pod")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("--node", help="node to run on (default: the one with the fewest pods)")
    sp.add_argument("--labels", "-l", default="", help="k=v,k=v")
    sp.add_argument("--service-account", default="")
    output_flag(sp, yaml=True)
    sp.set_defaults(func=cmd_pod_create)

    sp = pod_sub.add_parser("delete", help="delete pods")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("-n", "--namespace", default="default")
    sp.set_defaults(func=cmd_pod_delete)

    cli_get.add_listing(pod_sub, resources.PODS, list="pods with node, IP and identity", get="pods")

    sp = pod_sub.add_parser("exec", help="run a command in a pod's network namespace")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    sp.set_defaults(func=cmd_pod_exec)

    cli_pod_label.add_parser(pod_sub)

    for name, func, verb in (
        ("apply", cmd_apply, "create or update"),
        ("delete", cmd_delete, "delete"),
    ):
        p = sub.add_parser(name, help=f"{verb} what a YAML file describes")
        p.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
        p.set_defaults(func=func)

    p = sub.add_parser("bpf", help="dump a node's live BPF maps")
    bpf_sub = p.add_subparsers(dest="table", required=True, metavar="MAP")
    for table, help_text in (
        ("endpoints", "endpoints and their enforcement flags"),
        ("ipcache", "address -> identity"),
        ("ct", "connection tracking"),
        ("nat", "service and node-port translations of connections, answered or not"),
        ("metrics", "packets and bytes by reason and direction"),
        ("lb", "service frontends, their backends and Maglev tables"),
    ):
        sp = bpf_sub.add_parser(table, help=help_text)
        sp.add_argument("--node", default="", help="one node (default: all)")
        output_flag(sp, yaml=True)
        sp.set_defaults(func=cmd_bpf)
    sp = bpf_sub.add_parser("policy", help="the policy entries installed for one pod")
    sp.add_argument("pod")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("--node", default="")
    output_flag(sp, yaml=True)
    sp.set_defaults(func=cmd_bpf)
