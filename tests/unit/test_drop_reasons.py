"""The datapath's drop reasons: one C header, the same codes as shared/reasons.py."""

from __future__ import annotations

import re
from pathlib import Path

from services.datapath.loader import BPF_DIR
from shared import reasons

HEADER = BPF_DIR / "drop_reasons.h"
DEFINE = re.compile(r"^\s*#\s*define\s+(DROP_\w+)\s+(\S+)", re.MULTILINE)


def defines(path: Path) -> dict[str, str]:
    return dict(DEFINE.findall(path.read_text()))


def test_the_header_and_shared_reasons_name_the_same_codes() -> None:
    in_c = {name: int(value) for name, value in defines(HEADER).items()}
    assert in_c == reasons.DATAPATH_DROPS


def test_every_code_the_datapath_emits_has_ciliums_name() -> None:
    for name, code in reasons.DATAPATH_DROPS.items():
        assert code in reasons.REASONS, f"{name} ({code}) has no name in shared/reasons.py"


def test_no_other_bpf_file_defines_a_drop_reason() -> None:
    others = {
        path.name: sorted(defines(path))
        for path in sorted(BPF_DIR.iterdir())
        if path != HEADER and path.suffix in (".c", ".h") and defines(path)
    }
    assert others == {}
