"""BPF_PROG_TEST_RUN for the benchmarks: a tc program run by the kernel on a crafted packet."""

from __future__ import annotations

import ctypes

from services.datapath.ringbuf import bpf

BPF_PROG_TEST_RUN = 10


class TestRunAttr(ctypes.Structure):
    # the ``test`` member of union bpf_attr
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def test_run(prog_fd: int, packet: bytes, repeat: int, *, room: int = 0) -> tuple[int, int]:
    """Run a tc program ``repeat`` times on ``packet``: (its last return value, ns per run).

    ``room``: bytes for the packet as the program leaves it (a program that rewrites or grows
    its input needs them). ctypes releases the GIL for the call, so other threads run while
    the kernel works.
    """
    buffer = ctypes.create_string_buffer(packet, len(packet))
    out = ctypes.create_string_buffer(len(packet) + room) if room else None
    attr = TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_in=ctypes.addressof(buffer),
        repeat=repeat,
    )
    if out is not None:
        attr.data_size_out = len(out)
        attr.data_out = ctypes.addressof(out)
    bpf(BPF_PROG_TEST_RUN, attr)
    return int(attr.retval), int(attr.duration)
