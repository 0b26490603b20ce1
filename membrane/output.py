"""Rendering for the CLI: aligned tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import msgspec
import yaml


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


def json_text(value: Any) -> str:
    """Indented, sorted JSON of plain values or msgspec structs."""
    return json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True)


def emit_json(value: Any) -> None:
    sys.stdout.write(json_text(value) + "\n")


STRUCTURED = ("json", "yaml")


def structured_text(value: Any, fmt: str) -> str:
    """``value`` (plain values or msgspec structs) as ``-o json`` or ``-o yaml`` print it."""
    if fmt == "json":
        return json_text(value)
    return yaml.safe_dump(msgspec.to_builtins(value), sort_keys=False).rstrip("\n")


def labels(mapping: dict[str, str]) -> str:
    """``app=web,tier=front`` (sorted), ``<none>`` for none, as kubectl prints them."""
    return ",".join(f"{k}={v}" for k, v in sorted(mapping.items())) or "<none>"


PROTOCOL_NAMES = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}


def protocol_name(number: int) -> str:
    """``6`` -> ``TCP``, as flows, services and policies write protocols; else the number."""
    return PROTOCOL_NAMES.get(number, str(number))


def cell(value: Any) -> str:
    """A table cell: lists joined with commas (not Python's repr), the rest as text."""
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)
