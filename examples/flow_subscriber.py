"""A minimal external subscriber: print membrane's dropped flows as they happen.

    .venv/bin/python examples/flow_subscriber.py [NATS_URL] [SUBJECT]

It uses only nats-py (hence the project's interpreter, which has it) and the JSON documented
in docs/events.md — no membrane code — the way a SIEM or dashboard would. NATS_URL (with its
credentials) defaults to the local cluster's, read from ``cluster.json`` in the state
directory (``$MEMBRANE_STATE_DIR``, else /var/lib/membrane as root); `membrane up` prints it
with the password hidden. SUBJECT defaults to every drop in every namespace.

The monitor publishes batches of flows on ``membrane.events.flowbatches.<verdict>.<namespace>``:
JSON lines, one flow per line. A message of the per-flow subjects (``membrane.events.flows.>``,
published only by monitors started with MEMBRANE_EVENTS_PER_FLOW=true) is one such line, so
this reads either.

The local cluster speaks TLS with a CA of its own: its URLs are ``tls://...?ca=PATH`` (the
CA's certificate, ``<state>/tls/ca.pem``), which nats-py does not read, so it is turned into an
SSL context here. An event never has a reply subject: one that has was delivered by a JetStream
consumer someone pointed at the subject (docs/security.md), not published by the monitor.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import urllib.parse
from pathlib import Path

import nats


async def main(url: str, subject: str) -> None:
    url, _, query = url.partition("?")
    ca = urllib.parse.parse_qs(query).get("ca")
    nc = await nats.connect(url, tls=ssl.create_default_context(cafile=ca[0]) if ca else None)
    sub = await nc.subscribe(subject)
    await nc.flush()
    print(f"subscribed to {subject}", file=sys.stderr, flush=True)
    async for msg in sub.messages:
        if msg.reply:
            continue
        for line in msg.data.splitlines():
            flow = json.loads(line)
            src, dst = flow["source"], flow["destination"]
            print(
                f"{msg.subject}: {src['namespace']}/{src['pod'] or src['ip']}"
                f" -> {dst['namespace']}/{dst['pod'] or dst['ip']}:{dst['port']}"
                f" {flow['verdict']} ({flow['drop_reason_desc'] or '-'})"
                f" policy={flow['policy'] or '-'}",
                flush=True,
            )


def local_cluster_url() -> str:
    """The NATS URL `membrane up` wrote to its state directory (the layout of docs/cli.md)."""
    default = "/var/lib/membrane" if os.geteuid() == 0 else "~/.local/state/membrane"
    state = Path(os.environ.get("MEMBRANE_STATE_DIR") or default).expanduser()
    try:
        return str(json.loads((state / "cluster.json").read_text())["nats_url"])
    except (OSError, ValueError, KeyError):
        sys.exit(f"no NATS URL given and no local cluster in {state}\n{__doc__}")


if __name__ == "__main__":
    args = sys.argv[1:]
    url = args.pop(0) if args and "://" in args[0] else local_cluster_url()
    asyncio.run(main(url, args[0] if args else "membrane.events.flowbatches.DROPPED.>"))
