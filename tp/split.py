"""The one table that says how every checkpoint tensor is split across tensor-parallel ranks.

Both the runtime loader (`tp.checkpoint`) and the offline cutter (`cut_weights`) read it; nothing
else in the code base decides a split dimension.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    kind: str            # "column", "kv", "row", "vocab" or "replicated"
    dim: int | None      # dimension of the source tensor that is cut, None when whole on every rank


COLUMN = Split("column", 0)       # output features split: q, gate, up
# Rows in whole kv-head groups (k/v projections, InternLM2's packed wqkv): split when N divides the
# kv heads, else each rank keeps its query heads' kv group (N a multiple of them: replicated).
KV = Split("kv", 0)
ROW = Split("row", 1)             # input features split: o_proj, down_proj; outputs all-reduced
ROW_INPUTS = Split("row", 0)      # a row-parallel weight's 1-D list over its input features (act-order)
VOCAB = Split("vocab", 0)         # vocabulary rows split, padded with zero rows to a multiple of N
REPLICATED = Split("replicated", None)

# Source names of every published layout (tp/layout.py maps them onto the model's parameters).
SPLIT_TABLE: tuple[tuple[re.Pattern, Split], ...] = tuple((re.compile(p), s) for p, s in (
    # InternLM / LLaMA names
    (r"^model\.layers\.\d+\.self_attn\.q_proj\.(weight|bias|weight_scale|weight_group_scale|weight_group_zero)$", COLUMN),
    (r"^model\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias|weight_scale|weight_group_scale|weight_group_zero)$", KV),
    (r"^model\.layers\.\d+\.mlp\.(gate|up)_proj\.(weight|weight_scale|weight_group_scale|weight_group_zero)$", COLUMN),
    # (int4: packed [out, in / 2] and the group scales and zeros [out, in / group] cut alike, by
    # whole groups of input channels: tp/int4.check_row_split)
    (r"^model\.layers\.\d+\.self_attn\.o_proj\.(weight|weight_group_scale|weight_group_zero)$", ROW),
    (r"^model\.layers\.\d+\.mlp\.down_proj\.(weight|weight_group_scale|weight_group_zero)$", ROW),
    # o_proj's bias is added once, after the all-reduce, so every rank keeps all of it.
    (r"^model\.layers\.\d+\.self_attn\.o_proj\.bias$", REPLICATED),
    (r"^model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight$", REPLICATED),
    (r"^model\.norm\.weight$", REPLICATED),
    (r"^model\.embed_tokens\.(weight|weight_scale|weight_group_scale|weight_group_zero)$", VOCAB),
    (r"^lm_head\.(weight|weight_scale|weight_group_scale|weight_group_zero)$", VOCAB),
    # InternLM2 names: wqkv packs q/k/v per kv group, cut by whole groups
    (r"^model\.layers\.\d+\.attention\.wqkv\.(weight|bias|weight_scale|weight_group_scale|weight_group_zero)$", KV),
    (r"^model\.layers\.\d+\.attention\.wo\.bias$", REPLICATED),
    (r"^model\.layers\.\d+\.feed_forward\.w[13]\.(weight|weight_scale|weight_group_scale|weight_group_zero)$", COLUMN),
    (r"^model\.layers\.\d+\.(attention\.wo|feed_forward\.w2)\.(weight|weight_group_scale|weight_group_zero)$", ROW),
    (r"^model\.layers\.\d+\.(attention_norm|ffn_norm)\.weight$", REPLICATED),
    (r"^model\.tok_embeddings\.(weight|weight_scale|weight_group_scale|weight_group_zero)$", VOCAB),
    (r"^output\.(weight|weight_scale|weight_group_scale|weight_group_zero)$", VOCAB),
    # GPTQ act-order input permutations (tp/formats.py): whole for layers that see the whole input,
    # cut with the input features of row-parallel ones (by whole groups, as their weights)
    (r"^model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj|attention\.wqkv|feed_forward\.w[13])"
     r"\.weight_input_perm$", REPLICATED),
    (r"^model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj|attention\.wo|feed_forward\.w2)\.weight_input_perm$",
     ROW_INPUTS),
    # Per-output-channel int8 scales (tp/quant.py) follow their weight's rows (above); a row-parallel
    # weight keeps all its rows on every rank, so its scales are whole.
    (r"^model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj|attention\.wo|feed_forward\.w2)\.weight_scale$",
     REPLICATED),
))

# Buffers some published `.bin` files carry that hold nothing a loader needs.
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_dropped(name: str) -> bool:
    return bool(_DROPPED.search(name))


def split_of(name: str) -> Split:
    for pattern, split in SPLIT_TABLE:
        if pattern.match(name):
            return split
    raise KeyError(f"tensor {name!r} is not part of the InternLM, InternLM2 or LLaMA layout")


def shard_range(size: int, rank: int, world_size: int, padded_size: int | None = None,
                groups: int | None = None) -> tuple[int, int, int]:
    """Rows [start, stop) of a dimension of `size` that `rank` holds, and how many zero rows pad it.

    With `padded_size` (vocab splits) each rank owns padded_size / world_size rows, the tail of the
    last ranks lying past the real vocabulary and filled with zeros. With `groups` (kv splits: the
    dimension is that many equal groups) fewer than the ranks, rank r holds group r // (N / groups).
    """
    if groups is not None and groups < world_size:
        if size % groups or world_size % groups:
            raise ValueError(f"{groups} kv groups of a dimension {size} do not place over {world_size} ranks")
        per_group = size // groups
        start = rank // (world_size // groups) * per_group
        return start, start + per_group, 0
    total = size if padded_size is None else padded_size
    if total % world_size:
        raise ValueError(f"dimension {total} does not split over {world_size} ranks")
    per_rank = total // world_size
    start = rank * per_rank
    stop = min(start + per_rank, size)
    start = min(start, size)
    return start, stop, per_rank - (stop - start)


def shard_bounds(name: str, shape: tuple[int, ...], rank: int, world_size: int,
                 padded_vocab: int | None, kv_heads: int | None = None) -> tuple[Split, int, int, int]:
    """(split, start, stop, zero rows to append) of tensor `name` for `rank`; `kv_heads` places kv
    splits (None: as many kv heads as ranks need, an even split)."""
    split = split_of(name)
    if split.dim is None:
        return split, 0, 0, 0
    size = shape[split.dim]
    return (split, *shard_range(size, rank, world_size, padded_vocab if split.kind == "vocab" else None,
                                kv_heads if split.kind == "kv" else None))


def local_shape(name: str, shape: tuple[int, ...], rank: int, world_size: int,
                padded_vocab: int | None, kv_heads: int | None = None) -> tuple[int, ...]:
    split, start, stop, pad = shard_bounds(name, shape, rank, world_size, padded_vocab, kv_heads)
    if split.dim is None:
        return tuple(shape)
    return tuple(stop - start + pad if d == split.dim else n for d, n in enumerate(shape))


def pad_rows(part: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    if not pad:
        return part
    shape = list(part.shape)
    shape[dim] = pad
    return torch.cat([part, part.new_zeros(shape)], dim=dim)

