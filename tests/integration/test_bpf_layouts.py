"""shared/bpf_layouts.py against the compiled datapath C: every field at the C offset and size.

bcc compiles the datapath as the agent does and builds a ctypes type for each map's key and
value from it (as bcc's own tools read their layouts); a probe map per struct makes every struct
of :data:`STRUCTS` such a value, events included.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.datapath.loader import BPF_DIR, program_text
from shared.bpf_layouts import STRUCTS

pytestmark = pytest.mark.root

_ITEM = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdsp])")


def python_fields(layout: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of every packed item of a standard-size format, padding bytes left out."""
    order, items = layout.format[0], layout.format[1:]
    fields: list[tuple[int, int]] = []
    offset = 0
    for count, code in _ITEM.findall(items):
        repeat = int(count or 1)
        if code == "x":
            offset += repeat
        elif code == "s":
            fields.append((offset, repeat))
            offset += repeat
        else:
            size = struct.calcsize(order + code)
            for _ in range(repeat):
                fields.append((offset, size))
                offset += size
    assert offset == layout.size, f"cannot read the format {layout.format!r}"
    return fields


def c_fields(ctype: Any) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of each field of a bcc ctypes struct; an array of numbers is
    one field per element (``name[i]``), as a format has one item per element."""
    fields = {}
    for name, field_type, *_ in ctype._fields_:
        offset, size = getattr(ctype, name).offset, getattr(ctype, name).size
        if issubclass(field_type, ctypes.Array) and not is_padding(name):
            width = ctypes.sizeof(field_type._type_)
            if width > 1:  # char arrays are bytes ("s")
                for i in range(field_type._length_):
                    fields[f"{name}[{i}]"] = (offset + i * width, width)
                continue
        fields[name] = (offset, size)
    return fields


def is_padding(name: str) -> bool:
    return name.lstrip("_").startswith("pad")


@pytest.fixture(scope="module")
def compiled() -> Iterator[dict[str, Any]]:
    """name -> the ctypes type bcc built for ``struct name`` of the compiled datapath."""
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    from bcc import BPF

    pins = Path("/sys/fs/bpf") / f"membrane-layouts-{os.getpid()}"
    pins.mkdir()
    probes = "".join(f"BPF_HASH(layout_{n}, __u32, struct {n}, 1);\n" for n in STRUCTS)
    try:
        bpf = BPF(
            text=(program_text() + probes).encode(),
            cflags=[f"-I{BPF_DIR}", f'-DPIN_DIR="{pins}"'],
        )
        try:
            yield {name: bpf[f"layout_{name}".encode()].Leaf for name in STRUCTS}
        finally:
            bpf.cleanup()
    finally:
        shutil.rmtree(pins, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_layout_matches_the_c_struct(compiled: dict[str, Any], name: str) -> None:
    layout, ctype = STRUCTS[name], compiled[name]
    assert layout.size == ctypes.sizeof(ctype), f"struct {name}: size"
    in_c = c_fields(ctype)
    ours = python_fields(layout)
    # every real C field is one item here, at its offset, of its size
    missing = {n: at for n, at in in_c.items() if not is_padding(n) and at not in ours}
    assert missing == {}, f"struct {name}: fields not in {layout.format!r}"
    # and every item here is a C field (padding included: some codecs write it as zero)
    stray = [at for at in ours if at not in in_c.values()]
    assert stray == [], f"struct {name}: items of {layout.format!r} that are no C field"
