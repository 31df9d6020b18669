"""Weight-only int8 for decode rows on a GPU, dequantized inside the matmul: a Triton kernel.

Without it, each CUDA step converted every int8 weight to bfloat16 in memory and then multiplied
(tp.quant.dequantized_linear): on an H200 that made int8 2.4-2.7x slower than bfloat16 (docs/performance.md), the
opposite of its point. Here each weight byte is read once, widened in registers, and multiplied:
a step reads half of bfloat16's bytes. (torch's own _weight_int8pack_mm on CUDA runs one thread per
output with the weight rows read K apart, uncoalesced; not a route.)

  y [M, N] = (x [M, K] @ q [N, K].T) * scale [N],  M <= BLOCK_M rows (decode), x float16 or bfloat16

Each program owns BLOCK_N output columns of one row: it walks K in BLOCK_K steps, loading a
[BLOCK_N, BLOCK_K] tile of int8 weights (contiguous along K, coalesced) and the row's BLOCK_K
activations, and sums their products in float32 (a reduction, not tl.dot: at one row a dot pads M to
16 for nothing, and Triton's interpreter multiplies bfloat16 dots wrongly). Rows past the first read
the same tiles again, mostly from L2. The per-row scale multiplies the float32 sum once, then one
rounding to x's dtype.

Tested on the CPU in Triton's interpreter (TRITON_INTERPRET=1) against float64; its speed is the
GPU's to tell (bench/gpu.py).
"""
from __future__ import annotations

import functools

import torch

BLOCK_M = 16  # decode rows a call: tp.cpu_kernels.MAX_ROWS
BLOCK_N, BLOCK_K = 64, 128
DTYPES = (torch.float16, torch.bfloat16)

_kernel = None


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_rows(x_ptr, q_ptr, scale_ptr, y_ptr, N, K, stride_xm, stride_qn, stride_ym,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(1)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            q = tl.load(q_ptr + n[:, None] * stride_qn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                        other=0)
            acc += tl.sum(q.to(tl.float32) * x[None, :], axis=1)
        scale = tl.load(scale_ptr + n, mask=n < N, other=0.0)
        tl.store(y_ptr + m * stride_ym + n, (acc * scale).to(y_ptr.dtype.element_ty), mask=n < N)

    return int8_rows


def int8_rows_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] (at most BLOCK_M rows, float16 or bfloat16) @ (q [N, K] int8 * scale [N] float32).T."""
    global _kernel
    import triton
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    rows, n = x2.shape[0], q.shape[0]
    if rows > BLOCK_M or x.dtype not in DTYPES or q.dtype != torch.int8 or q.stride(1) != 1:
        raise ValueError(f"int8_rows_linear: up to {BLOCK_M} float16/bfloat16 rows and a row-major int8 weight, "
                         f"got {rows} rows of {x.dtype}, weight {q.dtype} strides {q.stride()}")
    if _kernel is None:
        _kernel = _build()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _kernel[(triton.cdiv(n, BLOCK_N), rows)](x2, q, scale, y, n, k, x2.stride(0), q.stride(0), y.stride(0),
                                             BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.view(*lead, n)
