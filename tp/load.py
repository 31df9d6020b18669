"""Build the model for one rank and fill it with that rank's slices of a checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from tp import decode_attention, decode_matmul, hugepages, malloc, prefill_attention
from tp.checkpoint import READ_BLOCK_BYTES, CheckpointError, CheckpointReader, read_shard
from tp.formats import PublishedInt4Reader, open_checkpoint
from tp.config import ModelConfig
from tp.graphs import DecodeGraphs
from tp.graphs import enabled as graphs_enabled
from tp.model import InternLM
from tp.partition import is_cut, open_partition
from tp import int4
from tp.quant import (check_choice, is_quantized, lm_head_quantized, quantize_rows, quantize_weight, scale_name,
                      stored_names)
from tp.layout import lm_head_name, source_names, targets
from tp.split import pad_rows, shard_bounds, split_of

log = logging.getLogger("internlm_tp")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def expected_names(cfg: ModelConfig, quantize: str = "none", quantize_lm_head: bool = True,
                   quantize_embedding: bool = True, act_order: bool = False) -> list[str]:
    """Every tensor a checkpoint of this layout and shape must hold; each quantized weight is followed
    by its `_scale` (int8) or its `_group_scale` and `_group_zero` (int4)."""
    return [m for n in source_names(cfg)
            for m in (stored_names(n, quantize, act_order) if is_quantized(n, quantize, quantize_lm_head, quantize_embedding)
                      else [n])]


def check_source_names(cfg: ModelConfig, present: set[str], where: str, error: type[Exception]) -> None:
    """A checkpoint's tensors against its layout: a tied model that also ships an LM head, a tensor of
    another layout, or a missing one, each refused in one line."""
    head = lm_head_name(cfg)
    if cfg.tie_word_embeddings and head in present:
        raise error(f"{where}: config.json ties the LM head to the embedding (tie_word_embeddings: true) "
                    f"but the checkpoint also holds {head}; set tie_word_embeddings to false or drop the tensor")
    unknown = sorted(n for n in present if not _known(n))
    if unknown:
        raise error(f"{where}: tensor(s) not in the {cfg.layout} layout: {', '.join(unknown[:5])}")
    missing = [n for n in source_names(cfg) if n not in present]
    if missing:
        raise error(f"{where}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _known(name: str) -> bool:
    try:
        split_of(name)
    except KeyError:
        return False
    return True


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
    """Copy every source tensor's rank-local slice into its (possibly fused, or unpacked) parameter."""
    params = dict(model.named_parameters())
    permutations: dict[str, str] = {}  # a fused parameter's input permutation -> the tensor that gave it
    for name in names:
        tensor = local_tensor(name)
        for target in targets(name, model.cfg, model.rank, model.world_size):
            param = params[target.parameter]
            if target.parameter.endswith("_input_perm"):
                if target.parameter in permutations and not torch.equal(param.data, tensor):
                    raise CheckpointError(f"{name}: act-order permutation differs from {permutations[target.parameter]}'s, "
                                          "with which it shares one fused layer (q/k/v or gate/up)")
                permutations[target.parameter] = name
            part = tensor if target.pick is None else target.pick(tensor)
            rows = param.shape[0] if target.rows is None else target.rows
            expected = (rows, *param.shape[1:])
            if tuple(part.shape) != expected:
                raise CheckpointError(f"tensor {name}: rank-local shape {tuple(part.shape)}, "
                                      f"the model expects {expected}")
            param.data[target.start:target.start + rows].copy_(part)


def read_quantized_shard(reader: CheckpointReader, name: str, rank: int, world_size: int,
                         padded_vocab: int, kv_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 slice, its scales) of float weight `name` for `rank`, as `cut_weights quantize=int8`
    writes them. A row-parallel weight's per-row scales need whole rows, read in blocks."""
    shape = reader.shape(name)
    split, start, stop, pad = shard_bounds(name, shape, rank, world_size, padded_vocab, kv_heads)
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
        hint = (f"launch with model.quantize={cut_as} (or auto)" if cut_as != "none" else
                f"cut again with quantize={requested}, or launch from the uncut checkpoint, which is quantized at load")
        raise CheckpointError(f"the cut was made with quantize={cut_as}, launched with model.quantize={requested}: {hint}")
    return cut_as


