"""Weight-only int4: asymmetric, a float16 scale and an integer zero per group of `group_size` input
channels of each output channel, as AWQ stores them (round to nearest, no search).

    w ~= (q - zero) * scale,  q and zero in [0, 15],  scale = (max - min) / 15,  zero = round(-min / scale)

Stored as three tensors per weight [N, K] (SPEC §2), each cut by the one split table (tp/split.py):
    <name>               uint8 [N, K / 2]  two channels a byte (the packing below)
    <name>_group_scale   float16 [N, K / group_size]
    <name>_group_zero    uint8 [N, K / group_size]
Groups never cross a rank's boundary: a row-parallel weight splits its K by whole groups (K / N_ranks
a multiple of group_size, else refused with the numbers), a column-parallel one splits rows.

Packing, per block of 32 input channels: byte i holds channel i in its low nibble and channel 16 + i
in its high one (llama.cpp's Q4 order): a mask gives 16 consecutive channels, a shift the next 16,
so the CPU kernel (tp/csrc/gemv.cpp) unpacks without shuffles.

In memory on the CPU the three are views into one uint8 buffer (fused_rows below): each row holds
its scales, its zeros, padding to a cache line, then its packed bytes. The decode kernel walks a few
rows at a time, each row one stream from memory; with three tensors it walked three streams a row, and
a decode step of the 827M model's int4 matrices took 1.06-1.18x as long (AMD EPYC Zen 3, 2 threads).
Scales after the packed bytes were slower still (0.8x): the stream then jumps back.

Exactness: (q - zero) is an integer of at most 4 bits and the scale a float16 (11 significant bits),
so (q - zero) * scale, and q * scale + (-zero * scale) as the kernel computes it, are exact in float32:
the dequantized weights are the same to the last bit wherever they are made.
"""
from __future__ import annotations

import torch

from tp import cpu_kernels, malloc

BLOCK = 32  # input channels per packing block
DEFAULT_GROUP = 128
SUFFIXES = ("_group_scale", "_group_zero")


ROW_ALIGN = 64  # bytes: a cache line, so a row's packed bytes start on one


