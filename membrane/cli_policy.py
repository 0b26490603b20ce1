"""CLI commands for policy: ``policy apply|delete|list|get|explain``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
from typing import Any

import msgspec
import yaml

from membrane import cli_get, output, resources
from membrane.client import files, policy, workloads
from membrane.cliutil import with_bus
from shared import apply, protocols
from shared.bus import Bus
from shared.errors import InvalidArgument
from shared.messages import Endpoint, ExplainReply, ExplainRequest, PolicyApplyReply, PolicyRef

PROTOCOLS = {**protocols.PORT_PROTOCOLS, "ICMP": protocols.ICMP, "ANY": protocols.ANY}


def print_apply(reply: PolicyApplyReply) -> None:
    for line in reply.results:
        print(line)
    for warning in reply.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for key in reply.l7_at_l4:
        print(f"note: {key} has L7 rules: {apply.L7_NOTE}")


def cmd_policy_apply(args: argparse.Namespace) -> int:
    documents, source = files.load_documents(args.filename)

    async def go(bus: Bus) -> PolicyApplyReply:
        return await apply.apply_policies(bus, documents, source, audit=args.audit, dry_run=False)

    print_apply(with_bus(args, go))
    return 0


def cmd_policy_delete(args: argparse.Namespace) -> int:
    refs: list[PolicyRef] = []
    if args.filename:
        refs = policy.refs_of(files.load_documents(args.filename)[0])
    elif args.name:
        refs.append(PolicyRef(name=args.name, namespace=args.namespace))
    else:
        raise InvalidArgument("name a policy, or give -f FILE", field="name")

    async def go(bus: Bus) -> list[str]:
        return await apply.delete_policies(bus, refs)

    for key in with_bus(args, go):
        print(f"{key} deleted")
    return 0


def cmd_policy_get(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> dict[str, Any]:
        return await policy.get(bus, args.namespace, args.name)

    document = with_bus(args, go)
    if args.output == "json":
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(document, sort_keys=False), end="")
    return 0


def parse_port(text: str) -> tuple[int, int]:
    """``80/TCP`` (protocol defaults to TCP) -> (protocol number, port)."""
    port_text, _, proto_text = text.partition("/")
    protocol = PROTOCOLS.get((proto_text or "TCP").upper())
    if protocol is None:
        raise InvalidArgument(
            f"unknown protocol {proto_text!r}: TCP, UDP, SCTP, ICMP", field="port"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidArgument(f"port {port_text!r} is not a number", field="port") from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"port {port} is out of range", field="port")
    return protocol, port


def _address(text: str) -> Endpoint | None:
    """An IPv4 address as the destination: outside the cluster (identity 0: the policy
    service looks it up, and names the DNS names toFQDNs rules learned for it)."""
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    return Endpoint(namespace="", name=str(ip), node="", ip=str(ip), identity=0, labels={})


def _workload(endpoint: Endpoint) -> str:
    """``deploy/web`` for a Deployment's pod (every replica has its identity), else the pod."""
    if endpoint.owner.startswith("Deployment/"):
        return "deploy/" + endpoint.owner.partition("/")[2]
    return endpoint.name


def _named(endpoint: Endpoint) -> str:
    if not endpoint.namespace:  # an address outside the cluster
        return endpoint.name
    workload = f" ({_workload(endpoint)})" if endpoint.owner else ""
    return f"{endpoint.namespace}/{endpoint.name}{workload}"


def _side(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "namespace": endpoint.namespace,
        "pod": endpoint.name,
        "workload": endpoint.owner,
        "identity": endpoint.identity,
        "labels": dict(sorted(endpoint.labels.items())),
    }


def explain_lines(src: Endpoint, dst: Endpoint, reply: ExplainReply) -> list[str]:
    """The service's explanation with the workloads named where it speaks of identities."""
    names = {src.identity: _workload(src), dst.identity: _workload(dst)}
    if src.identity == dst.identity and _workload(src) != _workload(dst):
        names[src.identity] = f"{_workload(src)}, {_workload(dst)}"

    if not dst.identity:  # an address: the service found its identity
        found = re.match(r"identity \d+ -> identity (\d+)", reply.lines[0]) if reply.lines else None
        dst = msgspec.structs.replace(dst, identity=int(found.group(1)) if found else 0)

    def name(match: re.Match[str]) -> str:
        number = int(match.group(1))
        return f"{match.group(0)} ({names[number]})" if number in names else match.group(0)

    header = [
        f"from {_named(src)}: identity {src.identity}, labels {output.labels(src.labels)}",
        f"to   {_named(dst)}: identity {dst.identity}, labels {output.labels(dst.labels)}",
    ]
    return header + [re.sub(r"identity (\d+)", name, line) for line in reply.lines]


def cmd_policy_explain(args: argparse.Namespace) -> int:
    protocol, port = parse_port(args.port)

    async def go(bus: Bus) -> tuple[Endpoint, Endpoint, ExplainReply]:
        src = (await workloads.resolve(bus, args.src, args.namespace))[0]
        dst = _address(args.dst) or (await workloads.resolve(bus, args.dst, args.namespace))[0]
        reply = await policy.explain(
            bus,
            ExplainRequest(
                src_identity=src.identity,
                dst_identity=dst.identity,
                protocol=protocol,
                port=port,
                src_ports=src.ports,
                dst_ports=dst.ports,
                src_ip=src.ip,
                dst_ip=dst.ip,
            ),
        )
        return src, dst, reply

    src, dst, reply = with_bus(args, go)
    if args.output == "json":
        output.emit_json({**msgspec.to_builtins(reply), "from": _side(src), "to": _side(dst)})
    else:
        for line in explain_lines(src, dst, reply):
            print(line)
    return 0 if reply.allowed else 1


def add_parsers(sub: Any) -> Any:
    """Returns the ``policy`` sub-parsers, for the commands of other modules."""
    p = sub.add_parser("policy", help="network policies (Cilium and Kubernetes formats)")
    policy_sub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")

    sp = policy_sub.add_parser("apply", help="create or update policies from YAML")
    sp.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    sp.add_argument(
        "--audit", action="store_true", help="report what they would deny, deny nothing"
    )
    sp.set_defaults(func=cmd_policy_apply)

    sp = policy_sub.add_parser("delete", help="delete a policy by name, or those of a file")
    sp.add_argument("name", nargs="?")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("-f", "--filename")
    sp.set_defaults(func=cmd_policy_delete)

    cli_get.add_listing(policy_sub, resources.POLICIES, list="stored policies")

    sp = policy_sub.add_parser("get", help="one policy as applied")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    sp.set_defaults(func=cmd_policy_get)

    sp = policy_sub.add_parser(
        "explain",
        help="the verdict for a new connection, and why",
        description="Exit code 0: allowed; 1: dropped; 2: an error (such as an unknown pod). "
        "WORKLOAD: a pod, deploy/NAME (one of its pods), svc/NAME (a pod behind it), or a "
        "bare name that is a pod or else a Deployment; NS/ before it picks the namespace.",
    )
    sp.add_argument("--from", dest="src", required=True, metavar="[NS/]WORKLOAD")
    sp.add_argument(
        "--to",
        dest="dst",
        required=True,
        metavar="[NS/]WORKLOAD|IP",
        help="a workload, or an address outside the cluster (a toFQDNs rule names the DNS name)",
    )
    sp.add_argument("-n", "--namespace", default="default", help="namespace (default default)")
    sp.add_argument("--port", default="0/ANY", help="PORT[/PROTO], e.g. 80/TCP")
    sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sp.set_defaults(func=cmd_policy_explain, error_exit=2)
    return policy_sub
