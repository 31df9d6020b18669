"""Attention for one new token per sequence on the CPU (decode): our kernel
(tp/csrc/decode_attention.cpp) or torch's SDPA, whichever runs faster on this host, measured when the
model is loaded, as tp/decode_matmul.py does for the matmuls.

Why a choice at all: SDPA's CPU kernel is built for many query rows. For one it spends most of its
time in set-up, and on a CPU without bfloat16 dot products (AVX512_BF16, AMX) it runs bfloat16 4-5x
slower than float32; on a CPU with them that may differ. Ours reads each sequence's keys and values
once, in float32 registers. It stays unless SDPA is decode_matmul.MARGIN faster (a choice that
flipped between loads would change low bits of the logits), and it is not timed at all where one
call's keys and values are under MIN_MEASURED_BYTES: there both paths take a few us, mostly call
overhead, and the choice was a near-tie that could flip (the tests' tiny float32 model: ours 20 us,
SDPA 17 us).

Paths:
  ours  tp/csrc/decode_attention.cpp: float32 and bfloat16
  sdpa  F.scaled_dot_product_attention
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tp import cpu_kernels
from tp.decode_matmul import MARGIN, best_seconds

log = logging.getLogger("internlm_tp")
CHOOSE_KEYS = 256  # keys per head in the timed call: a mid-length context
MIN_MEASURED_BYTES = 1 << 20  # keys + values of one timed call; below it, ours untimed
_CALLS, _PASSES = 20, 3


def candidates(dtype: torch.dtype) -> list[str]:
    """The paths for `dtype` activations on the CPU, ours first."""
    mode = cpu_kernels.choice()
    ours = (mode != "torch" and dtype in cpu_kernels.KERNEL_DTYPES
            and cpu_kernels.op("decode_attention") is not None)
    if ours and mode == "ours":
        return ["ours"]
    return ["ours", "sdpa"] if ours else ["sdpa"]


def run(path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        mask: torch.Tensor | None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, 1, D], k and v [B, KVH, L, D], mask bool [B, 1, 1, L] or None -> [B, H, 1, D].
    lengths [B] (ours only): row b's keys past lengths[b] are not read, the mask saying they are
    not attended (SDPA reads and masks them)."""
    if path == "ours":
        keys = None if mask is None else mask.reshape(mask.shape[0], mask.shape[-1])
        return cpu_kernels.op("decode_attention")(q.contiguous(), k, v, scale, keys, lengths)
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    raise ValueError(f"unknown decode attention path {path!r}")


def _seconds(path: str, q, k, v, scale: float) -> float:
    """Seconds a call, the best of _PASSES passes of _CALLS calls (one call first, not timed)."""
    def calls():
        for _ in range(_CALLS):
            run(path, q, k, v, scale, None)
    return best_seconds(calls, _PASSES) / _CALLS


@torch.inference_mode()
def choose(attentions: list, dtype: torch.dtype) -> str | None:
    """Set `decode_path` on each attention module (with local_heads, local_kv_heads, head_dim) to the
    faster path on this host, timed on one of CHOOSE_KEYS keys; returns it (None: no modules)."""
    if not attentions:
        return None
    paths = candidates(dtype)
    chosen = paths[0]
    a = attentions[0]
    call_bytes = 2 * a.local_kv_heads * CHOOSE_KEYS * a.head_dim * dtype.itemsize
    if len(paths) > 1 and call_bytes < MIN_MEASURED_BYTES:
        log.info("decode attention (%d heads x %d keys, %s): %s (%d KB of keys and values a call: not timed)",
                 a.local_heads, CHOOSE_KEYS, str(dtype).removeprefix("torch."), chosen, call_bytes >> 10)
    elif len(paths) > 1:
        q = torch.randn(1, a.local_heads, 1, a.head_dim).to(dtype)
        k, v = (torch.randn(1, a.local_kv_heads, CHOOSE_KEYS, a.head_dim).to(dtype) for _ in range(2))
        seconds = {p: _seconds(p, q, k, v, a.head_dim ** -0.5) for p in paths}
        if seconds["sdpa"] * MARGIN < seconds["ours"]:
            chosen = "sdpa"
        log.info("decode attention (%d heads x %d keys, %s, measured here): %s -> %s", a.local_heads, CHOOSE_KEYS,
                 str(dtype).removeprefix("torch."), ", ".join(f"{p} {s * 1e6:.0f} us" for p, s in seconds.items()),
                 chosen)
    for a in attentions:
        a.decode_path = chosen
    return chosen
