"""The AsyncAPI 3 document of membrane's public flow subjects, generated from the msgspec types.

``python -m membrane.asyncapi`` rewrites ``docs/asyncapi.yaml``; a unit test fails when the
committed document and the types drift apart, so the document is always what the code sends.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec
import yaml

from shared import __version__, flow_wire, subjects
from shared.flow_api import (
    FLOW_BATCH_MAX_BYTES,
    EnrichedFlow,
    FlowQuery,
    FlowQueryReply,
    MonitorStatus,
)
from shared.flow_filter import VERDICTS
from shared.messages import Empty, ErrorBody, FlowBatch

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
REF = "#/components/schemas/{name}"

# (message name, type, summary)
MESSAGES: list[tuple[str, type[msgspec.Struct], str]] = [
    ("EnrichedFlow", EnrichedFlow, "A flow with both workloads, the reason and the policy"),
    (
        "FlowBatch",
        FlowBatch,
        "A node's raw flows as JSON, batched (the L7 proxy's; an agent's with"
        " MEMBRANE_FLOW_WIRE=json)",
    ),
    ("FlowQuery", FlowQuery, "Which recent flows to return"),
    ("FlowQueryReply", FlowQueryReply, "The matching flows, oldest first"),
    ("Empty", Empty, "No arguments"),
    ("MonitorStatus", MonitorStatus, "One monitor replica's counters"),
    ("ErrorBody", ErrorBody, "The body of every error reply (with the NATS micro headers)"),
]


def _message(name: str, summary: str) -> dict[str, Any]:
    return {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": {"$ref": REF.format(name=name)},
    }


# the agents' binary batch: not a msgspec type, its layout is shared/flow_wire.py's
FLOW_RECORDS: dict[str, Any] = {
    "name": "FlowRecords",
    "title": "FlowRecords",
    "summary": "A node's raw flows as its ring buffer holds them, batched (at most 4096 or 50 ms)",
    "description": (
        "Binary. Header, little-endian: magic `MFB1`, byte order of the records u8 (0 little,"
        " 1 big), pad u8, record size u16, record count u32, clock offset i64 (unix ns minus"
        " the node's CLOCK_MONOTONIC ns), then the events lost since the previous batch by stage"
        " (u64 each): kernel ring buffer full, agent queue full, bus publish failed (or reached no"
        " monitor: each batch has a reply subject, answered only by nats-server's no-responders"
        " status); the node"
        " name's length u16; the node name (UTF-8); the records: each the ring buffer's u32"
        " length and u32 page offset, then `struct flow_event` of"
        " services/datapath/bpf/events.h, in the record byte order. Layout:"
        f" shared/flow_wire.py (header `{flow_wire.HEADER.format}`, record"
        f" `{flow_wire.RECORD_FIELDS}`, {flow_wire.RECORD_SIZE} bytes)."
    ),
    "contentType": "application/octet-stream",
    "payload": {"type": "string", "format": "binary"},
}

# the monitor's batches: JSON lines of EnrichedFlow (shared/flow_api.py)
ENRICHED_FLOW_BATCH: dict[str, Any] = {
    "name": "EnrichedFlowBatch",
    "title": "EnrichedFlowBatch",
    "summary": "Enriched flows of one verdict and namespace, as JSON lines",
    "description": (
        "JSON lines (UTF-8): each line is one EnrichedFlow, exactly as the per-flow subject"
        " carries it, and ends with a newline (JSON escapes newlines inside strings); in the"
        " order the monitor enriched them. At most"
        f" {FLOW_BATCH_MAX_BYTES} bytes unless one flow is longer."
    ),
    "contentType": "application/jsonl",
    "payload": {"type": "array", "items": {"$ref": REF.format(name="EnrichedFlow")}},
}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/{kind}/{name}"}


def build() -> dict[str, Any]:
    """The AsyncAPI document. Over 80 lines because it is one literal, the document as it is
    published: read top to bottom it is the document; split, it would be scattered."""
    _, schemas = msgspec.json.schema_components([t for _, t, _ in MESSAGES], ref_template=REF)
    events = subjects.EVENTS_FLOWS_PREFIX
    batches = subjects.EVENTS_FLOW_BATCHES_PREFIX
    parameters = {
        "verdict": {"enum": list(VERDICTS), "description": "the flows' verdict"},
        "namespace": {"description": "Kubernetes namespace of the observed endpoint"},
    }
    channels: dict[str, Any] = {
        "enrichedFlowBatches": {
            "address": batches + ".{verdict}.{namespace}",
            "title": "Enriched flows, in batches",
            "description": (
                "Every flow the monitor enriched, once, in messages of JSON lines: the flows of "
                "one verdict and namespace from one batch the monitor enriched. {namespace} is "
                "the namespace of the endpoint where the flow was observed (the source on "
                "egress, the destination on ingress, else the other side's), "
                f"`{subjects.NO_NAMESPACE}` when neither side is a pod; dots become "
                f"underscores. Subscribe to `{batches}.>` for all."
            ),
            "parameters": parameters,
            "messages": {"enrichedFlowBatch": _ref("components/messages", "EnrichedFlowBatch")},
        },
        "enrichedFlows": {
            "address": events + ".{verdict}.{namespace}",
            "title": "Enriched flows, one per message (opt-in)",
            "description": (
                "The same flows one per message, published only by monitors started with "
                "MEMBRANE_EVENTS_PER_FLOW=true (each message costs the monitor and nats-server "
                f"as much as a batch). Subscribe to `{events}.>` for all."
            ),
            "parameters": parameters,
            "messages": {"enrichedFlow": _ref("components/messages", "EnrichedFlow")},
        },
        "rawFlows": {
            "address": subjects.FLOWS_PREFIX + ".{node}",
            "title": "Raw flows of a node",
            "description": "What the datapath agents (binary FlowRecords) and L7 proxies (JSON"
            " FlowBatch) publish; the monitor consumes it in the queue group "
            f"`{subjects.MONITOR_QUEUE}`. A JSON batch starts with `{{`, a binary one with `MFB1`.",
            "parameters": {"node": {"description": "the node's name"}},
            "messages": {
                "flowRecords": _ref("components/messages", "FlowRecords"),
                "flowBatch": _ref("components/messages", "FlowBatch"),
            },
        },
        "monitorQuery": {
            "address": subjects.MONITOR_QUERY_PREFIX + ".{replica}",
            "title": "Query one monitor replica's ring",
            "parameters": {"replica": {"description": "the replica's NATS micro id ($SRV.INFO)"}},
            "messages": {"flowQuery": _ref("components/messages", "FlowQuery")},
        },
        "monitorHistory": {
            "address": subjects.MONITOR_HISTORY,
            "title": "Query the DROPPED/AUDIT history stream",
            "messages": {"flowQuery": _ref("components/messages", "FlowQuery")},
        },
        "monitorStatus": {
            "address": subjects.MONITOR_STATUS_PREFIX + ".{replica}",
            "title": "One monitor replica's status",
            "parameters": {"replica": {"description": "the replica's NATS micro id ($SRV.INFO)"}},
            "messages": {"empty": _ref("components/messages", "Empty")},
        },
        "reply": {
            "address": None,
            "title": "The requester's inbox",
            "messages": {
                "flowQueryReply": _ref("components/messages", "FlowQueryReply"),
                "monitorStatus": _ref("components/messages", "MonitorStatus"),
                "error": _ref("components/messages", "ErrorBody"),
            },
        },
    }

    def request(channel: str, replies: list[str], summary: str) -> dict[str, Any]:
        return {
            "action": "send",
            "summary": summary,
            "channel": _ref("channels", channel),
            "reply": {
                "channel": _ref("channels", "reply"),
                "messages": [_ref("channels/reply/messages", r) for r in [*replies, "error"]],
            },
        }

    operations = {
        "receiveEnrichedFlowBatches": {
            "action": "receive",
            "summary": "Subscribe to enriched flows in batches",
            "channel": _ref("channels", "enrichedFlowBatches"),
        },
        "receiveEnrichedFlows": {
            "action": "receive",
            "summary": "Subscribe to enriched flows",
            "channel": _ref("channels", "enrichedFlows"),
        },
        "receiveRawFlows": {
            "action": "receive",
            "summary": "Consume the nodes' raw flows (the monitor does, in a queue group)",
            "channel": _ref("channels", "rawFlows"),
        },
        "queryFlows": request("monitorQuery", ["flowQueryReply"], "Recent flows of a replica"),
        "queryHistory": request("monitorHistory", ["flowQueryReply"], "DROPPED/AUDIT history"),
        "monitorStatus": request("monitorStatus", ["monitorStatus"], "A replica's status"),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "membrane flow events",
            "version": __version__,
            "description": (
                "Public subjects of membrane's monitor. Payloads are JSON; every payload has "
                "`v` (schema version). Fields are only added, with defaults: ignore the ones "
                "you do not know. Generated by `python -m membrane.asyncapi` from the msgspec "
                "types in shared/; see docs/events.md."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {
                **{name: _message(name, summary) for name, _, summary in MESSAGES},
                "FlowRecords": FLOW_RECORDS,
                "EnrichedFlowBatch": ENRICHED_FLOW_BATCH,
            },
            "schemas": schemas,
        },
    }


def render() -> str:
    header = "# Generated by `python -m membrane.asyncapi` from shared/; do not edit.\n"
    return header + yaml.safe_dump(build(), sort_keys=False, width=100)


def main() -> int:
    DOCUMENT.write_text(render())
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
