"""A minimal external subscriber: print membrane's dropped flows as they happen.

    python examples/flow_subscriber.py nats://user:password@127.0.0.1:4222 [SUBJECT]

It uses only nats-py and the JSON documented in docs/events.md — no membrane code — the way a
SIEM or dashboard would. SUBJECT defaults to every drop in every namespace.
"""

from __future__ import annotations

import asyncio
import json
import sys

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


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    asyncio.run(
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "membrane.events.flows.DROPPED.>")
    )
