"""Maglev lookup tables (Eisenbud et al., NSDI 2016), computed the same way on every node.

Each backend gets a permutation of the table's slots from two hashes of its id and the cluster's
seed; backends take turns claiming their next preferred free slot until the table is full. The
table depends only on (backend ids, size, seed), so every node that computes it picks the same
backend for the same flow, and a backend added or removed moves only about 1/N of the slots.

The fill loop runs compiled (``maglev_fill.c``, built by ``make setup`` and the image as
``_maglev_fill.so``) where the library is there, and in Python otherwise: the same walk, the
same tables (tests/unit/test_lb.py compares them).
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_SIZE = 16381  # a prime, as the permutation needs; Cilium's default too; the cap
SPREAD = 100  # Maglev's rule: over 100 slots per backend keep every share within 1 % of even
DISRUPTION_FACTOR_MAX = 10


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_prime(n: int) -> int:
    while not is_prime(n):
        n += 1
    return n


@functools.lru_cache(maxsize=1024)  # a bulk asks it for every service, of a few sizes
def size_for(backends: int, maximum: int = DEFAULT_SIZE) -> int:
    """The table size of a service with ``backends`` backends (``maximum`` a prime).

    Even spread needs over 100 slots per backend. Minimal disruption needs more as backends
    grow: with 100 per backend, removing one of 10 backends moves about 2.5 % of the others'
    flows, with 1,000 per backend 0.5 % (``bench/maglev.py``). So 100 * b * min(b, 10)
    slots, b the backend count rounded up to a power of two: the size changes (and the table
    is reshuffled) only when the count crosses a power of two, and two-backend services, the
    many, take 401 slots instead of 16,381 (20,000 of them fit in tens of MB per node).
    """
    rounded = 1 << max(0, backends - 1).bit_length()
    target = SPREAD * rounded * min(rounded, DISRUPTION_FACTOR_MAX)
    return maximum if target >= maximum else next_prime(target)


def _offset_skip(backend: int, size: int, seed: int) -> tuple[int, int]:
    digest = hashlib.blake2b(
        backend.to_bytes(4, "little"), digest_size=16, key=seed.to_bytes(8, "little")
    ).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


# MEMBRANE_MAGLEV_LIB: another path to the library, or "none" for the Python loop
LIBRARY = Path(__file__).with_name("_maglev_fill.so")


def _load(path: str) -> Any:
    if path == "none":
        return None
    try:
        fill = ctypes.CDLL(path).maglev_fill
    except (OSError, AttributeError):  # not built here (a checkout without make setup)
        return None
    u32p = ctypes.POINTER(ctypes.c_uint32)
    fill.argtypes = [ctypes.c_uint32, u32p, u32p, u32p, ctypes.c_uint32, ctypes.c_void_p]
    fill.restype = ctypes.c_int
    return fill


_fill = _load(os.environ.get("MEMBRANE_MAGLEV_LIB") or str(LIBRARY))
COMPILED = _fill is not None


def table(backends: Sequence[int], size: int = DEFAULT_SIZE, seed: int = 0) -> list[int]:
    """The backend id for every slot; ``[]`` without backends. ``size`` must be prime."""
    ids = sorted(set(backends))  # the order must not depend on how the list was built
    if not ids:
        return []
    if len(ids) == 1:
        return [ids[0]] * size
    if _fill is not None:
        return _compiled(ids, size, seed)
    return python_table(ids, size, seed)


def _compiled(ids: list[int], size: int, seed: int) -> list[int]:
    n = len(ids)
    vector = ctypes.c_uint32 * n
    offsets, skips = vector(), vector()
    for i, backend in enumerate(ids):
        offsets[i], skips[i] = _offset_skip(backend, size, seed)
    entry = array.array("I", bytes(4 * size))  # "I": 4 bytes on every platform bcc runs on
    if _fill(n, vector(*ids), offsets, skips, size, entry.buffer_info()[0]) != 0:
        raise MemoryError("maglev_fill")
    return entry.tolist()


def python_table(ids: list[int], size: int, seed: int) -> list[int]:
    """:func:`table`'s fill in Python, for ``ids`` sorted and distinct (at least two)."""
    n = len(ids)
    entry = [0] * size
    taken = bytearray(size)
    pos: list[int] = []
    skips: list[int] = []
    for backend in ids:
        offset, skip = _offset_skip(backend, size, seed)
        pos.append(offset)
        skips.append(skip)
    filled = 0
    while True:
        for i in range(n):
            c = pos[i]
            s = skips[i]
            while taken[c]:
                c += s
                if c >= size:
                    c -= size
            taken[c] = 1
            entry[c] = ids[i]
            c += s
            pos[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return entry
