"""CLI commands for policy: ``policy apply|delete|list|get|explain``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from membrane import output
from membrane.client import files, policy, workloads
from membrane.cliutil import with_bus
from shared import apply, protocols
from shared.bus import Bus
from shared.errors import InvalidArgument
from shared.messages import ExplainReply, ExplainRequest, PolicyApplyReply, PolicyRef

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


def cmd_policy_list(args: argparse.Namespace) -> int:
    policies = with_bus(args, policy.list_policies)
    if args.output == "json":
        output.emit_json(policies)
        return 0
    print(
        output.table(
            ["KIND", "NAMESPACE", "NAME", "RULES", "SUBJECTS", "AUDIT"],
            [
                [p.kind, p.namespace or "-", p.name, p.rules, p.subjects, "yes" if p.audit else ""]
                for p in policies
            ],
        )
    )
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


def _pod_ref(text: str) -> tuple[str, str]:
    namespace, _, name = text.rpartition("/")
    return namespace or "default", name


def cmd_policy_explain(args: argparse.Namespace) -> int:
    protocol, port = parse_port(args.port)

    async def go(bus: Bus) -> ExplainReply:
        src = await workloads.find_pod(bus, *_pod_ref(args.src))
        dst = await workloads.find_pod(bus, *_pod_ref(args.dst))
        return await policy.explain(
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

    reply = with_bus(args, go)
    if args.output == "json":
        output.emit_json(reply)
    else:
        for line in reply.lines:
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

    sp = policy_sub.add_parser("list", help="stored policies")
    sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sp.set_defaults(func=cmd_policy_list)

    sp = policy_sub.add_parser("get", help="one policy as applied")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    sp.set_defaults(func=cmd_policy_get)

    sp = policy_sub.add_parser("explain", help="the verdict for a new connection, and why")
    sp.add_argument("--from", dest="src", required=True, metavar="[NS/]POD")
    sp.add_argument("--to", dest="dst", required=True, metavar="[NS/]POD")
    sp.add_argument("--port", default="0/ANY", help="PORT[/PROTO], e.g. 80/TCP")
    sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sp.set_defaults(func=cmd_policy_explain)
    return policy_sub
