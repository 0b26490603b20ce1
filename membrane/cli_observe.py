"""``membrane observe``: recent and live flows, enriched, filtered, in Hubble's style.

History comes from every monitor replica's ring (each holds its share of the flows) and, for
what the rings no longer hold, from the DROPPED/AUDIT history stream; ``--follow`` subscribes
to the batches of enriched flows the monitor publishes (``membrane.events.flowbatches``), the
same subjects external systems use. Flags are Hubble's (``hubble observe``) where Hubble has one.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from membrane import cliutil, flowfmt
from membrane.client.flows import query
from membrane.flowfmt import Style
from shared import subjects
from shared.bus import Bus
from shared.errors import InvalidArgument
from shared.flow_api import FlowFilterTerm, FlowQuery, decode_flow_batch
from shared.flow_filter import PEER_FIELDS, compile_filter

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DEFAULT_LAST = 20


def parse_duration(text: str, field: str = "--since") -> float:
    """``90``, ``30s``, ``5m``, ``1h30m`` -> seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise InvalidArgument(
            f"{text!r} is not a duration (e.g. 30s, 5m, 1h) or a timestamp "
            "(e.g. 2026-11-25T18:00:00Z)",
            field=field,
        )
    return total


def parse_time(text: str, field: str, now: float | None = None) -> float:
    """A point in time as Hubble's --since/--until take it: a duration back from now (``5m``)
    or an RFC 3339 timestamp (``2026-11-25T18:00:00Z``; no zone: local time)."""
    now = time.time() if now is None else now
    if "-" in text.strip()[1:] or "T" in text:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise InvalidArgument(f"{text!r} is not an RFC 3339 timestamp", field=field) from None
        if moment.tzinfo is None:
            moment = moment.astimezone()  # the local zone, as `date` prints it
        return moment.astimezone(UTC).timestamp()
    return now - parse_duration(text, field)


# --- following ---------------------------------------------------------------------------------


