"""Tensor-parallel layers, in Megatron-LM's vocabulary. Each holds only its rank's slice.

ColumnParallelLinear   W split on output features; no communication, output stays sharded.
RowParallelLinear      W split on input features; partial outputs all-reduced, bias added once.
VocabParallelEmbedding vocabulary rows split; masked local lookup, then all-reduce.
ParallelLMHead         vocabulary rows split; local logits all-gathered, padding cut off.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from tp import comm, cpu_kernels, decode_matmul, int4
from tp.cpu_kernels import MAX_ROWS
from tp.quant import WeightFormat, dequantized_linear, int8_linear
from tp.routing import INT4_INNER_K_TILES, int4_route, matmul_route, npu_soc_has_int4


log = logging.getLogger("internlm_tp")
_told: set[str] = set()


def _device_facts(device: torch.device) -> tuple[tuple[int, int], bool]:
    """(CUDA compute capability, whether an NPU packs int4) of `device`, for tp.routing.int4_route."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device), False
    if device.type == "npu":
        import torch_npu
        return (0, 0), hasattr(torch_npu, "npu_convert_weight_to_int4pack") and npu_soc_has_int4(
            torch_npu.npu.get_device_name(device.index or 0))
    return (0, 0), False


def _aten_int4pack(layer, device: torch.device):
    terms = int4.kernel_terms(layer.weight_group_scale, layer.weight_group_zero)
    pairs, scales_and_zeros = int4.aten_int4pack_operands(layer.weight, *terms)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.to(device), INT4_INNER_K_TILES)
    return packed, scales_and_zeros.to(device=device, dtype=torch.bfloat16)


