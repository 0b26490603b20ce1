"""CLI commands for services: ``service create|apply|list|get|delete``."""

from __future__ import annotations

import argparse
from typing import Any

from membrane import cli_get, output, resources
from membrane.client import files, lb
from membrane.cliutil import emit_structured, output_flag, with_bus
from shared import apply
from shared.bus import Bus
from shared.messages import LBApplyReply, LBCreateRequest, LBService


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
        return await lb.create(
            bus,
            LBCreateRequest(
                name=args.name,
                namespace=args.namespace,
                frontends=list(args.frontend or []),
                backends=list(args.backend or []),
                affinity_timeout=args.affinity_timeout,
            ),
        )

    service = with_bus(args, go)
    if not emit_structured(service, args.output):
        state = "created" if service.revision <= 1 else "configured"
        print(f"service/{service.name} {state} (revision {service.revision})")
    return 0


def cmd_service_apply(args: argparse.Namespace) -> int:
    documents, source = files.load_documents(args.filename)

    async def go(bus: Bus) -> LBApplyReply:
        return await apply.apply_services_all_or_nothing(bus, documents, source)

    for line in with_bus(args, go).results:
        print(line)
    return 0


def cmd_service_delete(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> list[str]:
        deleted: list[str] = []
        for name in args.names:
            deleted.extend(await apply.delete_service(bus, args.namespace, name))
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
    output_flag(sp, yaml=True)
    sp.set_defaults(func=cmd_service_create)

    sp = svc.add_parser("apply", help="Services and EndpointSlices from a YAML file")
    sp.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    sp.set_defaults(func=cmd_service_apply)

    cli_get.add_listing(
        svc, resources.SERVICES, list="services with frontends and backends", get="services"
    )

    sp = svc.add_parser("delete", help="delete services")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("-n", "--namespace", default="default")
    sp.set_defaults(func=cmd_service_delete)