async def follow(
    bus: Bus, terms: list[FlowFilterTerm], fmt: str, max_flows: int, ready: bool, style: Style
) -> None:
    """Print new matching flows until ``max_flows`` (0: no end) are printed."""
    test = compile_filter(terms)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    verdicts = [t for t in terms if t.field == "verdict" and not t.negate and len(t.values) == 1]
    subject = (
        f"{subjects.EVENTS_FLOW_BATCHES_PREFIX}.{verdicts[0].values[0].upper()}.>"
        if verdicts
        else subjects.EVENTS_FLOW_BATCHES_ALL
    )

    async def on_msg(msg: Any) -> None:
        queue.put_nowait(msg.data)

    sub = await bus.subscribe(subject, on_msg)
    await bus.flush()
    if ready:
        print("following", file=sys.stderr, flush=True)  # for scripts that wait for it
    printed = 0
    if fmt == "table":
        print(flowfmt.fixed_row(flowfmt.headers(style)), flush=True)
    try:
        while not max_flows or printed < max_flows:
            data = await queue.get()
            try:
                flows = decode_flow_batch(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            lines = []
            for flow in flows:
                if test(flow):
                    lines.append(flowfmt.line(flow, fmt, style))
                    if len(lines) + printed == max_flows:
                        break
            if lines:
                print("\n".join(lines), flush=True)
                printed += len(lines)
    finally:
        await sub.unsubscribe()


# --- the command -------------------------------------------------------------------------------


class _FilterAction(argparse.Action):
    """Collects filter flags into terms. Repeating a flag ORs its values, as in Hubble;
    ``--not`` negates the next filter, and the same flag repeated right after it joins the
    negation: ``--not --pod a --pod b`` matches neither a nor b."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        terms: list[FlowFilterTerm] = getattr(namespace, "filters", None) or []
        negate = bool(getattr(namespace, "negate_next", False))
        if not negate and getattr(namespace, "negated_last", "") == self.dest:
            negate = True  # a repeat of the filter --not just negated
        namespace.negate_next = False
        namespace.negated_last = self.dest if negate else ""
        for term in terms:
            if term.field == self.dest and term.negate == negate:
                term.values.append(str(values))
                break
        else:
            terms.append(FlowFilterTerm(field=self.dest, values=[str(values)], negate=negate))
        namespace.filters = terms


def _count(args: argparse.Namespace) -> tuple[int, int]:
    """(last, first) to ask for: how many of the newest or of the oldest flows (0: all)."""
    chosen = [flag for flag in ("last", "first", "all") if getattr(args, flag) not in (None, False)]
    if len(chosen) > 1:
        raise InvalidArgument(f"give one of --{', --'.join(chosen)}", field=f"--{chosen[1]}")
    for flag in ("last", "first", "max_flows"):
        if (getattr(args, flag) or 0) < 0:
            raise InvalidArgument("must not be negative", field=f"--{flag.replace('_', '-')}")
    if args.first is not None:
        return 0, args.first
    if args.all:
        return 0, 0
    if args.last is not None:
        return args.last, 0
    if args.follow or args.since:
        return 0, 0  # following shows history only when asked; --since bounds it itself
    return args.max_flows or DEFAULT_LAST, 0


def cmd_observe(args: argparse.Namespace) -> int:
    terms: list[FlowFilterTerm] = getattr(args, "filters", None) or []
    if getattr(args, "negate_next", False):
        raise InvalidArgument("--not must come before a filter", field="--not")
    compile_filter(terms)  # bad filters fail here, before anything is asked
    since = parse_time(args.since, "--since") if args.since else 0.0
    until = parse_time(args.until, "--until") if args.until else 0.0
    last, first = _count(args)
    if args.follow and (until or first):
        raise InvalidArgument(
            "cannot be combined with --follow", field="--until" if until else "--first"
        )
    history = not args.follow or args.last is not None or bool(since) or args.all
    style = Style(node_name=args.print_node_name, numeric=args.numeric)

    async def go(bus: Bus) -> int:
        printed = 0
        if history:
            flows = await query(bus, FlowQuery(filters=terms, last=last, since=since, until=until))
            if first:
                flows = flows[:first]
            if args.max_flows:
                flows = flows[: args.max_flows]
            flowfmt.emit(flows, args.output, style)
            printed = len(flows)
        if args.follow and not (args.max_flows and printed >= args.max_flows):
            remaining = args.max_flows - printed if args.max_flows else 0
            await follow(bus, terms, args.output, remaining, args.ready, style)
        return 0

    return cliutil.with_bus(args, go)


PEER_HELP = {
    "pod": "[NAMESPACE/]NAME (a name prefix; any namespace without one)",
    "namespace": "namespace",
    "label": "KEY=VALUE[,KEY=VALUE] or KEY",
    "identity": "security identity number",
    "ip": "address or CIDR",
    "port": "L4 port",
    "service": "[NAMESPACE/]NAME of a service frontend",
    "workload": "NAMESPACE/APP as the UI's service map names it, or world, host, ...",
}
SHORT = {"namespace": "-n", "label": "-l"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "observe",
        help="recent and live flows with workloads, labels, reasons and policies",
        description="Flows as the monitor enriched them, with hubble observe's flags. Filters "
        "of different kinds must all hold; a filter given twice matches either value; --not "
        "negates the next filter (and its repeats right after it).",
    )
    p.add_argument("-f", "--follow", action="store_true", help="print new flows as they come")
    p.add_argument("--last", type=int, help=f"the newest N matching flows (default {DEFAULT_LAST})")
    p.add_argument("--first", type=int, help="the oldest N matching flows the monitor holds")
    p.add_argument("--all", action="store_true", help="every matching flow the monitor holds")
    p.add_argument(
        "--since", help="flows from then on: a DURATION ago (30s, 5m, 1h) or an RFC 3339 time"
    )
    p.add_argument("--until", help="flows up to then: a DURATION ago or an RFC 3339 time")
    p.add_argument(
        "--max-flows", type=int, default=0, help="print at most N flows (history and followed)"
    )
    p.add_argument("--ready", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", choices=flowfmt.FORMATS, default="compact")
    p.add_argument("--print-node-name", action="store_true", help="the observing node, too")
    p.add_argument("--numeric", action="store_true", help="addresses and identity numbers only")
    p.add_argument(
        "--not",
        dest="negate_next",
        action="store_const",
        const=True,
        default=False,
        help="negate the next filter",
    )

    def flag(*names: str, dest: str, help_text: str, **kwargs: Any) -> None:
        p.add_argument(
            *names, dest=dest, action=_FilterAction, metavar="VALUE", help=help_text, **kwargs
        )

    flag("--verdict", dest="verdict", help_text="FORWARDED, DROPPED, AUDIT, REDIRECTED or ERROR")
    flag("-t", "--type", dest="type", help_text="drop, trace, policy-verdict, l7 or dns")
    flag("--protocol", dest="protocol", help_text="TCP, UDP, ICMP, SCTP or a number (6, 17, 1)")
    flag(
        "--node",
        "--node-name",
        dest="node",
        help_text="the node that observed the flow (a name or a shell pattern)",
    )
    flag("--traffic-direction", dest="traffic_direction", help_text="ingress or egress")
    flag("--tcp-flags", dest="tcp_flags", help_text="SYN,ACK: flows with all of them set")
    flag(
        "--reply",
        dest="reply",
        nargs="?",
        const="true",
        help_text="replies only (--reply false: requests only)",
    )
    flag("--http-method", dest="http_method", help_text="L7 flows: the request's method (GET, ...)")
    flag("--http-path", dest="http_path", help_text="L7 flows: a regular expression in the URL")
    flag("--http-status", dest="http_status", help_text="L7 flows: the status, or 4+ for any 4xx")
    flag(
        "--l7-protocol",
        dest="l7_protocol",
        help_text="L7 flows of the protocol: http, grpc, http2, kafka or dns",
    )
    flag("--grpc-status", dest="grpc_status", help_text="gRPC calls of the status (7: denied)")
    flag("--kafka-topic", dest="kafka_topic", help_text="Kafka requests naming the topic")
    flag(
        "--fqdn",
        dest="fqdn",
        help_text="DNS queries of the name, and connections to its learned addresses "
        "(a name, or a pattern with '*' within one label)",
    )
    for kind in PEER_FIELDS:
        names = [SHORT[kind]] if kind in SHORT else []
        flag(*names, f"--{kind}", dest=kind, help_text=f"either side: {PEER_HELP[kind]}")
        flag(f"--from-{kind}", dest=f"from_{kind}", help_text=f"source: {PEER_HELP[kind]}")
        flag(f"--to-{kind}", dest=f"to_{kind}", help_text=f"destination: {PEER_HELP[kind]}")
    p.set_defaults(func=cmd_observe, filters=None)