def load_model(path: str | Path, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
               dtype: str = "auto", quantize: str = "auto", quantize_lm_head: bool = True,
               quantize_embedding: bool = True, graphs: str = "auto", group_size: int = int4.DEFAULT_GROUP) -> InternLM:
    """A rank's model from a cut directory (its own `rank_r/`) or from an uncut published checkpoint
    (reading only its own slices, through mmap/safetensors; quantize=int8 or int4 quantizes them on the
    way, int4 in groups of `group_size` input channels; a cut says its own).
    graphs: auto | off, whether the decode step is replayed from a captured graph (tp.graphs)."""
    device = torch.device(device)
    cut = is_cut(path)
    manifest, act_order = None, False
    if cut:
        directory, manifest = open_partition(path, rank, world_size)
        quantize_lm_head = bool(manifest.get("quantize_lm_head", True))
        quantize_embedding = bool(manifest.get("quantize_embedding", True))
        group_size = int(manifest.get("group_size") or group_size)
        act_order = bool(manifest.get("act_order", False))
    else:
        directory = Path(path)
    requested, quantize = quantize, resolve_quantize(quantize, manifest)
    replay = graphs_enabled(graphs, device.type)  # a bad setting refused before any weight is read
    cfg = ModelConfig.load(directory)
    cfg.check_divisible(world_size)
    source = CheckpointReader(directory) if cut else open_checkpoint(directory)
    published = isinstance(source, PublishedInt4Reader)
    if published:  # AWQ / GPTQ: read as our int4, its layers only (embedding and LM head stay float)
        if requested not in ("auto", "int4"):
            raise CheckpointError(f"{directory} is {source.int4_format.method.upper()} 4-bit: launch with "
                                  f"model.quantize=auto (or int4), not {requested}")
        quantize, quantize_lm_head, quantize_embedding = "int4", False, False
        group_size, act_order = source.int4_format.group_size, source.act_order
    quantize_lm_head = lm_head_quantized(cfg.tie_word_embeddings, quantize_lm_head, quantize_embedding)
    padded, kv = cfg.padded_vocab_size(world_size), cfg.kv_heads
    scales: dict[str, torch.Tensor] = {}

    def local(name: str) -> torch.Tensor:  # a cut already holds rank-local (and quantized) slices
        if cut:
            return source.read(name)
        if name in scales:
            return scales.pop(name)
        if is_quantized(name, quantize, quantize_lm_head, quantize_embedding) and not published:
            if quantize == "int4":  # groups lie within a rank's slice: quantize just that
                scales.update(quantize_weight(name, read_shard(source, name, rank, world_size, padded, kv),
                                              quantize, group_size))
                return scales.pop(name)
            q, scales[scale_name(name)] = read_quantized_shard(source, name, rank, world_size, padded, kv)
            return q
        return read_shard(source, name, rank, world_size, padded, kv)

    expected = expected_names(cfg, quantize, quantize_lm_head, quantize_embedding, act_order)
    present = set(source.names())
    if cut:
        missing = [n for n in expected if n not in present]
        if missing:
            raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''}")
    else:
        check_source_names(cfg, present, str(directory), CheckpointError)
        if quantize == "int4":
            try:
                int4.check_shapes({n: source.source_shape(n) if published else source.shape(n) for n in expected
                                   if is_quantized(n, quantize, quantize_lm_head, quantize_embedding)}, group_size, world_size)
            except ValueError as e:
                raise CheckpointError(f"{directory}: int4: {e}") from None
    model = InternLM(cfg, rank, world_size, resolve_dtype(dtype, source.dtype("model.norm.weight"), device), device,
                     quantize=quantize, quantize_lm_head=quantize_lm_head, quantize_embedding=quantize_embedding,
                     group_size=group_size, act_order=act_order)
    if device.type == "cpu":  # before fill writes them: the pages are chosen at first touch
        advised = hugepages.advise(model.parameters())
    fill(model, local, expected)
    if replay:
        model.graphs = DecodeGraphs(model)
    if device.type == "cpu":
        if advised:
            log.info("weights: %.0f MB advised for transparent huge pages, %.0f MB landed on them",
                     advised / 1e6, hugepages.huge_bytes(model.parameters()) / 1e6)
        malloc.keep_freed_memory()  # after the loader's own buffers are gone
        # measured now, not inside the first timed step
        decode_matmul.choose(model.matmul_modules(), model.dtype)
        decode_matmul.choose_prefill(model.matmul_modules(), model.dtype)
        decode_attention.choose(model.attentions(), model.dtype)
        prefill_attention.choose(model.attentions(), model.dtype)
    return model.eval()