def _npu_int4(layer, device: torch.device, dtype: torch.dtype):
    import torch_npu
    w, s, o = int4.npu_operands(layer.weight, layer.weight_group_scale, layer.weight_group_zero)
    return torch_npu.npu_convert_weight_to_int4pack(w.to(device)), s.to(device, dtype), o.to(device, dtype)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class _Weight(nn.Module):
    """A [rows, cols] weight, float or int8 with one float32 scale per row (`weight_scale`, kept in
    float32 whatever the activations' `dtype`, as the checkpoint stores it).

    On the CPU, up to MAX_ROWS rows of activations (decode) go through `decode_path`, the kernel
    tp.decode_matmul measured fastest for this weight's shape on this host (or, before any choice, its
    first candidate); more rows (prefill) through torch's GEMM."""

    decode_path: str | None = None
    prefill_compute: torch.dtype | None = None  # float32: prefill GEMMs on weights converted to it
    prefill_rows: int | None = None  # at most this many weight rows per prefill GEMM (None: no limit)
    many_prefill_rows = True  # whether prefill sends it every position (what prefill choices are timed on)

    def _make_weight(self, rows: int, cols: int, quantized: "bool | WeightFormat", dtype: torch.dtype, device) -> None:
        self.format = WeightFormat.of(quantized)
        self.quantized, self.dtype = bool(self.format), dtype
        self.weight_scale = None
        if self.format.kind == "int4":  # tp/int4.py: packed nibbles, a float16 scale and a zero per group
            groups = cols // self.format.group_size
            if torch.device(device if device is not None else "cpu").type == "cpu":  # one stream a row
                packed, scale, zero = int4.fused_rows(rows, cols, self.format.group_size)
                self.weight, self.weight_group_scale, self.weight_group_zero = (
                    nn.Parameter(t, requires_grad=False) for t in (packed, scale, zero))
            else:
                self.weight = _empty(rows, cols // 2, dtype=torch.uint8, device=device)
                self.weight_group_scale = _empty(rows, groups, dtype=torch.float16, device=device)
                self.weight_group_zero = _empty(rows, groups, dtype=torch.uint8, device=device)
            if self.format.act_order:  # x[..., perm] meets the packed columns (tp/formats.py)
                self.weight_input_perm = _empty(cols, dtype=torch.int64, device=device)
            return
        self.weight = _empty(rows, cols, dtype=torch.int8 if self.quantized else dtype, device=device)
        if self.quantized:
            self.weight_scale = _empty(rows, dtype=torch.float32, device=device)

    def _int4_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.numel() // k if k else 0
        op = cpu_kernels.op_for("gemv_int4", x, MAX_ROWS)
        if op is not None:  # the stored float16 scales and uint8 zeros, as they are
            y = op(x.reshape(rows, k).contiguous(), self.weight, self.weight_group_scale, self.weight_group_zero, bias)
            return y.view(*lead, self.weight.shape[0])
        route, why = int4_route(x.device.type, x.dtype, self.weight.shape[0], k, self.format.group_size, rows,
                                *_device_facts(x.device))
        x2 = x.reshape(rows, k)
        if route == "aten_int4pack":
            packed, scales_and_zeros = self._fused(route, lambda: _aten_int4pack(self, x.device))
            y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, self.format.group_size, scales_and_zeros)
        elif route == "npu_weight_quant":
            import torch_npu
            w, s, o = self._fused(route, lambda: _npu_int4(self, x.device, x.dtype))
            y = torch_npu.npu_weight_quant_batchmatmul(x2, w, s, o, antiquant_group_size=self.format.group_size)
        else:
            if why and why not in _told:
                _told.add(why)
                log.info("int4 on %s: %s; dequantizing instead", x.device.type, why)
            y = int4.int4_linear(x2, self.weight, self.weight_group_scale, self.weight_group_zero, self.prefill_compute)
        y = y if bias is None else y.add_(bias)
        return y.view(*lead, self.weight.shape[0])

    def _fused(self, route: str, make):
        """The device-side operands of a fused int4 route, made once (the packed weight stays as loaded:
        the CPU kernel and prefill's dequantizing path read it)."""
        if getattr(self, "_fused_operands", None) is None or self._fused_operands[0] != route:
            self._fused_operands = (route, make())
        return self._fused_operands[1]

    def chosen_decode_path(self, x_dtype: torch.dtype) -> str:
        """decode_path; before any choice, tp.decode_matmul's first candidate, kept."""
        if self.decode_path is None:
            self.decode_path = decode_matmul.candidates(self.weight, x_dtype)[0]
        return self.decode_path

    def decode_call(self, bias: torch.Tensor | None = None):
        """The call `matmul(x, bias)` makes for a few contiguous rows x [M, K] (M <= MAX_ROWS) of the
        activations' dtype on the CPU, bound to this weight once (tp.cpu_step), or None where the
        kernels are not built (matmul then takes torch's routes)."""
        if self.format.kind == "int4":
            op = cpu_kernels.op("gemv_int4")
            if op is None:
                return None
            w, scale, zero = self.weight, self.weight_group_scale, self.weight_group_zero
            return lambda x: op(x, w, scale, zero, bias)
        path, w, scale = self.chosen_decode_path(self.dtype), self.weight, self.weight_scale
        if path == "ours":
            op = cpu_kernels.gemv()
            return lambda x: op(x, w, scale, bias)
        return lambda x: decode_matmul.run(path, x, w, scale, bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.format.kind == "int4":
            return self._int4_matmul(x, bias)
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.numel() // k if k else 0
        if matmul_route(x.device.type, rows, MAX_ROWS) == "decode":
            y = decode_matmul.run(self.chosen_decode_path(x.dtype), x.reshape(rows, k), self.weight, self.weight_scale,
                                  bias)
            return y.view(*lead, self.weight.shape[0])
        if not self.quantized and self.prefill_compute is None and self.prefill_rows is None:
            return F.linear(x, self.weight, bias)
        if self.quantized:
            y = int8_linear(x, self.weight, self.weight_scale, self.prefill_compute, self.prefill_rows)
        else:
            y = dequantized_linear(x, self.weight, None, self.prefill_compute, self.prefill_rows)
        return y if bias is None else y.add_(bias)


class ColumnParallelLinear(_Weight):
    """y_r = x W_r^T + b_r with W_r = rows [r*out/N, (r+1)*out/N) of W. Several source matrices may be
    stacked into one (fused q/k/v, gate/up): `out_features` is then their total."""

    def __init__(self, in_features: int, out_features: int, world_size: int, bias: bool,
                 dtype: torch.dtype, device=None, quantized: "bool | WeightFormat" = False):
        super().__init__()
        assert out_features % world_size == 0, (out_features, world_size)
        self._make_weight(out_features // world_size, in_features, quantized, dtype, device)
        self.bias = _empty(out_features // world_size, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format.act_order:
            x = x.index_select(-1, self.weight_input_perm)
        return self.matmul(x, self.bias)


class RowParallelLinear(_Weight):
    """y = sum_r x_r W_r^T + b: each rank multiplies its input shard, the sum is an all-reduce, and the
    bias (whole on every rank) is added once after it."""

    def __init__(self, in_features: int, out_features: int, world_size: int, bias: bool,
                 dtype: torch.dtype, device=None, quantized: "bool | WeightFormat" = False):
        super().__init__()
        assert in_features % world_size == 0, (in_features, world_size)
        self.world_size = world_size
        self._make_weight(out_features, in_features // world_size, quantized, dtype, device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format.act_order:  # this rank's whole groups of the sorted inputs: from every rank's shard
            x = (comm.current().all_gather(x) if self.world_size > 1 else x).index_select(-1, self.weight_input_perm)
        y = self.matmul(x)  # int8: each rank's partial sum is already scaled (scales are per output)
        if self.world_size > 1:
            comm.current().all_reduce(y)
        return y if self.bias is None else y.add_(self.bias)


class VocabParallelEmbedding(_Weight):
    """Rank r holds token rows [r*V'/N, (r+1)*V'/N) of the embedding, V' the vocab padded to a multiple
    of N. Ids outside the slice look up zeros, so the all-reduce sums exactly one real row per token.
    int8: each row has its own scale, applied after the lookup."""

    def __init__(self, padded_vocab: int, hidden: int, rank: int, world_size: int,
                 dtype: torch.dtype, device=None, quantized: "bool | WeightFormat" = False):
        super().__init__()
        self.world_size = world_size
        self.per_rank = padded_vocab // world_size
        self.start = rank * self.per_rank
        self._make_weight(self.per_rank, hidden, quantized, dtype, device)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        if self.format.kind == "int4":
            scale, zero = self.weight_group_scale[ids], self.weight_group_zero[ids]
            flat = int4.dequantize_rows(rows.reshape(-1, rows.shape[-1]), scale.reshape(-1, scale.shape[-1]),
                                        zero.reshape(-1, zero.shape[-1]))
            return flat.view(*ids.shape, -1).to(self.dtype)
        if self.quantized:
            rows = (rows.float() * self.weight_scale[ids].unsqueeze(-1)).to(self.dtype)
        return rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return self._lookup(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = self._lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        comm.current().all_reduce(out)
        return out


class ParallelLMHead(_Weight):
    """Logits for this rank's vocabulary slice, gathered from all ranks; the zero padding rows are cut
    off, so every rank ends with the same [..., vocab_size] logits."""

    many_prefill_rows = False  # prefill runs only the last position through it (InternLM.forward)

    def __init__(self, hidden: int, padded_vocab: int, vocab_size: int, world_size: int,
                 dtype: torch.dtype, device=None, quantized: "bool | WeightFormat" = False):
        super().__init__()
        self.world_size = world_size
        self.vocab_size = vocab_size
        self._make_weight(padded_vocab // world_size, hidden, quantized, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.matmul(x)
        if self.world_size == 1:
            return local[..., : self.vocab_size]
        return comm.current().all_gather(local)[..., : self.vocab_size]
