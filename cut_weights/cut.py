"""Cut a published checkpoint into one partition per tensor-parallel rank (SPEC §2).

Streaming: every source tensor is read in row blocks of ~READ_BLOCK_BYTES (each read maps the file,
copies the block and unmaps it), split with the runtime's own table, and appended to the ranks'
safetensors files, whose headers were written up front. Resident memory is a few blocks, whatever
the checkpoint's size. Everything is written into a hidden sibling directory that is renamed into
place after `manifest.json`, so an interrupted cut never leaves a directory that loads.
"""
from __future__ import annotations

import dataclasses

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cut_weights.safetensors_writer import StreamingSafetensorsWriter, nbytes
from tp.checkpoint import READ_BLOCK_BYTES, CheckpointReader
from tp.config import ModelConfig
from tp.load import DTYPES, check_source_names
from tp.partition import FORMAT, MANIFEST, VERSION, rank_dir
from tp import int4
from tp.formats import PublishedInt4Reader, open_checkpoint
from tp.quant import QUANTIZE_CHOICES, is_quantized, lm_head_quantized, quantize_rows, scale_name
from tp.split import local_shape, pad_rows, shard_bounds, split_of

_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="cut")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
COPIED_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class CutError(RuntimeError):
    """The cut was refused; nothing was written."""


@dataclass
class CutOptions:
    input_dir: str
    output_dir: str
    world_size: int
    dtype: str = "auto"
    quantize: str = "none"
    group_size: int = 128  # int4: input channels per scale and zero
    quantize_lm_head: bool = True
    quantize_embedding: bool = True
    overwrite: bool = False
    max_shard_size: str = "4GB"
    progress: bool = True


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    upper = str(text).strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().isdigit():
            return int(upper[: -len(unit)]) * factor
    if upper.isdigit():
        return int(upper)
    raise CutError(f"max_shard_size={text!r}: expected a size such as 4GB, 500MB or 1048576")


