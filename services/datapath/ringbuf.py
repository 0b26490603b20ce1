"""A BPF ring buffer read straight from its memory mapping, without a callback per record.

bcc's ``ring_buffer_poll`` calls a ctypes callback for every record, which costs microseconds
each; at hundreds of thousands of events a second that is the whole budget. Here the readable
region is copied once and unpacked with ``struct.iter_unpack``.

The mapping (kernel/bpf/ringbuf.c): page 0 holds the consumer position (ours to write), page 1
the producer position (read-only), then the data area, mapped twice in a row so that a record
crossing the end is contiguous. A record is a u32 length (bit 31 busy: reserved, not yet
committed; bit 30 discarded), a u32 page offset, the payload, padding to 8 bytes. Positions
are u64 byte counters that only grow; offset = position & (size - 1).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
from types import TracebackType
from typing import Any, Final

BUSY_BIT: Final = 1 << 31
DISCARD_BIT: Final = 1 << 30
HEADER_SIZE: Final = 8

BPF_OBJ_GET_INFO_BY_FD: Final = 15
BPF_MAP_TYPE_RINGBUF: Final = 27

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_HEADER = struct.Struct("=I")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """The bpf(2) system call; its result, or OSError with the kernel's errno."""
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = int(_libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _MapInfo(ctypes.Structure):
    # the head of struct bpf_map_info; the kernel fills no more than info_len bytes
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    ]


def map_info(map_fd: int) -> tuple[int, int]:
    """(map type, max_entries) of a BPF map; for a ring buffer max_entries is its byte size."""
    info = _MapInfo()
    attr = _InfoAttr(map_fd, ctypes.sizeof(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return int(info.type), int(info.max_entries)


def _aligned(length: int) -> int:
    """Bytes a record with ``length`` payload bytes takes in the ring."""
    return (length + HEADER_SIZE + 7) & ~7


class RingBuffer:
    """The consumer side of one BPF_MAP_TYPE_RINGBUF; one consumer per ring buffer."""

    def __init__(self, map_fd: int, size: int | None = None) -> None:
        map_type, max_entries = map_info(map_fd)
        if map_type != BPF_MAP_TYPE_RINGBUF:
            raise ValueError(f"map fd {map_fd} is a BPF map of type {map_type}, not a ringbuf")
        if size is not None and size != max_entries:
            raise ValueError(f"ring buffer of fd {map_fd} has {max_entries} bytes, not {size}")
        page = mmap.PAGESIZE
        self._fd = map_fd
        self.size = max_entries
        self._mask = max_entries - 1
        self._base = page  # offset of the data area in the producer mapping
        self._consumer_map = mmap.mmap(
            map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._producer_map = mmap.mmap(
            map_fd, page + 2 * max_entries, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        # aligned u64 loads and stores: single instructions, as the kernel expects
        self._consumer = memoryview(self._consumer_map)[:8].cast("Q")
        self._producer = memoryview(self._producer_map)[:8].cast("Q")
        self._view = memoryview(self._producer_map)
        # records skipped because they were not of the size drain_unpack was asked for
        self.malformed = 0
        # records met while still being written (a drain stops there; the next one reads them)
        self.busy = 0

    def fileno(self) -> int:
        """The map's fd: poll/epoll report it readable while unconsumed data is there."""
        return self._fd

    def pending(self) -> int:
        """Bytes reserved by producers and not consumed yet (headers and padding included)."""
        return int(self._producer[0] - self._consumer[0])

    def drain(self, max_records: int = 65536) -> list[bytes]:
        """Consume committed records, in order, up to the first one still being written."""
        records: list[bytes] = []
        data = self._producer_map
        cons = self._consumer[0]
        prod = self._producer[0]
        while cons < prod and len(records) < max_records:
            at = self._base + (cons & self._mask)
            (header,) = _HEADER.unpack_from(data, at)
            if header & BUSY_BIT:
                self.busy += 1
                break
            length = header & ~(BUSY_BIT | DISCARD_BIT)
            if not header & DISCARD_BIT:
                records.append(data[at + HEADER_SIZE : at + HEADER_SIZE + length])
            cons += _aligned(length)
        self._consumer[0] = cons
        return records

    def drain_unpack(
        self, record: struct.Struct, max_records: int = 65536
    ) -> list[tuple[Any, ...]]:
        """Consume committed records and unpack each with ``record``, in order.

        ``record`` covers header and payload (its first two fields are the u32 length and
        page offset); see :meth:`drain_records` for the rules.
        """
        chunks, _ = self.drain_records(record.size, max_records)
        out: list[tuple[Any, ...]] = []
        for chunk in chunks:
            out.extend(record.iter_unpack(chunk))
        return out

    def drain_records(self, stride: int, max_records: int = 65536) -> tuple[list[bytes], int]:
        """Consume committed records of ``stride`` bytes (header included) as raw bytes.

        Returns the copied runs of back-to-back records, headers included, and how many
        records they hold: one copy per run, nothing per record. ``stride`` is a multiple of
        8, so that records sit back to back in the ring. Records of another size are skipped
        and counted in ``malformed``; discarded ones are skipped.
        """
        payload = stride - HEADER_SIZE
        if stride % 8 or payload <= 0:
            raise ValueError(f"a record of {stride} bytes cannot tile a ring buffer")
        out: list[bytes] = []
        taken = 0
        data = self._producer_map
        cons = self._consumer[0]
        prod = self._producer[0]
        while cons < prod and taken < max_records:
            count = min((prod - cons) // stride, max_records - taken)
            at = self._base + (cons & self._mask)
            # headers first, straight from the mapping, then the payloads: the loads stay in
            # that order (x86-64 does not reorder loads), so a header seen committed vouches
            # for its payload even while the producer writes on
            lengths = self._view[at : at + count * stride].cast("I")[:: stride // 4].tolist()
            good = count
            if lengths.count(payload) != count:
                good = next(i for i, length in enumerate(lengths) if length != payload)
            if good:
                out.append(data[at : at + good * stride])
                taken += good
                cons += good * stride
                if good == count:
                    continue
            # not a plain committed record of our size: busy (stop), discarded or malformed
            (header,) = _HEADER.unpack_from(data, self._base + (cons & self._mask))
            if header & BUSY_BIT or (good < count and lengths[good] & BUSY_BIT):
                self.busy += 1
            if header == payload:
                continue  # committed since its header was read
            if header & BUSY_BIT:
                break
            if not header & DISCARD_BIT:
                self.malformed += 1
            cons += _aligned(header & ~DISCARD_BIT)
        self._consumer[0] = cons
        return out, taken

    def close(self) -> None:
        """Unmap; the map fd stays open (it belongs to whoever loaded the map)."""
        if self._consumer_map.closed:
            return
        self._consumer.release()
        self._producer.release()
        self._view.release()
        self._consumer_map.close()
        self._producer_map.close()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
