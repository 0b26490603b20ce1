"""``membrane policy diff -f FILE``: the recorded flows whose verdict the file would change.

The CLI only gathers: the documents (validated by the policy service first, so a file that does
not parse is the parser's error and nothing is evaluated), the recorded flows counted by the
monitor (:mod:`membrane.client.recorded`) and the pods' container ports. The policy service decides,
with the resolver and ``explain`` it enforces with (``membrane.policy.diff``).

Exit status: 0 nothing would be newly denied, 1 something would (a CI gate), 2 error.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgspec

from membrane import cliutil, output
from membrane.cli_observe import parse_duration
from membrane.client import files, recorded
from membrane.flowfmt import timestamp
from shared import apply
from shared.bus import Bus
from shared.errors import MembraneError
from shared.flow_api import FlowFilterTerm, FlowGroup, PolicyDiffReply

EXIT_SAFE, EXIT_DENIES, EXIT_ERROR = 0, 1, 2


def namespace_filter(namespace: str | None) -> list[FlowFilterTerm]:
    """``-n NS``: flows with either end in the namespace."""
    return [FlowFilterTerm(field="namespace", values=[namespace])] if namespace else []


def port_text(group: FlowGroup) -> str:
    if group.protocol == "ICMP":
        return f"ICMP type {group.port}"
    return f"{group.port}/{group.protocol}"


def _label(change: str) -> str:
    return {"dropped": "NEWLY DENIED", "allowed": "NEWLY ALLOWED", "audit": "NEWLY AUDITED"}[change]


def print_reply(reply: PolicyDiffReply, flows: int, since: float) -> None:
    after = f"{flows} flows in {reply.groups} groups since {timestamp(since)}"
    if not reply.changes:
        print(f"no recorded flow changes verdict ({after})")
        return
    print(f"{len(reply.changes)} flow groups change verdict ({after}):")
    rows = [
        [
            _label(c.after),
            c.group.source,
            c.group.destination,
            port_text(c.group),
            c.group.count,
            timestamp(c.group.first),
            timestamp(c.group.last),
            c.before,
            c.policy or "-",
            c.rule or "-",
        ]
        for c in sorted(reply.changes, key=lambda c: (c.after != "dropped", c.group.source))
    ]
    headers = ["CHANGE", "SOURCE", "DESTINATION", "PORT", "FLOWS", "FIRST SEEN", "LAST SEEN"]
    print(output.table([*headers, "WAS", "POLICY", "RULE"], rows))
    reasons = sorted({f"{c.direction}: {c.reason}" for c in reply.changes if c.reason})
    if reasons:
        print("why:")
        for reason in reasons:
            print(f"  {reason}")


def cmd_policy_diff(args: argparse.Namespace) -> int:
    try:
        return _diff(args)
    except MembraneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _diff(args: argparse.Namespace) -> int:
    documents, source = files.load_documents(args.filename)
    since = time.time() - parse_duration(args.since)

    async def go(bus: Bus) -> tuple[PolicyDiffReply | None, int]:
        # the parser's verdict first: a file that does not parse evaluates nothing
        await apply.apply_policies(bus, documents, source, audit=False, dry_run=True)
        found = await recorded.recorded_groups(
            bus, since=since, filters=namespace_filter(args.namespace)
        )
        if not found.groups:
            return None, found.flows
        reply = await recorded.diff(bus, documents, source, found.groups)
        return reply, found.flows

    reply, flows = cliutil.with_bus(args, go)
    if reply is None:
        where = f" in namespace {args.namespace}" if args.namespace else ""
        message = f"no recorded flows{where} since {timestamp(since)}: nothing to compare"
        if args.output == "json":
            output.emit_json({"changes": [], "flows": 0, "message": message})
        else:
            print(message)
        return EXIT_SAFE
    if args.output == "json":
        output.emit_json({"flows": flows, **_builtins(reply)})
    else:
        print_reply(reply, flows, since)
    return EXIT_DENIES if any(c.newly_denied for c in reply.changes) else EXIT_SAFE


def _builtins(reply: PolicyDiffReply) -> dict[str, Any]:
    value: dict[str, Any] = msgspec.to_builtins(reply)
    return value


def add_parser(policy_sub: Any) -> None:
    sp = policy_sub.add_parser(
        "diff",
        help="recorded flows whose verdict a policy file would change",
        description="Replays the recorded flows through the policy service with today's "
        "policies and with FILE applied. Exit status: 0 nothing newly denied, 1 something "
        "newly denied, 2 error.",
    )
    sp.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    sp.add_argument("--since", default="1h", help="flows of the last DURATION (default 1h)")
    sp.add_argument("-n", "--namespace", help="only flows with an end in this namespace")
    sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sp.set_defaults(func=cmd_policy_diff)
