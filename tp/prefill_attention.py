"""Causal attention over a whole prompt on the CPU (prefill with no padding and no prefix): torch's
SDPA, or the queries in blocks of BLOCK through batched matmuls, whichever runs faster on this host,
measured when the model is loaded, as tp/decode_attention.py does for one query row.

Why blocks: block i's queries attend keys [0, end of block i) only, so the work above the causal
diagonal is skipped a block at a time, and each product is one batched GEMM over every head (MKL's)
instead of SDPA's per-tile loops. On an AMD EPYC (2 cores, AVX2), 16 heads x 512 positions x 128
in float32: SDPA 13.2-14.1 ms, blocks of 64 9.4-10.6 ms (the choice at five loads); in one
earlier script, blocks of 128 11.0 ms and all 512 keys at once 24 ms. bfloat16 blocks on that CPU
(no bfloat16 dot products): 290 ms, so SDPA.

Every head is computed on its own (batched matmul, softmax per row), so a rank holding half the heads
gets the same values for them as one rank holding all: TP sizes agree. SDPA stays unless blocks are
decode_matmul.MARGIN faster (a choice that flipped between loads would change low bits of the
logits), and it is not timed where one call's queries are under MIN_MEASURED_BYTES (the tests' tiny
models: microseconds of call overhead and noise), where SDPA is kept.

Paths:
  sdpa    F.scaled_dot_product_attention(is_causal=True)
  blocks  `blocks` below
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tp.decode_matmul import MARGIN, best_seconds

log = logging.getLogger("internlm_tp")
BLOCK = 64  # query rows a block
CHOOSE_ROWS = 512  # positions in the timed call
MIN_MEASURED_BYTES = 1 << 20
PATHS = ("sdpa", "blocks")
_WARM_UP, _PASSES = 2, 5  # a fresh process's first blocks calls ran 10-30% slow


def blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block: int = BLOCK) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v with queries and keys at the same positions: q [B, H, T, D],
    k and v [B, KVH, T, D] with KVH dividing H (grouped-query heads share their kv head) -> [B, H, T, D]."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    q5 = (q * scale).view(b, k.shape[1], group, t, d)  # query heads grouped by the kv head they read
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    out = torch.empty(b, k.shape[1], group, t, d, dtype=q.dtype, device=q.device)
    above = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)
    for start in range(0, t, block):
        stop = min(start + block, t)
        scores = torch.matmul(q5[..., start:stop, :], k5[..., :stop, :].transpose(-1, -2))
        scores[..., start:stop].masked_fill_(above[: stop - start, : stop - start], float("-inf"))
        out[..., start:stop, :] = torch.matmul(torch.softmax(scores, dim=-1), v5[..., :stop, :])
    return out.view(b, h, t, d)


def run(path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over k, v [B, KVH, T, D] (the same T positions)."""
    if path == "blocks":
        return blocks(q, k, v, scale)
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    raise ValueError(f"unknown prefill attention path {path!r}")


def _seconds(path: str, q, k, v, scale: float) -> float:
    return best_seconds(lambda: run(path, q, k, v, scale), _PASSES, _WARM_UP)


@torch.inference_mode()
def choose(attentions: list, dtype: torch.dtype) -> str | None:
    """Set `prefill_path` on each attention module (with local_heads, local_kv_heads, head_dim) to the
    faster path on this host, timed at CHOOSE_ROWS positions; returns it (None: no modules)."""
    if not attentions:
        return None
    a = attentions[0]
    chosen = "sdpa"
    query_bytes = a.local_heads * CHOOSE_ROWS * a.head_dim * dtype.itemsize
    if query_bytes >= MIN_MEASURED_BYTES:
        q = torch.randn(1, a.local_heads, CHOOSE_ROWS, a.head_dim).to(dtype)
        k, v = (torch.randn(1, a.local_kv_heads, CHOOSE_ROWS, a.head_dim).to(dtype) for _ in range(2))
        seconds = {p: _seconds(p, q, k, v, a.head_dim ** -0.5) for p in PATHS}
        if seconds["blocks"] * MARGIN < seconds["sdpa"]:
            chosen = "blocks"
        log.info("prefill attention (%d heads x %d positions, %s, measured here): %s -> %s", a.local_heads,
                 CHOOSE_ROWS, str(dtype).removeprefix("torch."),
                 ", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in seconds.items()), chosen)
    for a in attentions:
        a.prefill_path = chosen
    return chosen
