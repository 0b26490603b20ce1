"""Small pieces every CLI command uses: messages, the state directory, a bus connection."""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from membrane import output
from membrane.state import StateDir, default_state_dir, resolve_nats_url
from shared.bus import Bus
from shared.errors import AlreadyExists, InvalidArgument
from shared.selectors import LabelSelector, Requirement

T = TypeVar("T")


def say(message: str) -> None:
    print(f"membrane: {message}", flush=True)


def state_dir(args: argparse.Namespace) -> StateDir:
    return StateDir(Path(args.state_dir) if args.state_dir else default_state_dir())


def with_bus(args: argparse.Namespace, action: Callable[[Bus], Awaitable[T]]) -> T:
    url = resolve_nats_url(args.nats_url, state_dir(args))

    async def go() -> T:
        bus = await Bus.connect(url, "membrane-cli", retry_for=args.timeout)
        try:
            return await action(bus)
        finally:
            await bus.close()

    return asyncio.run(go())


def output_flag(parser: argparse.ArgumentParser, *, yaml: bool = False) -> None:
    """``-o``; with ``yaml``: kubectl's four formats (``wide`` prints the table, whose
    columns are already all there is)."""
    choices = ["table", "wide", "json", "yaml"] if yaml else ["table", "json"]
    parser.add_argument("-o", "--output", choices=choices, default="table")


def emit_structured(value: object, fmt: str) -> bool:
    """Print ``value`` when ``-o`` asked for json or yaml; False when a table is wanted."""
    if fmt not in output.STRUCTURED:
        return False
    print(output.structured_text(value, fmt))
    return True


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k=v`` -> a label mapping."""
    labels: dict[str, str] = {}
    for index, item in enumerate(filter(None, text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"label {item!r} is not key=value", field=f"labels[{index}]")
        if key in labels:
            raise AlreadyExists(f"label {key!r} given twice", field=f"labels[{index}]")
        labels[key.strip()] = value.strip()
    return labels


_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def parse_selector(text: str) -> LabelSelector:
    """kubectl's ``-l``: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``,
    ``!k``, comma-separated, all must hold."""
    requirements = []
    # commas inside (a,b) belong to the set, not between requirements
    for index, part in enumerate(re.split(r",(?![^(]*\))", text) if text.strip() else []):
        field = f"selector[{index}]"
        found = _SET.match(part)
        if found:
            key, op, values = found.groups()
            names = frozenset(v.strip() for v in values.split(",") if v.strip())
            requirements.append(Requirement(key, "In" if op == "in" else "NotIn", names))
            continue
        part = part.strip()
        if "!=" in part:
            key, _, value = part.partition("!=")
            requirements.append(Requirement(key.strip(), "NotIn", frozenset([value.strip()])))
        elif "=" in part:
            key, _, value = part.partition("==" if "==" in part else "=")
            requirements.append(Requirement(key.strip(), "In", frozenset([value.strip()])))
        elif part.startswith("!") and part[1:].strip():
            requirements.append(Requirement(part[1:].strip(), "DoesNotExist"))
        elif part and re.fullmatch(r"[\w./-]+", part):
            requirements.append(Requirement(part, "Exists"))
        else:
            raise InvalidArgument(f"{part!r} is not a label requirement", field=field)
        if not requirements[-1].key:
            raise InvalidArgument(f"{part!r} has no key", field=field)
    return LabelSelector(tuple(requirements))