def fused_row_layout(cols: int, group_size: int) -> tuple[int, int]:
    """(offset of the packed bytes, bytes a row) in fused_rows' buffer for a [rows, cols] weight."""
    groups = cols // group_size
    head = -(-3 * groups // ROW_ALIGN) * ROW_ALIGN
    return head, -(-(head + cols // 2) // ROW_ALIGN) * ROW_ALIGN


def fused_rows(rows: int, cols: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, cols / 2], scale float16 [rows, groups], zero uint8 [rows, groups]): views
    into one new CPU buffer, row r = [scales | zeros | padding | packed bytes | padding]. Left
    unwritten (torch.empty), so that huge pages can still be advised before the first write."""
    check_group(cols, group_size)
    groups = cols // group_size
    head, row = fused_row_layout(cols, group_size)
    buf = torch.empty(rows, row, dtype=torch.uint8)
    return buf[:, head:head + cols // 2], buf[:, :2 * groups].view(torch.float16), buf[:, 2 * groups:3 * groups]


def group_scale_name(name: str) -> str:
    return name + "_group_scale"


def group_zero_name(name: str) -> str:
    return name + "_group_zero"


def input_perm_name(name: str) -> str:
    """GPTQ act-order: the input channel of each column of the packed weight (tp/formats.py)."""
    return name + "_input_perm"


def check_group(k: int, group_size: int, where: str = "") -> None:
    if group_size < BLOCK or group_size % BLOCK:
        raise ValueError(f"group_size={group_size}: int4 groups are a multiple of {BLOCK} input channels")
    if k % group_size:
        raise ValueError(f"{where}input dimension {k} is not a whole number of groups of {group_size}")


def check_row_split(k: int, group_size: int, world_size: int, name: str) -> None:
    """A row-parallel weight's K must leave every rank whole groups."""
    groups = k // group_size
    if groups % world_size:
        raise ValueError(f"{name}: its {k} input channels are {groups} groups of {group_size}, which do not split "
                         f"into whole groups over {world_size} ranks; choose a TP size dividing {groups}, or another group_size")


def pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] of integers q [N, K] in [0, 15] (K a multiple of BLOCK), in the block order above."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in [0, 15] of packed [N, K / 2]."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(n, half * 2)


def quantize_groups(w: torch.Tensor, group_size: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scale float16 [N, K/g], zero uint8 [N, K/g]) of a [N, K] weight: each
    group's range [min(w, 0), max(w, 0)] over 16 levels (0 included, so an all-zero group stays 0)."""
    n, k = w.shape
    check_group(k, group_size)
    g = w.float().reshape(n, k // group_size, group_size)
    low, high = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15)
    return pack(q.reshape(n, k)), scale.to(torch.float16), zero.to(torch.uint8)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]: (q - zero) * scale, exact (see above)."""
    q = unpack(packed).float()
    n, k = q.shape
    groups = scale.shape[1]
    w = (q.reshape(n, groups, k // groups) - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(n, k)


def kernel_terms(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) in float32 for w = q * scale + offset, offset = -zero * scale (exact)."""
    s = scale.float()
    return s.contiguous(), (-zero.float() * s).contiguous()


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] in `dtype` of packed rows and their stored scales and zeros: q * scale + (-zero * scale),
    exact in float32 (kernel_terms), then one rounding to dtype. On the CPU the kernels' own
    dequantize_int4 makes the same bits (tp/csrc/gemv.cpp), 6x faster than the torch ops below (256 x
    2048 in cache: 51 against 323 us, AMD EPYC Zen 3, 2 threads)."""
    op = cpu_kernels.op("dequantize_int4") if packed.device.type == "cpu" else None
    if op is not None:
        return op(packed, scale, zero, torch.empty(packed.shape[0], packed.shape[1] * 2)).to(dtype)
    s, o = kernel_terms(scale, zero)
    q = unpack(packed).float()
    n, k = q.shape
    groups = s.shape[1]
    w = q.view(n, groups, k // groups).mul_(s[..., None]).add_(o[..., None])
    return w.view(n, k).to(dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                compute: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ W.T for int4 W, a block of weight rows dequantized at a time into the float GEMM of
    `compute` (default x's dtype): bounded memory, prefill's path (and any device's, until a fused
    kernel is routed there). On the CPU the blocks go into reused scratch (tp.malloc.scratch_rows)."""
    compute = compute or x.dtype
    xc = x.to(compute)
    n, k = packed.shape[0], packed.shape[1] * 2
    block = max(1, malloc.SCRATCH_BYTES // max(1, k * 4))
    op = cpu_kernels.op("dequantize_int4") if packed.device.type == "cpu" else None
    y = torch.empty(x.shape[0], n, dtype=compute, device=x.device)
    for i in range(0, n, block):
        p, s, z = packed[i:i + block], scale[i:i + block], zero[i:i + block]
        if op is not None:
            w = op(p, s, z, malloc.scratch_rows(p.shape[0], k, torch.float32, x.device))
            if compute != torch.float32:
                w = malloc.scratch_rows(p.shape[0], k, compute, x.device).copy_(w)
        else:
            w = dequantize_rows(p, s, z, compute)
        torch.mm(xc, w.t(), out=y[:, i:i + w.shape[0]])
    return y.to(x.dtype)


def check_shapes(shapes: dict[str, tuple[int, ...]], group_size: int, world_size: int) -> None:
    """Before anything is read: every weight to be held in int4 ([out, in] source shapes) has whole
    groups, and a row-parallel one whole groups on every rank."""
    from tp.split import split_of
    for name, shape in shapes.items():
        check_group(shape[1], group_size, f"{name}: ")
        if split_of(name).kind == "row":
            check_row_split(shape[1], group_size, world_size, name)


def aten_int4pack_operands(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """(uint8 [N, K/2], scales_and_zeros float32 [K/g, N, 2]) for torch's _convert_weight_to_int4pack /
    _weight_int4pack_mm (CUDA): byte j holds channel 2j in its high nibble and 2j + 1 in its low one,
    and the weight is (q - 8) * scale + zero, so zero = offset + 8 * scale."""
    q = unpack(packed)
    pairs = (q[:, ::2] << 4) | q[:, 1::2]
    return pairs.contiguous(), torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).contiguous()


def npu_operands(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """(int32 [K, N] in [-8, 7], antiquant_scale [K/g, N], antiquant_offset [K/g, N]) for
    npu_convert_weight_to_int4pack / npu_weight_quant_batchmatmul, whose weight is
    (w + offset) * scale per group: w = q - 8, offset = 8 - zero."""
    w = unpack(packed).to(torch.int32) - 8
    return w.t().contiguous(), scale.float().t().contiguous(), (8 - zero.float()).t().contiguous()
