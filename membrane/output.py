"""Rendering for the CLI: aligned tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import msgspec


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


def emit_json(value: Any) -> None:
    if isinstance(value, msgspec.Struct) or (
        isinstance(value, list) and value and isinstance(value[0], msgspec.Struct)
    ):
        value = msgspec.to_builtins(value)
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def labels(mapping: dict[str, str]) -> str:
    """``app=web,tier=front`` (sorted), ``<none>`` for none, as kubectl prints them."""
    return ",".join(f"{k}={v}" for k, v in sorted(mapping.items())) or "<none>"
