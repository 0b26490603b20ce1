"""``membrane run ui``: the web UI — service map, flows, nodes — served from the bus.

A small service of its own: it keeps no state but the browsers' live views, and asks the
monitor (recorded flows, counted or as they are), the KV buckets (namespaces, nodes, health)
and the enriched-flow subjects (live updates), like any client. Its address is in its NATS
micro metadata (``url``), where ``membrane ui`` finds it.

aiohttp runs the HTTP side; the CLI hides aiohttp from nats.py to start faster
(``membrane/__init__``), so this module imports it only once the service runs.
"""

from __future__ import annotations

import dataclasses

from shared.config import CommonSettings, setting


@dataclasses.dataclass(frozen=True)
class UISettings(CommonSettings):
    ui_host: str = setting("127.0.0.1", "address the web UI listens on")
    ui_port: int = setting(0, "port of the web UI (0: any free port; `membrane ui` finds it)")


async def run(settings: UISettings) -> None:
    from shared.runtime import unblock_aiohttp

    unblock_aiohttp()
    from services.ui import web  # aiohttp: see the module's docstring

    await web.run(settings)
