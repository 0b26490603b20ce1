"""``membrane policy suggest -n NS``: policies allowing exactly the connections observed.

The recorded flows come counted from the monitor (:mod:`membrane.client.recorded`), the labels
from the identities; :mod:`membrane.suggest` writes the documents, and the policy service
validates them (a dry-run apply) before they are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import yaml

from membrane import cliutil, output, suggest
from membrane.cli_observe import parse_duration
from membrane.cli_policy_diff import namespace_filter
from membrane.client import identity, recorded
from membrane.flowfmt import timestamp
from shared import apply
from shared.bus import Bus


def cmd_policy_suggest(args: argparse.Namespace) -> int:
    since = time.time() - parse_duration(args.since)

    async def go(bus: Bus) -> suggest.Suggestion:
        found = await recorded.recorded_groups(
            bus, since=since, filters=namespace_filter(args.namespace)
        )
        labels = {i.id: i.labels for i in await identity.list_identities(bus)}
        result = suggest.suggest(
            found.groups, labels, args.namespace, kind=args.kind, workload=args.workload or ""
        )
        if result.documents:  # the service's parser says it is valid, or this is a bug
            await apply.apply_policies(
                bus, result.documents, "policy suggest", audit=False, dry_run=True
            )
        return result

    result = cliutil.with_bus(args, go)
    for note in result.uncovered:
        print(f"not covered: {note}", file=sys.stderr)
    if not result.documents:
        print(
            f"no forwarded connections of namespace {args.namespace} recorded since"
            f" {timestamp(since)}: nothing to suggest",
            file=sys.stderr,
        )
        return 0
    if args.output == "json":
        output.emit_json(result.documents)
        return 0
    print(
        f"# membrane policy suggest -n {args.namespace}: {len(result.documents)} policies"
        f" allowing the {result.flows} connections observed since {timestamp(since)}"
    )
    print(yaml.safe_dump_all(result.documents, sort_keys=False), end="")
    return 0


def add_parser(policy_sub: Any) -> None:
    sp = policy_sub.add_parser(
        "suggest",
        help="least-privilege policies allowing exactly the observed connections",
        description="Writes one policy per workload of NAMESPACE that sent or received a "
        "forwarded connection: its observed peers, by labels, on the observed ports only; "
        "both directions enforced.",
    )
    sp.add_argument("-n", "--namespace", required=True)
    sp.add_argument("--since", default="1h", help="flows of the last DURATION (default 1h)")
    sp.add_argument("--for", dest="workload", help="only this workload (app label or name)")
    sp.add_argument("--kind", choices=suggest.KINDS, default=suggest.CNP)
    sp.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    sp.set_defaults(func=cmd_policy_suggest)
