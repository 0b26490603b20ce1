"""``membrane observe``: recent and live flows, enriched, filtered, in Hubble's style.

History comes from every monitor replica's ring (each holds its share of the flows) and, for
what the rings no longer hold, from the DROPPED/AUDIT history stream; ``--follow`` subscribes
to the enriched flows the monitor publishes, the same subjects external systems use.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from membrane import cliutil, output
from membrane.client.flows import query
from shared import subjects
from shared.bus import Bus
from shared.errors import InvalidArgument
from shared.flow_api import EnrichedFlow, FlowFilterTerm, FlowPeer, FlowQuery
from shared.flow_filter import PEER_FIELDS, compile_filter

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
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
        raise InvalidArgument(f"{text!r} is not a duration (e.g. 30s, 5m, 1h)", field="--since")
    return total


# --- formatting --------------------------------------------------------------------------------


def _peer_text(peer: FlowPeer) -> str:
    where = f"{peer.namespace}/{peer.pod}" if peer.pod else peer.ip
    if peer.port:
        where += f":{peer.port}"
    reserved = [lab.partition(":")[2] for lab in peer.labels if lab.startswith("reserved:")]
    who = f"ID:{peer.identity}" + (f" {','.join(reserved)}" if reserved else "")
    service = f" [{peer.service}]" if peer.service else ""
    return f"{where} ({who}){service}"


def timestamp(flow_time: float) -> str:
    seconds = time.localtime(flow_time)
    return time.strftime("%b %d %H:%M:%S", seconds) + f".{int(flow_time * 1000) % 1000:03d}"


def summary(flow: EnrichedFlow) -> str:
    parts = []
    if flow.l7 is not None:
        l7 = flow.l7
        parts.append(f"http {l7.method} {l7.host}{l7.url} => {l7.status} ({l7.latency_ms:g} ms)")
    elif flow.verdict == "DROPPED" and flow.drop_reason_desc:
        parts.append(flow.drop_reason_desc)
    elif flow.observation_point:
        parts.append(flow.observation_point)
    parts.append(flow.verdict)
    if flow.tcp_flags:
        parts.append(f"(TCP Flags: {', '.join(flow.tcp_flags)})")
    elif flow.protocol and flow.protocol != "TCP":
        parts.append(f"({flow.protocol})")
    if flow.policy:
        parts.append(f"by {flow.policy}")
    return " ".join(parts)


def compact(flow: EnrichedFlow) -> str:
    """``Nov 25 18:00:01.123: default/xwing:39322 (ID:1234) -> default/deathstar-1:80 (ID:5678)
    Policy denied DROPPED (TCP Flags: SYN) by default/rule1``"""
    arrow = "<-" if flow.is_reply else "->"
    src, dst = _peer_text(flow.source), _peer_text(flow.destination)
    return f"{timestamp(flow.time)}: {src} {arrow} {dst} {summary(flow)}"


TABLE_HEADERS = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
# column widths of a followed table, whose rows cannot be measured in advance
FOLLOW_WIDTHS = (22, 40, 40, 14, 9)


def _row(f: EnrichedFlow) -> list[str]:
    rest = summary(f).replace(f.verdict, "", 1).replace("  ", " ").strip()
    return [
        timestamp(f.time),
        _peer_text(f.source),
        _peer_text(f.destination),
        f.type,
        f.verdict,
        rest,
    ]


def table(flows: Sequence[EnrichedFlow]) -> str:
    return output.table(TABLE_HEADERS, [_row(f) for f in flows])


def fixed_row(cells: Sequence[str]) -> str:
    padded = [c.ljust(w) for c, w in zip(cells, FOLLOW_WIDTHS, strict=False)]
    return "   ".join([*padded, *cells[len(FOLLOW_WIDTHS) :]]).rstrip()


_json = msgspec.json.Encoder()


def json_line(flow: EnrichedFlow) -> str:
    return _json.encode(flow).decode()


def emit(flows: Sequence[EnrichedFlow], fmt: str) -> None:
    if fmt == "table":
        if flows:
            print(table(flows), flush=True)
        return
    render = json_line if fmt == "json" else compact
    out = sys.stdout
    for flow in flows:
        out.write(render(flow) + "\n")
    out.flush()


# --- querying ----------------------------------------------------------------------------------


async def follow(
    bus: Bus, terms: list[FlowFilterTerm], fmt: str, max_flows: int, ready: bool
) -> None:
    test = compile_filter(terms)
    decode = msgspec.json.Decoder(EnrichedFlow).decode
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    verdicts = [t for t in terms if t.field == "verdict" and not t.negate and len(t.values) == 1]
    subject = (
        f"{subjects.EVENTS_FLOWS_PREFIX}.{verdicts[0].values[0].upper()}.>"
        if verdicts
        else subjects.EVENTS_FLOWS_ALL
    )

    async def on_msg(msg: Any) -> None:
        queue.put_nowait(msg.data)

    sub = await bus.nc.subscribe(subject, cb=on_msg)
    await bus.flush()
    if ready:
        print("following", file=sys.stderr, flush=True)  # for scripts that wait for it
    printed = 0
    if fmt == "table":
        print(fixed_row(TABLE_HEADERS), flush=True)
    try:
        while not max_flows or printed < max_flows:
            data = await queue.get()
            try:
                flow = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if test(flow):
                if fmt == "table":
                    print(fixed_row(_row(flow)), flush=True)
                else:
                    emit([flow], fmt)
                printed += 1
    finally:
        await sub.unsubscribe()


# --- the command -------------------------------------------------------------------------------


class _FilterAction(argparse.Action):
    """Collects filter flags into terms; ``--not`` negates the next one. Repeating a flag ORs
    its values, as in Hubble."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        terms: list[FlowFilterTerm] = getattr(namespace, "filters", None) or []
        negate = bool(getattr(namespace, "negate_next", False))
        namespace.negate_next = False
        for term in terms:
            if term.field == self.dest and term.negate == negate:
                term.values.append(str(values))
                break
        else:
            terms.append(FlowFilterTerm(field=self.dest, values=[str(values)], negate=negate))
        namespace.filters = terms


