"""Each published layout's tensor names, and where each lands in the model's parameters (tp/model.py).

Beside the split table (tp/split.py), which says how each source tensor is cut over the ranks, this is
the other half of the one description the cutter and the loader share:
- InternLM and LLaMA: LLaMA's names (`model.layers.{i}.self_attn.q_proj.weight`, ...);
- InternLM2/2.5: `attention.wqkv` (q/k/v packed per kv group: `num_key_value_heads` groups, each
  [q heads of the group, 1 key head, 1 value head] of head_dim rows), `attention.wo`,
  `feed_forward.w1/w3/w2` (gate/up/down), `attention_norm`, `ffn_norm`, `tok_embeddings`, `output`.
The model fuses q/k/v into `qkv_proj` ([the rank's q heads, its kv heads, its kv heads] rows) and
gate/up into `gate_up_proj`; a tied model has no LM head tensor (its head is the embedding).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from tp.config import ModelConfig

_INTERNLM2_NAMES = [(re.compile(p), r) for p, r in (
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^output\.", "lm_head."),
)]
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")
WQKV = re.compile(r"\.attention\.wqkv\.")


def embedding_name(cfg: ModelConfig) -> str:
    return "model.tok_embeddings.weight" if cfg.layout == "internlm2" else "model.embed_tokens.weight"


def lm_head_name(cfg: ModelConfig) -> str:
    return "output.weight" if cfg.layout == "internlm2" else "lm_head.weight"


def source_names(cfg: ModelConfig) -> list[str]:
    """Every tensor a checkpoint of this layout and shape must hold, in checkpoint order."""
    names = [embedding_name(cfg)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if cfg.layout == "internlm2":
            names.append(p + "attention.wqkv.weight")
            if cfg.bias:
                names.append(p + "attention.wqkv.bias")
            names.append(p + "attention.wo.weight")
            if cfg.bias:
                names.append(p + "attention.wo.bias")
            names += [p + f"feed_forward.{w}.weight" for w in ("w1", "w3", "w2")]
            names += [p + "attention_norm.weight", p + "ffn_norm.weight"]
            continue
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
            if cfg.bias:
                names.append(f"{p}self_attn.{proj}.bias")
        names += [f"{p}mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    return names if cfg.tie_word_embeddings else names + [lm_head_name(cfg)]


def canonical(name: str) -> str:
    """The LLaMA name of a source tensor of any layout (InternLM2's wqkv keeps its own)."""
    for pattern, replacement in _INTERNLM2_NAMES:
        name = pattern.sub(replacement, name)
    return name


@dataclass(frozen=True)
class Target:
    parameter: str
    start: int                          # first row of the parameter this tensor fills
    rows: int | None                    # how many (None: all)
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None  # rows of the rank-local tensor to take


def targets(name: str, cfg: ModelConfig, rank: int, world_size: int) -> list[Target]:
    """Where the rank-local slice of source tensor `name` (or its `_scale`) goes in the model."""
    hd, n = cfg.head_dim, world_size
    q_rows, kv_rows = cfg.num_attention_heads // n * hd, cfg.local_kv_heads(n) * hd
    name = canonical(name)
    if name.endswith("_input_perm"):  # one per fused parameter: its members' must agree (tp.load.fill)
        fused = WQKV.sub(".self_attn.qkv_proj.", name)
        match = _PROJ.search(fused)
        if match:
            fused = fused[: match.start(1)] + _FUSED[match.group(1)] + fused[match.end(1):]
        return [Target(fused, 0, None)]
    if WQKV.search(name):
        return _unpacked_wqkv(name, cfg, rank, world_size, q_rows, kv_rows)
    match = _PROJ.search(name)
    if not match:
        return [Target(name, 0, None)]
    proj = match.group(1)
    fused = name[: match.start(1)] + _FUSED[proj] + name[match.end(1):]
    inter = cfg.intermediate_size // n
    start, rows = {"q_proj": (0, q_rows), "k_proj": (q_rows, kv_rows), "v_proj": (q_rows + kv_rows, kv_rows),
                   "gate_proj": (0, inter), "up_proj": (inter, inter)}[proj]
    return [Target(fused, start, rows)]


def _unpacked_wqkv(name: str, cfg: ModelConfig, rank: int, world_size: int, q_rows: int, kv_rows: int) -> list[Target]:
    """The rank's kv groups of a packed wqkv (weight, bias or scale rows), unpacked into q, k, v.
    Replicated (more ranks than kv heads): the rank holds its whole group and takes its share of
    the group's query heads."""
    hd = cfg.head_dim
    per_group = cfg.num_attention_heads // cfg.kv_heads  # query heads of a group
    replicas = max(1, world_size // cfg.kv_heads)        # ranks sharing one kv group
    share = per_group // replicas                        # query heads of the group on this rank
    first = rank % replicas * share
    fused = WQKV.sub(".self_attn.qkv_proj.", name)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, per_group + 2, hd, *t.shape[1:])

    def q(t):
        return grouped(t)[:, first:first + share].reshape(-1, *t.shape[1:])

    def k(t):
        return grouped(t)[:, per_group].reshape(-1, *t.shape[1:])

    def v(t):
        return grouped(t)[:, per_group + 1].reshape(-1, *t.shape[1:])

    return [Target(fused, 0, q_rows, q), Target(fused, q_rows, kv_rows, k), Target(fused, q_rows + kv_rows, kv_rows, v)]
