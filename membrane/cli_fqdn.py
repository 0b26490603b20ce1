"""``membrane fqdn cache list|clean``: what the pods resolved through the DNS proxies, which
toFQDNs rules turn into allowed addresses (docs/l7.md#dns)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from membrane import output
from membrane.client import fqdn
from membrane.cliutil import emit_structured, output_flag, with_bus


def cmd_list(args: argparse.Namespace) -> int:
    found = with_bus(args, lambda bus: fqdn.caches(bus, args.node or ""))
    if emit_structured({"items": found}, args.output):
        return 0
    now = time.time()
    rows = []
    for cache in found:
        for entry in cache.names:
            for address in entry.addresses:
                left = address.expires - now
                state = f"{left:.0f}s" if left > 0 else f"grace {left + address.grace:.0f}s"
                endpoint = cache.endpoint or cache.ip
                rows.append([cache.node, endpoint, entry.name, address.ip, state])
    if not rows:
        print("no learned names")
        return 0
    print(output.table(["NODE", "ENDPOINT", "NAME", "ADDRESS", "EXPIRES"], rows))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    replies = with_bus(args, lambda bus: fqdn.clean(bus, args.pattern or "", args.node or ""))
    for reply in replies:
        print(f"{reply.node}: {reply.removed} names removed")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fqdn", help="names the pods resolved through the DNS proxy (toFQDNs)")
    fqdn_sub = p.add_subparsers(dest="fqdn_command", required=True, metavar="ACTION")
    cache = fqdn_sub.add_parser("cache", help="the per-endpoint name -> address caches")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    sp = cache_sub.add_parser("list", help="learned names and addresses, with their expiry")
    sp.add_argument("--node", help="only this node's endpoints")
    output_flag(sp, yaml=True)
    sp.set_defaults(func=cmd_list)
    sp = cache_sub.add_parser(
        "clean", help="forget learned names: their addresses leave toFQDNs rules at once"
    )
    sp.add_argument("--node", help="only this node's proxy")
    sp.add_argument("--matchpattern", dest="pattern", help="only names matching this pattern")
    sp.set_defaults(func=cmd_clean)
