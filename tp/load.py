"""Build the model for one rank and fill it with that rank's slices of a checkpoint."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from tp.checkpoint import CheckpointError, CheckpointReader, read_shard
from tp.config import ModelConfig
from tp.model import InternLM
from tp.partition import is_cut, open_partition

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Source projections stacked into one fused parameter: name -> (fused name, position, count).
_FUSED = {"q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
          "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}
_PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")


def expected_names(cfg: ModelConfig) -> list[str]:
    """Every tensor an InternLM checkpoint of this shape must hold (LLaMA names)."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
            if cfg.bias:
                names.append(f"{p}self_attn.{proj}.bias")
        names += [f"{p}mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


def parameter_of(name: str) -> tuple[str, int, int]:
    """(model parameter, position among the fused pieces, number of pieces) for a source tensor."""
    match = _PROJ.search(name)
    if not match:
        return name, 0, 1
    fused, piece, pieces = _FUSED[match.group(1)]
    return name[: match.start(1)] + fused + name[match.end(1):], piece, pieces


def resolve_dtype(requested: str, source: torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype, except float16 on the CPU, where bfloat16 is far faster."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype={requested!r}: expected auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if source == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return source if source in DTYPES.values() else torch.float32


def fill(model: InternLM, local_tensor: Callable[[str], torch.Tensor]) -> None:
    """Copy every source tensor's rank-local slice into its (possibly fused) parameter."""
    params = dict(model.named_parameters())
    for name in expected_names(model.cfg):
        target, piece, pieces = parameter_of(name)
        param = params[target]
        tensor = local_tensor(name)
        rows = param.shape[0] // pieces
        expected = (rows, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"tensor {name}: rank-local shape {tuple(tensor.shape)}, "
                                  f"the model expects {expected}")
        param.data[piece * rows:(piece + 1) * rows].copy_(tensor)


def load_model(path: str | Path, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
               dtype: str = "auto") -> InternLM:
    """A rank's model from a cut directory (its own `rank_r/`) or from an uncut published checkpoint
    (reading only its own slices, through mmap/safetensors)."""
    device = torch.device(device)
    cut = is_cut(path)
    directory = open_partition(path, rank, world_size)[0] if cut else Path(path)
    cfg = ModelConfig.load(directory)
    cfg.check_divisible(world_size)
    source = CheckpointReader(directory)
    padded = cfg.padded_vocab_size(world_size)

    def local(name: str) -> torch.Tensor:  # a cut already holds rank-local slices
        return source.read(name) if cut else read_shard(source, name, rank, world_size, padded)

    missing = [n for n in expected_names(cfg) if n not in set(source.names())]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model = InternLM(cfg, rank, world_size, resolve_dtype(dtype, source.dtype("model.norm.weight"), device), device)
    fill(model, local)
    return model.eval()
