"""Weight-only int8: symmetric, one scale per output channel (row) of every linear weight, and per
token row of the embedding.

w ~= q * scale[:, None], q = round(w / scale) in [-127, 127], scale = max|w_row| / 127 (1 for an
all-zero row). Rows are independent, so the cutter (row blocks) and the loader (a rank's rows, or
full rows for row-parallel weights, whose per-row scales need every column) get the same bits.
Scales travel as `<weight name>_scale` tensors, split by the same table as everything else:
column-parallel scales with their rows, row-parallel scales whole (scaling commutes with the sum).
"""
from __future__ import annotations

import logging
import re

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tp import malloc, triton_int8
from tp.int4 import group_scale_name, group_zero_name, input_perm_name
from tp.routing import int8_route

log = logging.getLogger("internlm_tp")

QUANTIZE_CHOICES = ("none", "int8", "int4")
# Every layout's linear weights (InternLM2's packed wqkv rows are still rows: per-row scales travel
# with them through the cut and the unpacking).
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj"
                     r"|attention\.(wqkv|wo)|feed_forward\.w[123])\.weight$")
_LM_HEAD = ("lm_head.weight", "output.weight")
_EMBEDDING = ("model.embed_tokens.weight", "model.tok_embeddings.weight")  # a lookup reads one row and its scale


@dataclass(frozen=True)
class WeightFormat:
    """How a layer's weight is held: "float" (the activations' dtype), "int8" (per-row scales) or
    "int4" (tp/int4.py, groups of group_size input channels). False when float."""
    kind: str = "float"
    group_size: int = 0
    act_order: bool = False  # int4 from GPTQ act-order: an input permutation per weight

    def __bool__(self) -> bool:
        return self.kind != "float"

    @staticmethod
    def of(value: "bool | WeightFormat") -> "WeightFormat":
        if isinstance(value, WeightFormat):
            return value
        return WeightFormat("int8") if value else WeightFormat()


def stored_names(name: str, quantize: str, act_order: bool = False) -> list[str]:
    """The tensors a quantized source weight `name` is stored as under `quantize` (int8 or int4; int4
    from a GPTQ act-order checkpoint also carries its input permutation)."""
    if quantize == "int4":
        return [name, group_scale_name(name), group_zero_name(name)] + ([input_perm_name(name)] if act_order else [])
    return [name, scale_name(name)]


def quantize_weight(name: str, w: torch.Tensor, quantize: str, group_size: int = 0) -> dict[str, torch.Tensor]:
    """The stored tensors (stored_names) of float weight `name` [rows, cols] under `quantize`: int8 rows
    and their scales, or int4 groups (tp/int4.py) of `group_size`."""
    if quantize == "int4":
        from tp import int4
        return dict(zip(stored_names(name, quantize), int4.quantize_groups(w.float(), group_size)))
    return dict(zip(stored_names(name, quantize), quantize_rows(w)))


def check_choice(quantize: str) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")


def is_quantized(name: str, quantize: str, lm_head: bool = True, embedding: bool = True) -> bool:
    """Whether source weight `name` is stored quantized (int8 + scales, int4 + group scales and zeros)
    under this setting."""
    return quantize in ("int8", "int4") and (bool(_LINEAR.match(name)) or (embedding and name in _EMBEDDING)
                                   or (lm_head and name in _LM_HEAD))


def lm_head_quantized(tied: bool, lm_head: bool, embedding: bool) -> bool:
    """Whether the LM head is int8 (given quantize=int8): a tied head is the embedding's own tensor,
    so it is quantized exactly when the embedding is."""
    return embedding if tied else lm_head


def scale_name(name: str) -> str:
    return name + "_scale"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, float32 per-row scales) of a [rows, cols] weight (any float dtype)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantized_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None,
                       compute: torch.dtype | None = None, rows_per_gemm: int | None = None) -> torch.Tensor:
    """x @ (q * scale[:, None]).T through the float GEMM of `compute` (default x's dtype), a block of
    weight rows at a time converted into reused scratch (bounded memory, and the block is still in
    cache for the GEMM), then the per-row scales applied to the result in its dtype (mixed-dtype
    multiplies take a slow path on the CPU: 8x). `q` may be int8 or a float dtype (scale None): on a
    CPU without native bfloat16 GEMMs, bfloat16 weights through a float32 GEMM are ~7x faster; a
    weight already in `compute` is multiplied in place, a block at a time.
    rows_per_gemm: at most this many weight rows per GEMM (tp.decode_matmul.choose_prefill measures
    whether smaller GEMMs are faster on this host; None: as many as the scratch holds)."""
    compute = compute or x.dtype
    xc = x.to(compute)
    block = max(1, malloc.SCRATCH_BYTES // max(1, q.shape[1] * xc.element_size()))
    if rows_per_gemm:
        block = min(block, rows_per_gemm)

    def in_compute(rows: torch.Tensor) -> torch.Tensor:
        return rows if rows.dtype == compute else malloc.scratch_rows(*rows.shape, compute, x.device).copy_(rows)

    if block >= q.shape[0]:
        y = F.linear(xc, in_compute(q))
    else:  # each block's GEMM writes its columns of y in place (BLAS takes y's row stride): no cat
        y = torch.empty(*x.shape[:-1], q.shape[0], dtype=compute, device=x.device)
        x2, y2 = xc.reshape(-1, q.shape[1]), y.view(-1, q.shape[0])
        for i in range(0, q.shape[0], block):
            rows = q[i:i + block]
            torch.mm(x2, in_compute(rows).t(), out=y2[:, i:i + rows.shape[0]])
    if scale is not None:
        y = y.mul_(scale.to(y.dtype))
    return y.to(x.dtype)


_told: set[str] = set()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, compute: torch.dtype | None = None,
                rows_per_gemm: int | None = None) -> torch.Tensor:
    """x @ (q * scale[:, None]).T without materialising the whole float weight; `scale` is float32.

    For prefill-sized inputs (a few rows of x on the CPU go through tp.decode_matmul's choice instead):
    `dequantized_linear`, for the float GEMM is ~6x faster than torch's int8 kernel at 512 rows.
    NPU: torch_npu.npu_weight_quant_batchmatmul where its documented limits allow (tp.routing); CUDA
    decode rows: tp.triton_int8's kernel; else the dequantizing path, said once per reason.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.numel() // k if k else 0
    route, why = int8_route(x.device.type, x.dtype, q.shape[0], k, rows, x.is_cuda and triton_int8.available())
    if route == "triton":
        return triton_int8.int8_rows_linear(x, q, scale)
    if route == "npu_weight_quant":
        import torch_npu
        if hasattr(torch_npu, "npu_weight_quant_batchmatmul"):
            y = torch_npu.npu_weight_quant_batchmatmul(x.reshape(-1, k), q.t(), scale.to(x.dtype))
            return y.view(*lead, q.shape[0])
        why = "the installed torch_npu has no npu_weight_quant_batchmatmul"
    if why and why not in _told:
        _told.add(why)
        log.info("int8 on %s: %s; dequantizing instead", x.device.type, why)
    return dequantized_linear(x, q, scale, compute, rows_per_gemm)
