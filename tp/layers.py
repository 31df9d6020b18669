"""Tensor-parallel layers, in Megatron-LM's vocabulary. Each holds only its rank's slice.

ColumnParallelLinear   W split on output features; no communication, output stays sharded.
RowParallelLinear      W split on input features; partial outputs all-reduced, bias added once.
VocabParallelEmbedding vocabulary rows split; masked local lookup, then all-reduce.
ParallelLMHead         vocabulary rows split; local logits all-gathered, padding cut off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp import comm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for a single row (batch-1 decode), which goes through torch.mv: on the CPU
    its GEMV kernel reads bfloat16 weights ~20% faster than linear's GEMM path (bench/decode.py)."""
    if x.numel() != x.shape[-1]:
        return F.linear(x, weight, bias)
    y = torch.mv(weight, x.reshape(-1))
    if bias is not None:
        y = y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r with W_r = rows [r*out/N, (r+1)*out/N) of W. Several source matrices may be
    stacked into one (fused q/k/v, gate/up): `out_features` is then their total."""

    def __init__(self, in_features: int, out_features: int, world_size: int, bias: bool,
                 dtype: torch.dtype, device=None):
        super().__init__()
        assert out_features % world_size == 0, (out_features, world_size)
        self.weight = _empty(out_features // world_size, in_features, dtype=dtype, device=device)
        self.bias = _empty(out_features // world_size, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: each rank multiplies its input shard, the sum is an all-reduce, and the
    bias (whole on every rank) is added once after it."""

    def __init__(self, in_features: int, out_features: int, world_size: int, bias: bool,
                 dtype: torch.dtype, device=None):
        super().__init__()
        assert in_features % world_size == 0, (in_features, world_size)
        self.world_size = world_size
        self.weight = _empty(out_features, in_features // world_size, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        if self.world_size > 1:
            comm.current().all_reduce(y)
        return y if self.bias is None else y.add_(self.bias)


class VocabParallelEmbedding(nn.Module):
    """Rank r holds token rows [r*V'/N, (r+1)*V'/N) of the embedding, V' the vocab padded to a multiple
    of N. Ids outside the slice look up zeros, so the all-reduce sums exactly one real row per token."""

    def __init__(self, padded_vocab: int, hidden: int, rank: int, world_size: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.world_size = world_size
        self.per_rank = padded_vocab // world_size
        self.start = rank * self.per_rank
        self.weight = _empty(self.per_rank, hidden, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        comm.current().all_reduce(out)
        return out


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, gathered from all ranks; the zero padding rows are cut
    off, so every rank ends with the same [..., vocab_size] logits."""

    def __init__(self, hidden: int, padded_vocab: int, vocab_size: int, world_size: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.world_size = world_size
        self.vocab_size = vocab_size
        self.weight = _empty(padded_vocab // world_size, hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = linear(x, self.weight)
        if self.world_size == 1:
            return local[..., : self.vocab_size]
        return comm.current().all_gather(local)[..., : self.vocab_size]
