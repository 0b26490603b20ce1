"""The node's CNI network configuration, present exactly while this agent can serve it.

As Cilium's agent does: the conflist is written once the agent answers on its socket (so the
kubelet never runs the plugin against nothing and marks the node's network ready only then),
and removed when the agent stops, so that new pods wait for the next agent instead of failing.
Written atomically (a temporary file renamed), so the runtime never reads half of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFLIST = "05-membrane.conflist"
PLUGIN = "membrane-cni"


def conflist(socket: Path) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "membrane",
        "plugins": [{"type": PLUGIN, "agentSocket": str(socket)}],
    }


def write(directory: Path, socket: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CONFLIST
    temporary = directory / f".{CONFLIST}.tmp"
    temporary.write_text(json.dumps(conflist(socket), indent=2) + "\n")
    os.chmod(temporary, 0o644)
    temporary.replace(target)
    return target


def remove(directory: Path) -> None:
    (directory / CONFLIST).unlink(missing_ok=True)
