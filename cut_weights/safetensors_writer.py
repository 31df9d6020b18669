"""Write a safetensors file whose tensors arrive piece by piece.

`safetensors.torch.save_file` needs every tensor in memory at once; a cut of a 7B checkpoint must
not. The format is simple enough to stream: an 8-byte little-endian header length, a JSON header
with each tensor's dtype, shape and byte range, then the raw bytes in that order. Since every
shape is known before the first byte is read, the header is written first and the data streamed
after it. The files read back with `safetensors.safe_open` like any other.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8",
               torch.int64: "I64"}


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


class StreamingSafetensorsWriter:
    """Tensors must be written in the planned order; each may arrive in several row blocks."""

    def __init__(self, path: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in plan:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path, self._plan, self._sizes = path, plan, [nbytes(s, d) for _, s, d in plan]
        self.total_bytes = 8 + len(raw) + offset
        self._file = open(path, "wb", buffering=0)
        self._write_all(memoryview(struct.pack("<Q", len(raw)) + raw))
        self._index, self._written = 0, 0

    def _expect(self, name: str, dtype: torch.dtype, count: int) -> None:
        expected_name, _, expected_dtype = self._plan[self._index]
        if name != expected_name or dtype != expected_dtype:
            raise RuntimeError(f"{self.path}: got {name} ({dtype}), expected {expected_name} ({expected_dtype})")
        if self._written + count > self._sizes[self._index]:
            raise RuntimeError(f"{self.path}: more bytes than planned for {name}")

    def _advance(self, count: int) -> None:
        self._written += count
        if self._written == self._sizes[self._index]:
            self._index, self._written = self._index + 1, 0

    def _write_all(self, data: memoryview) -> None:
        while data.nbytes:
            data = data[self._file.write(data):]

    def write(self, name: str, block: torch.Tensor) -> None:
        data = block.contiguous().view(torch.uint8).reshape(-1).numpy()
        self._expect(name, block.dtype, data.nbytes)
        self._write_all(memoryview(data))
        self._advance(data.nbytes)

    def copy(self, name: str, dtype: torch.dtype, source_fd: int, offset: int, count: int) -> None:
        """Append `count` bytes of another file from `offset`, inside the kernel (copy_file_range),
        falling back to reading them through a buffer where the kernel or file system cannot."""
        self._expect(name, dtype, count)
        done = 0
        while done < count:
            try:
                step = os.copy_file_range(source_fd, self._file.fileno(), count - done, offset + done)
            except OSError:
                step = 0
            if step == 0:  # unsupported here, or no progress: copy the rest through user space
                while done < count:
                    chunk = os.pread(source_fd, min(count - done, 64 << 20), offset + done)
                    if not chunk:
                        raise RuntimeError(f"{self.path}: source ended {count - done} bytes early for {name}")
                    self._write_all(memoryview(chunk))
                    done += len(chunk)
            done += step
        self._advance(count)

    @property
    def done(self) -> bool:
        return self._index == len(self._plan)

    def finish(self) -> None:
        if not self.done:
            raise RuntimeError(f"{self.path}: finished before every planned tensor was written")
        self._file.close()

    def abort(self) -> None:
        self._file.close()
