"""A minimal external subscriber: print membrane's dropped flows as they happen.

    .venv/bin/python examples/flow_subscriber.py [NATS_URL] [SUBJECT]

It uses only nats-py (hence the project's interpreter, which has it) and the JSON documented
in docs/events.md — no membrane code — the way a SIEM or dashboard would. NATS_URL (with its
credentials) defaults to the local cluster's, read from ``cluster.json`` in the state
directory (``$MEMBRANE_STATE_DIR``, else /var/lib/membrane as root); `membrane up` prints it
with the password hidden. SUBJECT defaults to every drop in every namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import nats


async def main(url: str, subject: str) -> None:
    nc = await nats.connect(url)
    sub = await nc.subscribe(subject)
    await nc.flush()
    print(f"subscribed to {subject}", file=sys.stderr, flush=True)
    async for msg in sub.messages:
        flow = json.loads(msg.data)
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
    asyncio.run(main(url, args[0] if args else "membrane.events.flows.DROPPED.>"))
