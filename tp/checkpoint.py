"""Reading published checkpoints tensor by tensor, so a rank materialises only its own slices.

Layouts (SPEC §1): `pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json`, a single
`pytorch_model.bin`, `model*.safetensors` (+ `model.safetensors.index.json`).
`.bin` files are opened with `torch.load(weights_only=True, mmap=True)`: the tensors stay in the
page cache until sliced, and a pickle that wants to run code is refused, never executed.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open

from tp.split import is_dropped, shard_range, split_of


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
    """Name -> tensor access over the files of one checkpoint directory, opened lazily."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: checkpoint directory not found")
        self.format, layout = _find_layout(self.root)
        self._open: dict[str, object] = {}
        if isinstance(layout, dict):
            self._where = {n: f for n, f in layout.items() if not is_dropped(n)}
            for file in sorted(set(layout.values())):
                if not (self.root / file).is_file():
                    raise CheckpointError(f"{self.root / file}: shard named in the index is missing")
        else:
            self._where = {}
            for file in layout:
                for name in self._keys(file):
                    if not is_dropped(name):
                        self._where[name] = file

    # -- files ---------------------------------------------------------------------------------
    def _file(self, file: str):
        handle = self._open.get(file)
        if handle is None:
            path = self.root / file
            if self.format == "safetensors":
                try:
                    handle = safe_open(str(path), framework="pt")
                except Exception as err:  # safetensors raises its own types for truncated headers
                    raise CheckpointError(f"{path}: cannot be read as safetensors ({err})") from err
            else:
                handle = _load_bin(path)
            self._open[file] = handle
        return handle

    def _keys(self, file: str) -> list[str]:
        handle = self._file(file)
        return list(handle.keys())

    def close(self) -> None:
        """Drop the open files (and the page-cache pages their mappings pin)."""
        self._open.clear()

    def files(self) -> list[str]:
        return sorted(set(self._where.values()))

    # -- tensors -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name!r} not in the checkpoint") from None

    def _handle_for(self, name: str):
        file = self.file_of(name)
        handle = self._file(file)
        if self.format == "safetensors":
            if name not in handle.keys():
                raise CheckpointError(f"{self.root / file}: tensor {name!r} named in the index is not in the file")
            return handle.get_slice(name)
        if name not in handle:
            raise CheckpointError(f"{self.root / file}: tensor {name!r} named in the index is not in the file")
        return handle[name]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle_for(name)
        return tuple(handle.get_shape()) if self.format == "safetensors" else tuple(handle.shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of dimension `dim`, as a fresh in-memory copy."""
        handle = self._handle_for(name)
        index = (slice(None),) * (dim or 0) + (slice(start, stop),) if dim is not None else ()
        if self.format == "safetensors":
            return handle[index] if index else handle[:]
        return handle[index].clone() if index else handle.clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
               padded_vocab: int | None = None) -> torch.Tensor:
    """The slice of source tensor `name` that `rank` holds, as the split table says."""
    split = split_of(name)
    if split.dim is None:
        return reader.read(name)
    size = reader.shape(name)[split.dim]
    start, stop, pad = shard_range(size, rank, world_size, padded_vocab if split.kind == "vocab" else None)
    part = reader.read(name, split.dim, start, stop)
    if pad:
        pad_shape = list(part.shape)
        pad_shape[split.dim] = pad
        part = torch.cat([part, part.new_zeros(pad_shape)], dim=split.dim)
    return part