class RankOutput:
    """One rank's safetensors shards, filled in plan order; at most one file open at a time."""

    def __init__(self, directory: Path, shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]]):
        self.directory, self.shards = directory, shards
        count = len(shards)
        self.names = ["model.safetensors"] if count == 1 else \
            [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        self._k, self._writer = 0, None

    def _current(self) -> StreamingSafetensorsWriter:
        if self._writer is None:
            self._writer = StreamingSafetensorsWriter(self.directory / self.names[self._k], self.shards[self._k])
        return self._writer

    def _close_if_done(self) -> None:
        if self._writer.done:
            self._writer.finish()
            self._writer, self._k = None, self._k + 1

    def write(self, name: str, block: torch.Tensor) -> None:
        self._current().write(name, block)
        self._close_if_done()

    def copy(self, name: str, dtype: torch.dtype, source_fd: int, offset: int, count: int) -> None:
        self._current().copy(name, dtype, source_fd, offset, count)
        self._close_if_done()

    def finish(self) -> dict[str, int]:
        if self._k != len(self.shards):
            raise RuntimeError(f"{self.directory}: {len(self.shards) - self._k} shard(s) left unwritten")
        if len(self.names) > 1:
            weight_map = {name: file for file, shard in zip(self.names, self.shards) for name, _, _ in shard}
            total = sum(nbytes(s, d) for shard in self.shards for _, s, d in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return {f: (self.directory / f).stat().st_size for f in self.names}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def _shards(plan: list[tuple[str, tuple[int, ...], torch.dtype]], limit: int):
    shards, size = [[]], 0
    for entry in plan:
        step = nbytes(entry[1], entry[2])
        if shards[-1] and size + step > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += step
    return shards


def _check_output(out: Path, src: Path, overwrite: bool) -> None:
    out_abs, src_abs = out.resolve(), src.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise CutError(f"output_dir {out} is inside input_dir {src}: choose another directory")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CutError(f"output_dir {out} already exists: pass overwrite=true to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            raise CutError(f"output_dir {out} exists and is not a cut (no {MANIFEST}): refusing to replace it")


def _source_order(reader: CheckpointReader) -> list[str]:
    """Tensors grouped by file, so each shard file is read once, front to back."""
    rank_of = {f: i for i, f in enumerate(reader.files())}
    return sorted(reader.names(), key=lambda n: rank_of[reader.file_of(n)])


def cut(opts: CutOptions) -> Path:
    src, out, world = Path(opts.input_dir), Path(opts.output_dir), opts.world_size
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CutError(f"world_size must be a positive integer, got {world!r}")
    if opts.quantize not in QUANTIZE_CHOICES:
        raise CutError(f"quantize={opts.quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise CutError(f"dtype={opts.dtype!r}: expected auto, {', '.join(DTYPES)}")
    shard_limit = parse_size(opts.max_shard_size)
    cfg = ModelConfig.load(src)
    cfg.check_divisible(world)  # before anything is written
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        raise CutError(f"{src}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); the partitions need it")
    reader = open_checkpoint(src)
    published = isinstance(reader, PublishedInt4Reader)
    if published:  # AWQ / GPTQ: cut as our int4 (converted, not quantized again), its float tensors as they are
        if opts.quantize not in ("none", "int4"):
            raise CutError(f"{src} is {reader.int4_format.method.upper()} 4-bit already: cut it with quantize=none "
                           f"(or int4), not {opts.quantize}")
        opts = dataclasses.replace(opts, quantize="int4", group_size=reader.int4_format.group_size,
                                   quantize_lm_head=False, quantize_embedding=False)
    names = _source_order(reader)
    check_source_names(cfg, set(names), str(src), CutError)
    shapes = {n: reader.shape(n) for n in names}  # reads every file's header: a bad file fails here
    out_dtype = DTYPES[opts.dtype] if opts.dtype != "auto" else reader.dtype("model.norm.weight")
    if out_dtype not in DTYPES.values():
        raise CutError(f"the checkpoint is {out_dtype}; pass dtype=float32, bfloat16 or float16")
    _check_output(out, src, opts.overwrite)

    padded, kv = cfg.padded_vocab_size(world), cfg.kv_heads
    quantize_lm_head = lm_head_quantized(cfg.tie_word_embeddings, opts.quantize_lm_head, opts.quantize_embedding)

    def quantized(name: str) -> bool:  # to be quantized here (a published int4 tensor already is)
        return not published and is_quantized(name, opts.quantize, quantize_lm_head, opts.quantize_embedding)

    def kept_dtype(name: str) -> torch.dtype:  # a published int4 tensor keeps its own
        return reader.dtype(name) if published and reader.is_int4_tensor(name) else out_dtype

    if opts.quantize == "int4":  # whole groups everywhere, before anything is written
        try:
            int4.check_shapes({n: reader.source_shape(n) for n in names if reader.is_int4_tensor(n)
                               and n.endswith(".weight")} if published else
                              {n: shapes[n] for n in names if quantized(n)}, opts.group_size, world)
        except ValueError as e:
            raise CutError(f"int4: {e}") from None
    quant = opts.quantize if opts.quantize != "none" else None

    outputs: list[RankOutput] = []
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    for stale in out.parent.glob(f".{out.name}.partial-*") if out.parent.is_dir() else ():
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)  # left by a cut that was killed
    try:
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            raise CutError(f"cannot write the cut under {out.parent}: {err.strerror or err}") from err
        source_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        # the source's keys as they are; the dtype under the name its writer used (transformers 5: dtype)
        dtype_key = "dtype" if "dtype" in source_config and "torch_dtype" not in source_config else "torch_dtype"
        for r in range(world):
            directory = rank_dir(tmp, r)
            directory.mkdir()
            config = {**source_config, dtype_key: str(out_dtype).removeprefix("torch."),
                      "tensor_parallel": {"world_size": world, "rank": r}}
            config.pop("quantization_config", None)  # an AWQ/GPTQ source's: the cut holds our int4
            if opts.quantize == "int8":
                config["quantization"] = {"method": "weight_only_int8", "granularity": "per_output_channel",
                                          "symmetric": True, "lm_head": opts.quantize_lm_head,
                                          "embedding": opts.quantize_embedding}
            elif opts.quantize == "int4":
                config["quantization"] = {"method": "weight_only_int4", "granularity": "per_group",
                                          "group_size": opts.group_size, "symmetric": False,
                                          "source": reader.int4_format.method if published else "round_to_nearest",
                                          "lm_head": opts.quantize_lm_head, "embedding": opts.quantize_embedding}
            (directory / "config.json").write_text(json.dumps(config, indent=2))
            for file in COPIED_FILES:
                if (src / file).is_file():
                    shutil.copyfile(src / file, directory / file)
            plan = [entry for n in names
                    for entry in _plan(n, shapes[n], kept_dtype(n), r, world, padded, kv, quantized(n) and quant, opts.group_size)]
            outputs.append(RankOutput(directory, _shards(plan, shard_limit)))

        total = sum(nbytes(shapes[n], reader.dtype(n)) for n in names)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not opts.progress,
                  desc=f"cut {src.name} for {world} ranks") as bar:
            for name in names:
                if quantized(name) and quant == "int4":
                    _stream_int4(reader, name, shapes[name], outputs, world, padded, kv, opts.group_size, bar)
                elif quantized(name):
                    _stream_quantized(reader, name, shapes[name], outputs, world, padded, kv, bar)
                else:
                    _stream_tensor(reader, name, shapes[name], kept_dtype(name), outputs, world, padded, kv, bar)
        rank_files = {str(r): {"files": o.finish()} for r, o in enumerate(outputs)}

        manifest = {
            "format": FORMAT, "version": VERSION, "world_size": world,
            "vocab_size": cfg.vocab_size, "padded_vocab_size": padded,
            "dtype": str(out_dtype).removeprefix("torch."), "quantize": opts.quantize,
            "quantize_lm_head": quant is not None and quantize_lm_head,
            "quantize_embedding": quant is not None and opts.quantize_embedding,
            "group_size": opts.group_size if quant == "int4" else None,
            "act_order": published and reader.act_order,
            "source": {"path": str(src.resolve()), "format": reader.format, "files": reader.file_bytes()},
            "tensors": {n: entry for name in names
                        for n, entry in _manifest_entries(name, shapes[name], reader.dtype(name), kept_dtype(name),
                                                          quantized(name) and quant, opts.group_size)},
            "ranks": rank_files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the cut complete
        _move_into_place(tmp, out)
    except BaseException:  # Ctrl-C included: leave nothing behind that looks like a cut
        for o in outputs:
            o.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _int4_shapes(name, shape, group_size):
    """(name, source-side shape, dtype) of the three tensors an int4 weight [out, in] is stored as."""
    rows, cols = shape
    return [(name, (rows, cols // 2), torch.uint8),
            (int4.group_scale_name(name), (rows, cols // group_size), torch.float16),
            (int4.group_zero_name(name), (rows, cols // group_size), torch.uint8)]


def _plan(name, shape, out_dtype, rank, world, padded, kv, quantized, group_size):
    """The rank's (tensor, local shape, dtype) entries for source tensor `name`; `quantized` is
    False, "int8" or "int4"."""
    if not quantized:
        return [(name, local_shape(name, shape, rank, world, padded, kv), out_dtype)]
    if quantized == "int4":
        return [(n, local_shape(n, s, rank, world, padded, kv), d) for n, s, d in _int4_shapes(name, shape, group_size)]
    scale = scale_name(name)
    return [(name, local_shape(name, shape, rank, world, padded, kv), torch.int8),
            (scale, local_shape(scale, shape[:1], rank, world, padded, kv), torch.float32)]


def _manifest_entries(name, shape, source_dtype, out_dtype, quantized, group_size):
    def entry(n, s, dtype):
        return n, {"shape": list(s), "split": split_of(n).kind, "split_dim": split_of(n).dim,
                   "source_dtype": str(source_dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch.")}
    if not quantized:
        return [entry(name, shape, out_dtype)]
    if quantized == "int4":
        return [entry(n, s, d) for n, s, d in _int4_shapes(name, shape, group_size)]
    return [entry(name, shape, torch.int8), entry(scale_name(name), shape[:1], torch.float32)]


def _pid_alive(pid: str) -> bool:
    """Whether the process that owns a partial directory still runs (then it is not ours to delete)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _stream_tensor(reader, name, shape, out_dtype, outputs, world, padded, kv, bar) -> None:
    bounds = [shard_bounds(name, shape, r, world, padded, kv) for r in range(world)]
    split = bounds[0][0]
    rows = shape[0]
    row_bytes = max(1, nbytes(shape[1:], reader.dtype(name)))
    offset = reader.file_offset(name) if split.dim != 1 and out_dtype == reader.dtype(name) else None
    if offset is not None:
        # Each rank's part is one contiguous byte range of the source file: copied in the kernel,
        # as `cp` does, never passing through this process's memory.
        # The ranks' files are independent, so their copies run side by side (the GIL is released).
        with open(reader.root / reader.file_of(name), "rb") as source:
            def copy(r: int) -> None:
                _, start, stop, _ = bounds[r]
                lo, hi = (0, rows) if split.dim is None else (start, stop)
                outputs[r].copy(name, out_dtype, source.fileno(), offset + lo * row_bytes, (hi - lo) * row_bytes)
            list(_POOL.map(copy, range(world)))
        bar.update(rows * row_bytes)
        _write_padding(name, shape, out_dtype, outputs, bounds)
        return
    step = max(1, READ_BLOCK_BYTES // row_bytes)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        # A view of the mapped file, written out without an intermediate copy when no dtype
        # conversion is asked; the mapping (and the pages it pinned) is dropped after each block.
        with reader.rows(name, a, b) as block:
            block = block.to(out_dtype)
            for r, (_, start, stop, _) in enumerate(bounds):
                if split.dim is None:
                    outputs[r].write(name, block)
                elif split.dim == 1:
                    outputs[r].write(name, block[:, start:stop])
                elif max(a, start) < min(b, stop):
                    outputs[r].write(name, block[max(a, start) - a: min(b, stop) - a])
            del block
        bar.update(nbytes((b - a, *shape[1:]), reader.dtype(name)))
    _write_padding(name, shape, out_dtype, outputs, bounds)


def _stream_quantized(reader, name, shape, outputs, world, padded, kv, bar) -> None:
    """int8 rows and per-row scales (tp/quant.py) of a linear weight, quantized block by block:
    rows are independent, so the bits equal a load-time quantization of the same rows."""
    bounds = [shard_bounds(name, shape, r, world, padded, kv) for r in range(world)]
    split = bounds[0][0]
    rows, row_bytes = shape[0], max(1, nbytes(shape[1:], reader.dtype(name)))
    step = max(1, READ_BLOCK_BYTES // row_bytes)
    scales: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for a in range(0, rows, step):
        b = min(rows, a + step)
        with reader.rows(name, a, b) as block:
            q, s = quantize_rows(block)
        for r, (_, start, stop, _) in enumerate(bounds):
            if split.dim == 1:  # row parallel: the rank's columns, every row's scale
                outputs[r].write(name, q[:, start:stop])
                scales[r].append(s)
            elif max(a, start) < min(b, stop):
                lo, hi = max(a, start) - a, min(b, stop) - a
                outputs[r].write(name, q[lo:hi])
                scales[r].append(s[lo:hi])
        bar.update(nbytes((b - a, *shape[1:]), reader.dtype(name)))
    _write_padding(name, shape, torch.int8, outputs, bounds)
    for r, (_, _, _, pad) in enumerate(bounds):
        outputs[r].write(scale_name(name), pad_rows(torch.cat(scales[r]), 0, pad))


def _stream_int4(reader, name, shape, outputs, world, padded, kv, group_size, bar) -> None:
    """int4 (tp/int4.py) of a weight, block by block of rows: each rank's rows (columns for a
    row-parallel weight, whole groups) quantized as the loader quantizes that rank's slice, vocab
    padding rows included, so the bits are the same."""
    bounds = [shard_bounds(name, shape, r, world, padded, kv) for r in range(world)]
    split = bounds[0][0]
    rows, row_bytes = shape[0], max(1, nbytes(shape[1:], reader.dtype(name)))
    step = max(1, READ_BLOCK_BYTES // row_bytes)
    extra: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(world)]

    def put(r: int, w: torch.Tensor) -> None:
        packed, scale, zero = int4.quantize_groups(w, group_size)
        outputs[r].write(name, packed)
        extra[r].append((scale, zero))

    for a in range(0, rows, step):
        b = min(rows, a + step)
        with reader.rows(name, a, b) as block:
            block = block.float()
        for r, (_, start, stop, _) in enumerate(bounds):
            if split.dim == 1:
                put(r, block[:, start:stop])
            elif split.dim is None:
                put(r, block)
            elif max(a, start) < min(b, stop):
                put(r, block[max(a, start) - a: min(b, stop) - a])
        bar.update(nbytes((b - a, *shape[1:]), reader.dtype(name)))
    for r, (_, _, _, pad) in enumerate(bounds):
        if pad:
            put(r, torch.zeros(pad, shape[1]))
        outputs[r].write(int4.group_scale_name(name), torch.cat([s for s, _ in extra[r]]))
        outputs[r].write(int4.group_zero_name(name), torch.cat([z for _, z in extra[r]]))


def _write_padding(name, shape, out_dtype, outputs, bounds) -> None:
    for r, (_, _, _, pad) in enumerate(bounds):
        if pad:
            outputs[r].write(name, torch.zeros((pad, *shape[1:]), dtype=out_dtype))


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