def cmd_observe(args: argparse.Namespace) -> int:
    terms: list[FlowFilterTerm] = getattr(args, "filters", None) or []
    if getattr(args, "negate_next", False):
        raise InvalidArgument("--not must come before a filter", field="--not")
    compile_filter(terms)  # bad filters fail here, before anything is asked
    since = time.time() - parse_duration(args.since) if args.since else 0.0
    if args.last is not None and args.last < 0:
        raise InvalidArgument("must not be negative", field="--last")
    last = args.last if args.last is not None else (0 if args.follow or since else 20)

    async def go(bus: Bus) -> int:
        if not args.follow or args.last is not None or since:
            flows = await query(bus, FlowQuery(filters=terms, last=last, since=since))
            emit(flows, args.output)
        if args.follow:
            await follow(bus, terms, args.output, args.max_flows, args.ready)
        return 0

    return cliutil.with_bus(args, go)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "observe",
        help="recent and live flows with workloads, labels, reasons and policies",
        description="Flows as the monitor enriched them. Filters of different kinds must all "
        "hold; a filter given twice matches either value; --not negates the next filter.",
    )
    p.add_argument("-f", "--follow", action="store_true", help="print new flows as they come")
    p.add_argument("--last", type=int, help="the newest N matching flows (default 20)")
    p.add_argument("--since", help="flows of the last DURATION (e.g. 30s, 5m, 1h)")
    p.add_argument("--max-flows", type=int, default=0, help="with --follow: stop after N flows")
    p.add_argument("--ready", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", choices=["compact", "json", "table"], default="compact")
    p.add_argument(
        "--not",
        dest="negate_next",
        action="store_const",
        const=True,
        default=False,
        help="negate the next filter",
    )

    def flag(name: str, dest: str, help_text: str) -> None:
        p.add_argument(name, dest=dest, action=_FilterAction, metavar="VALUE", help=help_text)

    flag("--verdict", "verdict", "FORWARDED, DROPPED, AUDIT, REDIRECTED or ERROR")
    flag("--type", "type", "drop, trace, policy-verdict or l7")
    flag("--protocol", "protocol", "TCP, UDP, ICMP or a number")
    flag("--node", "node", "the node that observed the flow")
    flag("--http-method", "http_method", "L7 flows: the request's method (GET, POST, ...)")
    flag("--http-path", "http_path", "L7 flows: a regular expression searched in the URL")
    flag("--http-status", "http_status", "L7 flows: the status code, or 4+ for every 4xx")
    what = {
        "pod": "[NAMESPACE/]NAME (a name prefix; any namespace without one)",
        "namespace": "namespace",
        "label": "KEY=VALUE[,KEY=VALUE] or KEY",
        "identity": "security identity number",
        "ip": "address or CIDR",
        "port": "L4 port",
        "workload": "NAMESPACE/APP as the UI's service map names it, or world, host, ...",
    }
    for kind in PEER_FIELDS:
        flag(f"--{kind}", kind, f"either side: {what[kind]}")
        flag(f"--from-{kind}", f"from_{kind}", f"source: {what[kind]}")
        flag(f"--to-{kind}", f"to_{kind}", f"destination: {what[kind]}")
    p.set_defaults(func=cmd_observe, filters=None)
