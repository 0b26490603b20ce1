"""Write (or clear) one identity's resolved policy straight into the `resolved` KV bucket.

Until the policy service exists, this is how the demo (and a curious user) gives the datapath
a policy: ``python scripts/resolved_policy.py put IDENTITY --allow PEER:PORT/TCP ...``.
"""

from __future__ import annotations

import argparse
import asyncio

import msgspec

from membrane.state import StateDir, default_state_dir, resolve_nats_url
from shared import subjects
from shared.bus import Bus
from shared.messages import PolicyEntry, ResolvedPolicy

PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ANY": 0}


def entry(text: str, deny: bool, rule_id: int) -> PolicyEntry:
    """PEER[:PORT[/PROTO]] with PEER an identity number (0 = any)."""
    peer, _, rest = text.partition(":")
    port, _, proto = rest.partition("/")
    return PolicyEntry(
        peer=int(peer),
        port=int(port or 0),
        protocol=PROTOCOLS[(proto or ("TCP" if port else "ANY")).upper()],
        deny=deny,
        rule_id=rule_id,
    )


async def main(args: argparse.Namespace) -> None:
    url = resolve_nats_url(None, StateDir(default_state_dir()))
    bus = await Bus.connect(url, "resolved-policy-script")
    try:
        kv = await bus.kv(subjects.KV_RESOLVED)
        if args.action == "clear":
            await kv.delete(str(args.identity))
            return
        entries = [entry(t, False, i) for i, t in enumerate(args.allow, start=1)]
        entries += [entry(t, True, 100 + i) for i, t in enumerate(args.deny, start=1)]
        policy = ResolvedPolicy(
            identity=args.identity,
            revision=1,
            ingress_enforced=True,
            ingress=entries,
            rules={e.rule_id: f"{args.name}[{e.rule_id}]" for e in entries},
        )
        await kv.put(str(args.identity), msgspec.json.encode(policy))
    finally:
        await bus.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["put", "clear"])
    parser.add_argument("identity", type=int, help="the subject identity (ingress policy)")
    parser.add_argument("--allow", action="append", default=[], metavar="PEER:PORT/PROTO")
    parser.add_argument("--deny", action="append", default=[], metavar="PEER:PORT/PROTO")
    parser.add_argument("--name", default="default/demo-policy", help="rule name prefix")
    asyncio.run(main(parser.parse_args()))
