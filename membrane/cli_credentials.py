"""``membrane credentials``: NATS users for external systems, each limited to its role."""

from __future__ import annotations

import argparse
import time
from typing import Any

from membrane import credentials, output
from membrane.cliutil import output_flag, state_dir
from shared import roles
from shared.errors import Unavailable


def cmd_create(args: argparse.Namespace) -> int:
    state = state_dir(args)
    info = state.read_cluster()
    if info is None or info.nats_external:
        raise Unavailable(f"no local cluster with its own NATS in {state.root}; `membrane up`")
    cred = credentials.create(state, args.role, args.name, args.node or "")
    url = credentials.url_for(info, cred)
    if args.output == "json":
        output.emit_json({"name": cred.name, "role": cred.role, "node": cred.node, "url": url})
    else:
        print(f"# credential {cred.name} (role {cred.role}); keep it secret")
        print(f"MEMBRANE_NATS_URL={url}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    found = sorted(credentials.load(state_dir(args)).values(), key=lambda c: (c.builtin, c.name))
    rows: list[list[Any]] = [
        [
            c.name,
            c.role,
            c.node or "-",
            "service" if c.builtin else "external",
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.created)),
        ]
        for c in found
    ]
    if args.output == "json":
        output.emit_json(
            [{"name": c.name, "role": c.role, "node": c.node, "builtin": c.builtin} for c in found]
        )
    else:
        print(output.table(["NAME", "ROLE", "NODE", "KIND", "CREATED (UTC)"], rows))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    cred = credentials.revoke(state_dir(args), args.name)
    print(f"credential {cred.name} revoked; its connections are closed")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("credentials", help="NATS credentials limited to a role (docs/security.md)")
    cred_sub = p.add_subparsers(dest="credentials_command", required=True, metavar="ACTION")
    sp = cred_sub.add_parser("create", help="a credential for an external system; prints its URL")
    sp.add_argument("name")
    sp.add_argument("--role", required=True, choices=roles.ROLES)
    sp.add_argument("--node", default="", help="the node, for per-node roles (datapath, proxy)")
    output_flag(sp)
    sp.set_defaults(func=cmd_create)
    sp = cred_sub.add_parser("list", help="every credential: the services' and external ones")
    output_flag(sp)
    sp.set_defaults(func=cmd_list)
    sp = cred_sub.add_parser("revoke", help="remove a credential; its connections are closed")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_revoke)
