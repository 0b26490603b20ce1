"""Where a node's BPF maps are pinned: the layout the agent creates and ``membrane down`` removes.

Maps are pinned under ``<bpffs>/membrane/<node>/`` so a restarted agent reopens the same maps
(forwarding never stops), and removing a node's pins frees its maps once no program holds them.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")


def pin_dir(bpffs: Path, node: str) -> Path:
    return bpffs / "membrane" / node


def remove_pins(bpffs: Path, node: str) -> None:
    """Unpin every map of ``node``; the kernel frees them once no program holds them."""
    pins = pin_dir(bpffs, node)
    shutil.rmtree(pins, ignore_errors=True)
    with contextlib.suppress(OSError):  # the last node out removes membrane/ itself
        pins.parent.rmdir()
