"""Weight-only int8: symmetric, one scale per output channel (row) of every linear weight, and per
token row of the embedding.

w ~= q * scale[:, None], q = round(w / scale) in [-127, 127], scale = max|w_row| / 127 (1 for an
all-zero row). Rows are independent, so the cutter (row blocks) and the loader (a rank's rows, or
full rows for row-parallel weights, whose per-row scales need every column) get the same bits.
Scales travel as `<weight name>_scale` tensors, split by the same table as everything else:
column-parallel scales with their rows, row-parallel scales whole (scaling commutes with the sum).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from tp.cpu_kernels import MAX_ROWS, int8_gemv

QUANTIZE_CHOICES = ("none", "int8")
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_LM_HEAD = "lm_head.weight"
_EMBEDDING = "model.embed_tokens.weight"  # per-row int8 too: a lookup reads one row and its scale


def check_choice(quantize: str) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")


def is_quantized(name: str, quantize: str, lm_head: bool = True, embedding: bool = True) -> bool:
    """Whether source weight `name` is stored as int8 + scales under this setting."""
    return quantize == "int8" and (bool(_LINEAR.match(name)) or (embedding and name == _EMBEDDING)
                                   or (lm_head and name == _LM_HEAD))


def scale_name(name: str) -> str:
    return name + "_scale"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, float32 per-row scales) of a [rows, cols] weight (any float dtype)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale[:, None]).T without materialising the float weight where a kernel allows;
    `scale` is float32.

    CPU, up to 4 rows of x (decode): tp/csrc/int8_gemv.cpp, float32 products and sums (tp/cpu_kernels.py
    says where it is used). More rows (prefill) in bfloat16: torch._weight_int8pack_mm, for K a multiple
    of 16. NPU: torch_npu.npu_weight_quant_batchmatmul when the installed torch_npu has it. Elsewhere
    (float32 prefill on the CPU, CUDA): dequantise in the matmul, which torch.compile can fuse.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if x.device.type == "cpu":
        rows = x.numel() // k if k else 0
        gemv = int8_gemv() if 0 < rows <= MAX_ROWS else None
        if gemv is not None:
            y = gemv(x.reshape(rows, k).float().contiguous(), q, scale)
            return y.view(*lead, q.shape[0]).to(x.dtype)
        # torch's kernel rounds activations to bfloat16, so float32 ones go the dequantizing way (the
        # same precision in every layer, whatever its shape and TP size). It also reads past the row
        # (garbage, or a segfault) unless K is a multiple of 16, e.g. down_proj at TP=4 of a 480-wide MLP.
        if x.dtype == torch.bfloat16 and k % 16 == 0:
            y = torch._weight_int8pack_mm(x.reshape(-1, k), q, scale.to(torch.bfloat16))
            return y.view(*lead, q.shape[0])
    if x.device.type == "npu":
        import torch_npu
        if hasattr(torch_npu, "npu_weight_quant_batchmatmul"):
            y = torch_npu.npu_weight_quant_batchmatmul(x.reshape(-1, k), q.t(), scale.to(x.dtype))
            return y.view(*lead, q.shape[0])
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
