"""Reading published checkpoints tensor by tensor, so a rank materialises only its own slices.

Layouts (SPEC §1): `pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json`, a single
`pytorch_model.bin`, `model*.safetensors` (+ `model.safetensors.index.json`).
`.bin` files are opened with `torch.load(weights_only=True, mmap=True)`: the tensors stay in the
page cache until sliced, and a pickle that wants to run code is refused, never executed.
"""
from __future__ import annotations

import json
import pickle
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from tp.split import is_dropped, pad_rows, shard_bounds


# Tensors too large to copy whole are read in row blocks of about this size (cutter, int8 loader).
READ_BLOCK_BYTES = 64 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or unsafe to load."""


def _find_layout(root: Path) -> tuple[str, dict[str, str] | list[str]]:
    """('bin'|'safetensors', {tensor: file} from an index, or [files] to scan)."""
    for fmt, index_name, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object): {err}") from err
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: 'weight_map' is empty or not an object")
            return fmt, weight_map
        files = [single] if (root / single).is_file() else []
        if fmt == "safetensors" and not files:
            files = sorted(p.name for p in root.glob("model*.safetensors"))
        if files:
            return fmt, files
    raise CheckpointError(f"{root}: no weights found (expected pytorch_model*.bin with "
                          f"pytorch_model.bin.index.json, pytorch_model.bin, or model*.safetensors)")


class CheckpointReader:
    """Name -> tensor access over the files of one checkpoint directory.

    Files are opened for each read and closed after it: a memory mapping pins the pages it has
    touched in this process, so holding it open would let resident memory grow to the size of the
    file. Names, shapes and dtypes are read once and kept.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: checkpoint directory not found")
        self.format, layout = _find_layout(self.root)
        self._meta: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
        if isinstance(layout, dict):
            self._where = {n: f for n, f in layout.items() if not is_dropped(n)}
            for file in sorted(set(layout.values())):
                if not (self.root / file).is_file():
                    raise CheckpointError(f"{self.root / file}: shard named in the index is missing")
        else:
            self._where = {n: f for f in layout for n in self._file_meta(f) if not is_dropped(n)}

    # -- files ---------------------------------------------------------------------------------
    def _open(self, file: str):
        """A mapping name -> tensor (.bin, memory-mapped) or a safetensors handle; drop it after use."""
        path = self.root / file
        if self.format == "safetensors":
            try:
                return safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own types for truncated or bad headers
                raise CheckpointError(f"{path}: cannot be read as safetensors ({err})") from err
        return _load_bin(path)

    def _file_meta(self, file: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if file not in self._meta:
            handle = self._open(file)
            if self.format == "safetensors":
                meta = {}
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    meta[name] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()])
            else:
                meta = {n: (tuple(t.shape), t.dtype) for n, t in handle.items()}
            self._meta[file] = meta
        return self._meta[file]

    def files(self) -> list[str]:
        return sorted(set(self._where.values()))

    def file_bytes(self) -> dict[str, int]:
        return {f: (self.root / f).stat().st_size for f in self.files()}

    # -- tensors -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name!r} not in the checkpoint") from None

    def _meta_of(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        file = self.file_of(name)
        meta = self._file_meta(file)
        if name not in meta:
            raise CheckpointError(f"{self.root / file}: tensor {name!r} named in the index is not in the file")
        return meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta_of(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta_of(name)[1]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of dimension `dim`, as a fresh in-memory copy."""
        self._meta_of(name)
        index = (slice(None),) * dim + (slice(start, stop),) if dim is not None else (slice(None),)
        handle = self._open(self.file_of(name))
        try:
            if self.format == "safetensors":
                return handle.get_slice(name)[index]
            return handle[name][index].clone()
        except Exception as err:  # e.g. a file truncated after its header was read
            raise CheckpointError(f"{self.root / self.file_of(name)}: cannot read {name} ({err})") from err

    def file_offset(self, name: str) -> int | None:
        """Byte offset in its file where the row-major data of `name` starts, or None if unknown.

        safetensors: from the header. `.bin`: the address of the memory-mapped tensor, placed in
        its file through /proc/self/maps (Linux). Lets a cut copy byte ranges inside the kernel."""
        file = self.file_of(name)
        path = self.root / file
        if self.format == "safetensors":
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            return 8 + size + header[name]["data_offsets"][0]
        tensor = self._open(file)[name]
        if not tensor.is_contiguous():
            return None
        return _mapped_file_offset(tensor.data_ptr(), path)

    @contextmanager
    def rows(self, name: str, start: int, stop: int) -> Iterator[torch.Tensor]:
        """Rows [start, stop) of dimension 0 without a copy where the format allows (a view of the
        mapped `.bin` file), valid only inside the `with`: the mapping is dropped after it."""
        self._meta_of(name)
        handle = self._open(self.file_of(name))
        try:
            view = handle.get_slice(name)[start:stop] if self.format == "safetensors" else handle[name][start:stop]
        except Exception as err:
            raise CheckpointError(f"{self.root / self.file_of(name)}: cannot read {name} ({err})") from err
        try:
            yield view
        finally:
            del view, handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                       "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64,
                       "BOOL": torch.bool}


def _mapped_file_offset(address: int, path: Path) -> int | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end and len(fields) == 6 and fields[5].strip() == str(path.resolve()):
                    return address - start + int(fields[2], 16)
    except OSError:
        pass
    return None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: loading it needs arbitrary unpickling (code execution); only plain "
            f"tensor checkpoints are accepted. Convert it to safetensors in a trusted environment. "
            f"({str(err).splitlines()[0]})") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({err})") from err


def read_shard(reader: CheckpointReader, name: str, rank: int, world_size: int,
               padded_vocab: int | None = None, kv_heads: int | None = None) -> torch.Tensor:
    """The slice of source tensor `name` that `rank` holds, as the split table says, read alone."""
    split, start, stop, pad = shard_bounds(name, reader.shape(name), rank, world_size, padded_vocab, kv_heads)
    if split.dim is None:
        return reader.read(name)
    return pad_rows(reader.read(name, split.dim, start, stop), split.dim, pad)
