"""Build the model for one rank and fill it with that rank's slices of a checkpoint."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from tp import decode_matmul
from tp.checkpoint import READ_BLOCK_BYTES, CheckpointError, CheckpointReader, read_shard
from tp.config import ModelConfig
from tp.model import InternLM
from tp.partition import is_cut, open_partition
from tp.quant import check_choice, is_quantized, quantize_rows, scale_name
from tp.split import pad_rows, shard_bounds

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Source projections stacked into one fused parameter: name -> (fused name, position, count).
_FUSED = {"q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
          "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}
_PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")


def expected_names(cfg: ModelConfig, quantize: str = "none", quantize_lm_head: bool = True,
                   quantize_embedding: bool = True) -> list[str]:
    """Every tensor an InternLM checkpoint of this shape must hold (LLaMA names); with int8, each
    quantized weight is followed by its `_scale`."""
    names = _source_names(cfg)
    return [m for n in names
            for m in ([n, scale_name(n)] if is_quantized(n, quantize, quantize_lm_head, quantize_embedding) else [n])]


def _source_names(cfg: ModelConfig) -> list[str]:
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


def fill(model: InternLM, local_tensor: Callable[[str], torch.Tensor], names: list[str]) -> None:
    """Copy every source tensor's rank-local slice into its (possibly fused) parameter."""
    params = dict(model.named_parameters())
    for name in names:
        target, piece, pieces = parameter_of(name)
        param = params[target]
        tensor = local_tensor(name)
        rows = param.shape[0] // pieces
        expected = (rows, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"tensor {name}: rank-local shape {tuple(tensor.shape)}, "
                                  f"the model expects {expected}")
        param.data[piece * rows:(piece + 1) * rows].copy_(tensor)


def read_quantized_shard(reader: CheckpointReader, name: str, rank: int, world_size: int,
                         padded_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 slice, its scales) of float weight `name` for `rank`, as `cut_weights quantize=int8`
    writes them. A row-parallel weight's per-row scales need whole rows, read in blocks."""
    shape = reader.shape(name)
    split, start, stop, pad = shard_bounds(name, shape, rank, world_size, padded_vocab)
    if split.dim == 1:
        step = max(1, READ_BLOCK_BYTES // (shape[1] * reader.dtype(name).itemsize))
        parts = [quantize_rows(reader.read(name, 0, a, min(a + step, shape[0]))) for a in range(0, shape[0], step)]
        return torch.cat([q[:, start:stop] for q, _ in parts]), torch.cat([s for _, s in parts])
    q, scale = quantize_rows(reader.read(name, 0, start, stop))
    return pad_rows(q, 0, pad), pad_rows(scale, 0, pad)


def resolve_quantize(requested: str, cut_manifest: dict | None) -> str:
    """auto follows the cut (none for a checkpoint); an explicit choice must match a cut."""
    if requested != "auto":
        check_choice(requested)
    if cut_manifest is None:
        return "none" if requested == "auto" else requested
    cut_as = cut_manifest.get("quantize", "none")
    if requested not in ("auto", cut_as):
        hint = ("launch with model.quantize=int8 (or auto)" if cut_as == "int8" else
                "cut again with quantize=int8, or launch from the uncut checkpoint, which is quantized at load")
        raise CheckpointError(f"the cut was made with quantize={cut_as}, launched with model.quantize={requested}: {hint}")
    return cut_as


def load_model(path: str | Path, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
               dtype: str = "auto", quantize: str = "auto", quantize_lm_head: bool = True,
               quantize_embedding: bool = True) -> InternLM:
    """A rank's model from a cut directory (its own `rank_r/`) or from an uncut published checkpoint
    (reading only its own slices, through mmap/safetensors; quantize=int8 quantizes them on the way)."""
    device = torch.device(device)
    cut = is_cut(path)
    manifest = None
    if cut:
        directory, manifest = open_partition(path, rank, world_size)
        quantize_lm_head = bool(manifest.get("quantize_lm_head", True))
        quantize_embedding = bool(manifest.get("quantize_embedding", True))
    else:
        directory = Path(path)
    quantize = resolve_quantize(quantize, manifest)
    cfg = ModelConfig.load(directory)
    cfg.check_divisible(world_size)
    source = CheckpointReader(directory)
    padded = cfg.padded_vocab_size(world_size)
    scales: dict[str, torch.Tensor] = {}

    def local(name: str) -> torch.Tensor:  # a cut already holds rank-local (and quantized) slices
        if cut:
            return source.read(name)
        if name in scales:
            return scales.pop(name)
        if is_quantized(name, quantize, quantize_lm_head, quantize_embedding):
            q, scales[scale_name(name)] = read_quantized_shard(source, name, rank, world_size, padded)
            return q
        return read_shard(source, name, rank, world_size, padded)

    expected = expected_names(cfg, quantize, quantize_lm_head, quantize_embedding)
    present = set(source.names())
    missing = [n for n in (expected if cut else _source_names(cfg)) if n not in present]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model = InternLM(cfg, rank, world_size, resolve_dtype(dtype, source.dtype("model.norm.weight"), device), device,
                     quantize=quantize, quantize_lm_head=quantize_lm_head, quantize_embedding=quantize_embedding)
    fill(model, local, expected)
    if device.type == "cpu":  # measured now, not inside the first timed step
        decode_matmul.choose(model.matmul_modules(), model.dtype)
        decode_matmul.choose_prefill(model.matmul_modules(), model.dtype)
    return model.eval()
