"""``membrane ui [--open]``: the web UI's address (from the UI service's NATS micro metadata)."""

from __future__ import annotations

import argparse
import webbrowser
from typing import Any

from membrane import cliutil
from shared import subjects
from shared.bus import Bus
from shared.errors import Unavailable


def cmd_ui(args: argparse.Namespace) -> int:
    async def go(bus: Bus) -> list[str]:
        replicas = await bus.discover(subjects.UI_SERVICE)
        return sorted(url for info in replicas if (url := info.metadata.get("url")))

    urls = cliutil.with_bus(args, go)
    if not urls:
        raise Unavailable("no UI service answers (is the cluster up? `membrane status`)")
    for url in urls:
        print(url)
    if args.open:
        try:
            opened = webbrowser.get().open(urls[0])
        except webbrowser.Error:
            opened = False
        if not opened:
            print("no browser to start here: open the address above in one")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ui", help="the web UI's address: service map, flows, nodes")
    p.add_argument("--open", action="store_true", help="start a browser on it, where one exists")
    p.set_defaults(func=cmd_ui)
