"""Flows rendered as Hubble renders them: compact lines, a table, ``dict`` blocks, ``jsonpb``
(Hubble's JSON, so tools written for ``hubble observe -o jsonpb`` read ours) and our own JSON
(one ``EnrichedFlow`` per line)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from membrane import output
from shared.flow_api import EnrichedFlow, FlowPeer
from shared.messages import L7Info

FORMATS = ("compact", "json", "jsonpb", "dict", "table")

# ICMPv4 type names as Hubble prints them
ICMP_TYPES = {
    0: "EchoReply",
    3: "DestinationUnreachable",
    4: "SourceQuench",
    5: "Redirect",
    8: "EchoRequest",
    9: "RouterAdvertisement",
    10: "RouterSolicitation",
    11: "TimeExceeded",
    12: "ParameterProblem",
    13: "TimestampRequest",
    14: "TimestampReply",
}
# Hubble's event types (monitor API message types) and observation points
_EVENT_TYPES = {"drop": 1, "trace": 4, "l7": 5, "policy-verdict": 9}
_FLOW_TYPES = {"l7": "L7"}


@dataclass(frozen=True)
class Style:
    node_name: bool = False  # --print-node-name
    numeric: bool = False  # --numeric: addresses and identity numbers, no names


def _is_icmp(flow: EnrichedFlow) -> bool:
    return flow.protocol == "ICMP"


def peer_text(peer: FlowPeer, flow: EnrichedFlow | None = None, style: Style = Style()) -> str:
    where = f"{peer.namespace}/{peer.pod}" if peer.pod and not style.numeric else peer.ip
    if peer.port and not (flow is not None and _is_icmp(flow)):  # ICMP has no ports
        where += f":{peer.port}"
    reserved = [lab.partition(":")[2] for lab in peer.labels if lab.startswith("reserved:")]
    who = f"ID:{peer.identity}"
    if reserved and not style.numeric:
        who += f" {','.join(reserved)}"
    service = f" [{peer.service}]" if peer.service and not style.numeric else ""
    return f"{where} ({who}){service}"


def icmp_type(flow: EnrichedFlow) -> str:
    """The ICMP type's name (flows carry it in the destination port, as Hubble does)."""
    number = flow.destination.port
    return ICMP_TYPES.get(number, f"type {number}")


def timestamp(flow_time: float) -> str:
    seconds = time.localtime(flow_time)
    return time.strftime("%b %d %H:%M:%S", seconds) + f".{int(flow_time * 1000) % 1000:03d}"


def _detail(flow: EnrichedFlow) -> str:
    if flow.tcp_flags:
        return f"TCP Flags: {', '.join(flow.tcp_flags)}"
    if _is_icmp(flow):
        return f"ICMPv4 {icmp_type(flow)}"
    if flow.protocol and flow.protocol != "TCP":
        return flow.protocol
    return ""


def l7_summary(l7: L7Info) -> str:
    """The request and its answer: ``http PUT host/path => 403 (0.4 ms)``, ``grpc POST
    /pkg.Svc/Method => grpc-status 7``, ``kafka produce v9 [topic] => error 29``, ``dns A
    api.example.com => NOERROR 198.51.100.20 TTL 60``; a request the proxy answered for a
    failed upstream: ``http GET host/path => 503 (1.2 ms, upstream connect error: Connection
    refused)``; a connection closed on malformed input: ``http2 malformed HTTP/2: ...``."""
    if l7.error and not l7.method:
        return f"{l7.protocol} {l7.error}"
    if l7.protocol == "dns":
        answers = f" {','.join(l7.answers)} TTL {l7.ttl}" if l7.answers else ""
        return f"dns {l7.qtype} {l7.query} => {l7.rcode}{answers}"
    if l7.protocol == "kafka":
        answer = f"error {l7.error_code}" if l7.error_code else "ok"
        topics = f" [{','.join(l7.topics)}]" if l7.topics else ""
        request = f"kafka {l7.api_key} v{l7.api_version}{topics}"
    else:
        answer = str(l7.status) if l7.grpc_status is None else f"grpc-status {l7.grpc_status}"
        request = f"{l7.protocol} {l7.method} {l7.host}{l7.url}"
    error = f", {l7.error}" if l7.error else ""
    return f"{request} => {answer} ({l7.latency_ms:g} ms{error})"


def summary(flow: EnrichedFlow) -> str:
    """What follows the peers: the reason (drops, and what an AUDIT would have dropped) or
    the observation point, the verdict, the packet's detail and the deciding policy."""
    parts = []
    if flow.destination_names:
        parts.append(f"to {','.join(flow.destination_names)}")
    if flow.l7 is not None:
        parts.append(l7_summary(flow.l7))
    elif flow.verdict in ("DROPPED", "AUDIT") and flow.drop_reason_desc:
        parts.append(flow.drop_reason_desc)
    elif flow.observation_point:
        parts.append(flow.observation_point)
    parts.append(flow.verdict)
    detail = _detail(flow)
    if detail:
        parts.append(f"({detail})")
    if flow.policy:
        parts.append(f"by {flow.policy}")
    return " ".join(parts)


def compact(flow: EnrichedFlow, style: Style = Style()) -> str:
    """``Nov 25 18:00:01.123: default/xwing:39322 (ID:1234) -> default/deathstar-1:80 (ID:5678)
    Policy denied DROPPED (TCP Flags: SYN) by default/rule1``"""
    arrow = "<-" if flow.is_reply else "->"
    src = peer_text(flow.source, flow, style)
    dst = peer_text(flow.destination, flow, style)
    node = f" [{flow.node}]" if style.node_name else ""
    return f"{timestamp(flow.time)}{node}: {src} {arrow} {dst} {summary(flow)}"


