"""Transparent huge pages for the weights on a Linux CPU: madvise(MADV_HUGEPAGE) on each large
tensor's memory before it is first written, so the kernel backs it with 2 MiB pages.

Why: batch-1 decode streams every weight once per token. With 4 KiB pages a weight row of a few KiB
is a page of its own: a TLB miss, and a restart of the hardware prefetcher, per row and stream.
On an AMD EPYC (2 cores) a bfloat16 decode step took 41.1 ms on huge pages against 42.9 ms without,
with the earlier gemv (measured by turning torch's THP_MEM_ALLOC_ENABLE on and off, before this
module). bench/decode.py reads its roofline on both kinds of page, so the gain is not counted twice.
INTERNLM_TP_HUGEPAGES=0 turns it off.

Hosts with THP "always" already get them, "never" cannot; with "madvise" (the common default) only
memory advised like this does. Elsewhere (not Linux, no madvise) nothing changes.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger("internlm_tp")
ENV = "INTERNLM_TP_HUGEPAGES"  # 1 (default) | 0
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed choice of /sys/kernel/mm/transparent_hugepage/enabled, or None without THP."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def enabled() -> bool:
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 or 1")
    return value == "1" and sys.platform.startswith("linux") and thp_mode() in ("always", "madvise")


def _aligned_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The whole 2 MiB pages inside the tensor's storage: [start, stop)."""
    start = tensor.untyped_storage().data_ptr()
    stop = start + tensor.untyped_storage().nbytes()
    return -(-start // HUGE_PAGE) * HUGE_PAGE, stop // HUGE_PAGE * HUGE_PAGE


def advise(tensors: Iterable[torch.Tensor]) -> int:
    """madvise(MADV_HUGEPAGE) the whole huge pages of each CPU tensor's storage (call it before the
    memory is first written: pages already there, as in a small block reusing freed heap memory,
    are only merged later, by khugepaged). Returns the bytes advised; 0 where huge pages are off."""
    if not enabled():
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised, seen = 0, set()
    for t in tensors:
        if t.device.type != "cpu" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        start, stop = _aligned_range(t)
        if stop > start and libc.madvise(start, stop - start, MADV_HUGEPAGE) == 0:
            advised += stop - start
    return advised


def huge_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes on huge pages now in the memory mappings that hold the tensors' whole huge pages
    (/proc/self/smaps; madvise gives an advised range mappings of its own, so nothing else counts)."""
    ranges = sorted({_aligned_range(t) for t in tensors if t.device.type == "cpu"})
    ranges = [(a, b) for a, b in ranges if b > a]
    total, counted = 0, False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(a, 16) for a in head.split("-"))
                    counted = any(a < hi and lo < b for a, b in ranges)
                elif counted and head == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total
