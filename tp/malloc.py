"""Freed activations' memory kept in the process for the next ones (Linux, glibc), set once the
weights are loaded: mallopt's mmap threshold at glibc's largest (32 MiB) and a trim threshold of
TRIM_BYTES, so a prefill's intermediates (up to tens of MB each, allocated and freed every layer)
reuse memory already mapped instead of pages the kernel must fault in and zero again.

Why: glibc's defaults return freed memory to the OS (the top of the heap past twice its adaptive mmap
threshold, and every chunk that was mmapped), so each 512-position prefill of the bench's 827M model
took 25-90 K page faults and 60-215 ms of system time (AMD EPYC, 2 cores); with these settings, none
after the first. Prefill ran 0-1.2% faster in three alternated process pairs (2320-2352 ms against
2325-2377). The price: up to TRIM_BYTES of freed memory stays mapped (what serving stacks pay when
they preload jemalloc or tcmalloc for the same reason). INTERNLM_TP_KEEP_FREED=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

log = logging.getLogger("internlm_tp")
ENV = "INTERNLM_TP_KEEP_FREED"  # 1 (default) | 0
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_BYTES = 32 << 20  # glibc's upper limit for the mmap threshold on 64-bit hosts
TRIM_BYTES = 512 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings once per process; True where glibc took them (False: turned off, not glibc,
    or refused)."""
    if os.environ.get(ENV, "1") == "0":
        return False
    libc = ctypes.CDLL(None)  # the symbols the process has loaded, as tp.hugepages reaches madvise
    ok = hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") \
        and libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    if ok:
        log.info("freed memory: chunks under %d MB reused, up to %d MB kept mapped (glibc mallopt; %s=0 turns "
                 "this off)", MMAP_BYTES >> 20, TRIM_BYTES >> 20, ENV)
    return ok


SCRATCH_BYTES = 32 << 20  # one block of dequantized weight rows (tp.quant, tp.int4)
_scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def scratch_rows(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, cols] view of a buffer kept across calls, one per dtype and device: on the CPU a fresh
    one costs its page faults, ~7x the int8-to-bfloat16 conversion written into it (15 vs 2 ms for
    11008 x 2048), and glibc maps a block of SCRATCH_BYTES afresh each time whatever the settings above."""
    buf = _scratch.get((dtype, device))
    if buf is None or buf.numel() < rows * cols:
        # a normal tensor even when first made under inference_mode (the load-time measurements):
        # an inference tensor could not be written by a later call outside it
        with torch.inference_mode(False):
            buf = _scratch[(dtype, device)] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)
