"""CLI commands for services: ``service create|apply|list|get|delete``."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from membrane import cli_policy, output
from membrane.cliutil import output_flag, with_bus
from shared import subjects
from shared.bus import Bus
from shared.messages import (
    Empty,
    LBApplyReply,
    LBApplyRequest,
    LBCreateRequest,
    LBDeleteReply,
    LBListReply,
    LBService,
    LBServiceRef,
)

TIMEOUT = 60.0  # a bulk apply of tens of thousands of services takes seconds
# requests stay below NATS's max_payload (32 MB here): 20,000 Services with their
# EndpointSlices are about 10 MB of JSON, one request, checked and applied in one pass
CHUNK_BYTES = 24 << 20


def chunks(documents: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Documents split into requests of at most CHUNK_BYTES of JSON each."""
    out: list[list[dict[str, Any]]] = [[]]
    size = 0
    for doc in documents:
        n = len(msgspec.json.encode(doc))
        if out[-1] and size + n > CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(doc)
        size += n
    return out


async def apply_documents(
    bus: Bus, documents: list[dict[str, Any]], source: str, *, dry_run: bool
) -> LBApplyReply:
    """One request per chunk; ``dry_run`` first (as ``membrane apply`` does) checks them all
    before any chunk is applied."""
    results: list[str] = []
    for chunk in chunks(documents):
        reply = await bus.request(
            subjects.LB_APPLY,
            LBApplyRequest(documents=chunk, source=source, dry_run=dry_run),
            LBApplyReply,
            timeout=TIMEOUT,
        )
        results.extend(reply.results)
    return LBApplyReply(results=results)


async def apply_all_or_nothing(
    bus: Bus, documents: list[dict[str, Any]], source: str
) -> LBApplyReply:
    """Apply, changing nothing on any invalid document.

    One request (the usual case) is validated completely by the service before it changes
    anything, so it needs no separate check; several requests are all checked with a dry run
    first, so that an error in the last cannot leave the first applied.
    """
    if len(chunks(documents)) > 1:
        await apply_documents(bus, documents, source, dry_run=True)
    return await apply_documents(bus, documents, source, dry_run=False)


def _rows(services: list[LBService]) -> list[list[Any]]:
    rows = []
    for s in services:
        for f in s.frontends:
            address = f"*:{f.port}" if f.node_port else f"{f.ip}:{f.port}"
            backends = ",".join(
                f"{b.ip}:{b.port}{'(terminating)' if b.terminating else ''}" for b in f.backends
            )
            rows.append(
                [
                    s.namespace,
                    s.name,
                    f.id,
                    f"{address}/{f.protocol}",
                    s.algorithm,
                    s.affinity_timeout or "-",
                    backends or "<none>",
                ]
            )
    return rows


def _print(services: list[LBService]) -> None:
    print(
        output.table(
            ["NAMESPACE", "NAME", "ID", "FRONTEND", "ALGORITHM", "AFFINITY", "BACKENDS"],
            _rows(services),
        )
    )


def cmd_service_create(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> LBService:
        return await bus.request(
            subjects.LB_CREATE,
            LBCreateRequest(
                name=args.name,
                namespace=args.namespace,
                frontends=list(args.frontend or []),
                backends=list(args.backend or []),
                affinity_timeout=args.affinity_timeout,
            ),
            LBService,
            timeout=TIMEOUT,
        )

    service = with_bus(args, go)
    if args.output == "json":
        output.emit_json(service)
    else:
        print(f"service/{service.name} configured (revision {service.revision})")
    return 0


def cmd_service_apply(args: argparse.Namespace) -> int:
    documents, source = cli_policy.load_documents(args.filename)

    async def go(bus: Bus) -> LBApplyReply:
        return await apply_all_or_nothing(bus, documents, source)

    for line in with_bus(args, go).results:
        print(line)
    return 0


def cmd_service_list(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> LBListReply:
        return await bus.request(subjects.LB_LIST, Empty(), LBListReply, timeout=TIMEOUT)

    found = with_bus(args, go).services
    if args.namespace:
        found = [s for s in found if s.namespace == args.namespace]
    if args.output == "json":
        output.emit_json(found)
    else:
        _print(found)
    return 0


def cmd_service_get(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> LBService:
        return await bus.request(
            subjects.LB_GET, LBServiceRef(name=args.name, namespace=args.namespace), LBService
        )

    service = with_bus(args, go)
    if args.output == "json":
        output.emit_json(service)
    else:
        _print([service])
    return 0


def cmd_service_delete(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> list[str]:
        deleted: list[str] = []
        for name in args.names:
            reply = await bus.request(
                subjects.LB_DELETE,
                LBServiceRef(name=name, namespace=args.namespace),
                LBDeleteReply,
            )
            deleted.extend(reply.deleted)
        return deleted

    for key in with_bus(args, go):
        print(f"service/{key} deleted")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("service", help="load-balanced services: frontends and backends")
    svc = p.add_subparsers(dest="service_command", required=True, metavar="ACTION")

    sp = svc.add_parser("create", help="a service from frontends and backends (no Kubernetes)")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument(
        "--frontend", action="append", metavar="IP:PORT/PROTO", help="repeatable; PROTO TCP|UDP"
    )
    sp.add_argument("--backend", action="append", metavar="IP:PORT", help="repeatable")
    sp.add_argument(
        "--affinity-timeout", type=int, default=0, help="ClientIP session affinity seconds"
    )
    output_flag(sp)
    sp.set_defaults(func=cmd_service_create)

    sp = svc.add_parser("apply", help="Services and EndpointSlices from a YAML file")
    sp.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    sp.set_defaults(func=cmd_service_apply)

    sp = svc.add_parser("list", help="every service with its frontends and backends")
    sp.add_argument("-n", "--namespace", default="")
    output_flag(sp)
    sp.set_defaults(func=cmd_service_list)

    sp = svc.add_parser("get", help="one service")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default="default")
    output_flag(sp)
    sp.set_defaults(func=cmd_service_get)

    sp = svc.add_parser("delete", help="delete services")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("-n", "--namespace", default="default")
    sp.set_defaults(func=cmd_service_delete)