TABLE_HEADERS = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
# column widths of a followed table, whose rows cannot be measured in advance
FOLLOW_WIDTHS = (22, 40, 40, 14, 9)


def headers(style: Style = Style()) -> tuple[str, ...]:
    return ("TIMESTAMP", "NODE", *TABLE_HEADERS[1:]) if style.node_name else TABLE_HEADERS


def row(f: EnrichedFlow, style: Style = Style()) -> list[str]:
    rest = summary(f).replace(f.verdict, "", 1).replace("  ", " ").strip()
    cells = [
        timestamp(f.time),
        peer_text(f.source, f, style),
        peer_text(f.destination, f, style),
        f.type,
        f.verdict,
        rest,
    ]
    return [cells[0], f.node, *cells[1:]] if style.node_name else cells


def table(flows: Sequence[EnrichedFlow], style: Style = Style()) -> str:
    return output.table(headers(style), [row(f, style) for f in flows])


def fixed_row(cells: Sequence[str]) -> str:
    padded = [c.ljust(w) for c, w in zip(cells, FOLLOW_WIDTHS, strict=False)]
    return "   ".join([*padded, *cells[len(FOLLOW_WIDTHS) :]]).rstrip()


def dict_block(flow: EnrichedFlow, style: Style = Style()) -> str:
    """Hubble's ``-o dict``: one ``KEY: value`` line per column, right-aligned keys."""
    keys = headers(style)
    width = max(len(k) for k in keys)
    lines = [f"{k.rjust(width)}: {v}" for k, v in zip(keys, row(flow, style), strict=True)]
    return "\n".join(["------------", *lines])


_json = msgspec.json.Encoder()


def json_line(flow: EnrichedFlow) -> str:
    return _json.encode(flow).decode()


def _rfc3339(flow_time: float) -> str:
    return datetime.fromtimestamp(flow_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _endpoint(peer: FlowPeer) -> dict[str, Any]:
    out: dict[str, Any] = {"identity": peer.identity, "labels": list(peer.labels)}
    if peer.pod:
        out |= {"namespace": peer.namespace, "pod_name": peer.pod}
    return out


def _service(text: str) -> dict[str, str]:
    namespace, _, name = text.partition("/")
    return {"name": name, "namespace": namespace}


def jsonpb(flow: EnrichedFlow) -> dict[str, Any]:
    """The flow as Hubble's ``GetFlowsResponse`` in protobuf JSON (``hubble observe -o
    jsonpb``): field names and enum spellings as Hubble's, what membrane does not know left
    out."""
    s, d = flow.source, flow.destination
    out: dict[str, Any] = {
        "time": _rfc3339(flow.time),
        "verdict": flow.verdict,
        "IP": {"source": s.ip, "destination": d.ip, "ipVersion": "IPv4"},
        "source": _endpoint(s),
        "destination": _endpoint(d),
        "Type": _FLOW_TYPES.get(flow.type, "L3_L4"),
        "node_name": flow.node,
        "event_type": {"type": _EVENT_TYPES.get(flow.type, 4)},
        "is_reply": flow.is_reply,
        "Summary": _detail(flow),
    }
    if flow.protocol in ("TCP", "UDP"):
        l4: dict[str, Any] = {"source_port": s.port, "destination_port": d.port}
        if flow.protocol == "TCP":
            l4["flags"] = {name: True for name in flow.tcp_flags}
        out["l4"] = {flow.protocol: l4}
    elif _is_icmp(flow):
        out["l4"] = {"ICMPv4": {"type": d.port}}
    if flow.direction:
        out["traffic_direction"] = flow.direction.upper()
    if flow.observation_point:
        out["trace_observation_point"] = flow.observation_point.upper().replace("-", "_")
    if flow.drop_reason:
        out["drop_reason"] = flow.drop_reason
        out["drop_reason_desc"] = flow.drop_reason_desc.upper().replace(" ", "_")
    if s.service:
        out["source_service"] = _service(s.service)
    if d.service:
        out["destination_service"] = _service(d.service)
    if flow.policy:
        policies = [_service(p) for p in flow.policy.split(",")]
        key = "egress_allowed_by" if flow.direction == "egress" else "ingress_allowed_by"
        if flow.verdict == "DROPPED":
            key = key.replace("allowed", "denied")
        out[key] = policies
    return {"flow": out, "node_name": flow.node, "time": out["time"]}


def emit(flows: Sequence[EnrichedFlow], fmt: str, style: Style = Style()) -> None:
    """Print flows in ``fmt`` (one of FORMATS); a table is measured over all of them."""
    if fmt == "table":
        if flows:
            print(table(flows, style), flush=True)
        return
    out = sys.stdout
    for flow in flows:
        out.write(line(flow, fmt, style) + "\n")
    out.flush()


def line(flow: EnrichedFlow, fmt: str, style: Style = Style()) -> str:
    """One flow as a followed stream prints it (a table row at fixed widths)."""
    if fmt == "json":
        return json_line(flow)
    if fmt == "jsonpb":
        return _json.encode(jsonpb(flow)).decode()
    if fmt == "dict":
        return dict_block(flow, style)
    if fmt == "table":
        return fixed_row(row(flow, style))
    return compact(flow, style)
