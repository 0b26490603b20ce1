"""The typed map wrapper over a real kernel map: a refusal is an OSError, values round-trip."""

from __future__ import annotations

import os

import pytest

from services.datapath import maps
from services.datapath.maps import BpfMap

pytestmark = pytest.mark.root

PROGRAM = b"""
BPF_HASH(tiny, u32, u32, 1);
int noop(void *ctx) { return 0; }
"""


def test_a_full_map_raises_oserror_and_keeps_what_it_had() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    from bcc import BPF

    bpf = BPF(text=PROGRAM)
    try:
        table: BpfMap[int, int] = BpfMap(
            bpf[b"tiny"], maps.pack_u32, maps.unpack_u32, maps.pack_u32, maps.unpack_u32
        )
        table[1] = 10
        assert table[1] == 10
        with pytest.raises(OSError):
            table[2] = 20  # full: the kernel refuses, whatever bcc raises for it
        with pytest.raises(OSError):
            table[3] = -1  # cannot even be encoded
        assert dict(table) == {1: 10}
        del table[1]
        assert len(table) == 0
        with pytest.raises(KeyError):
            del table[1]
    finally:
        bpf.cleanup()
