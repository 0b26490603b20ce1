"""Small pieces every CLI command uses: messages, the state directory, a bus connection."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from membrane.state import StateDir, default_state_dir, resolve_nats_url
from shared.bus import Bus
from shared.errors import AlreadyExists, InvalidArgument

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


def output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


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
