"""4-bit checkpoints others publish, read as our int4 (tp/int4.py): AWQ (AutoAWQ's GEMM layout, what
lmdeploy writes for `internlm2_5-7b-chat-4bit`) and GPTQ (AutoGPTQ / GPTQModel), `.bin` or safetensors.

A quantized linear `P` is stored as `P.qweight`, `P.qzeros`, `P.scales` (+ `P.g_idx` for GPTQ), all
int32 words of 8 nibbles (value n at bits 4n..4n+3) but packed along different axes:

  AWQ   qweight [in, out / 8], qzeros [in / g, out / 8], scales float16 [in / g, out]; within a word
        the 8 output channels come in the order [0, 2, 4, 6, 1, 3, 5, 7] (AutoAWQ's `pack`:
        nibble i holds channel 8 * col + order_map[i]); w = (q - z) * s.
  GPTQ  qweight [in / 8, out] (nibble i: input channel 8 * row + i), qzeros [in / g, out / 8]
        (nibble i: output channel 8 * col + i), scales float16 [in / g, out], g_idx [in]; the v1
        format (`checkpoint_format` gptq, the default) stores each zero minus one (AutoGPTQ's `pack`:
        `zeros -= 1`; its dequantization adds 1 back, so a stored 15 reads as zero 16), gptq_v2 as it is;
        w = (q - z) * s[g_idx].

`PublishedInt4Reader` shows such a checkpoint to the loader and the cutter as one of ours: for each
quantized `P`, `P.weight` (uint8 [out, in / 2]), `P.weight_group_scale` and `P.weight_group_zero`,
converted one weight at a time (a 7B layer's largest is 29 MB packed), then cut by the split table
like any other tensor. The dequantized weights are the format's own, to the bit.

Refused before any weight is read, by name: other bit widths, AWQ versions other than gemm (exllama,
marlin, gemv repacks), AWQ without zero points, GPTQ's act-order (`desc_act` with a g_idx that is
not in order), `modules_to_not_convert` naming layers we would have to keep in float.
"""
from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tp import int4
from tp.checkpoint import CheckpointError, CheckpointReader

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output channel (within 8) of nibble i, AutoAWQ
_PARTS = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx")}
_SUFFIX = re.compile(r"\.(qweight|qzeros|scales|g_idx)$")


@dataclass(frozen=True)
class Int4Format:
    method: str  # "awq" | "gptq"
    group_size: int
    zero_offset: int = 0  # added to each stored zero: 1 for GPTQ v1


def quantization_config(directory: Path) -> dict | None:
    """config.json's `quantization_config`, or a `quant_config.json` beside it (AutoAWQ's older
    files), or None."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if isinstance(config.get("quantization_config"), dict):
        return config["quantization_config"]
    side = directory / "quant_config.json"
    return json.loads(side.read_text(encoding="utf-8")) if side.is_file() else None


def detect(directory: str | Path) -> Int4Format | None:
    """The checkpoint's published 4-bit format, None for a float one; a variant we cannot read
    raises CheckpointError naming it."""
    directory = Path(directory)
    q = quantization_config(directory)
    if q is None:
        return None
    where = f"{directory}: quantization_config"
    method = str(q.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise CheckpointError(f"{where}: quant_method {q.get('quant_method')!r} is not supported "
                              "(AWQ and GPTQ 4-bit are; or give the float checkpoint and model.quantize=int8|int4)")
    bits = q.get("bits", q.get("w_bit"))
    if bits != 4:
        raise CheckpointError(f"{where}: {method} with {bits} bits; only 4-bit is supported")
    group = q.get("group_size", q.get("q_group_size"))
    if not isinstance(group, int) or group < int4.BLOCK or group % int4.BLOCK:
        raise CheckpointError(f"{where}: group_size {group!r}; supported: a multiple of {int4.BLOCK} "
                              "(per-channel, -1, is not)")
    skipped = [m for m in (q.get("modules_to_not_convert") or []) if m not in ("lm_head", "output")]
    if skipped:
        raise CheckpointError(f"{where}: modules_to_not_convert {skipped}: layers kept in float among 4-bit ones "
                              "are not supported")
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{where}: AWQ version {version!r}; only the GEMM layout is supported "
                                  "(exllama, marlin and gemv repacks are not)")
        if not q.get("zero_point", True):
            raise CheckpointError(f"{where}: AWQ with zero_point false is not supported")
        return Int4Format("awq", group)
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r}; supported: gptq, gptq_v2")
    return Int4Format("gptq", group, 1 if fmt == "gptq" else 0)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """[..., 8] int16 of int32 words [...]: nibble i at index i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).to(torch.int16)


def awq_to_ours(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """(packed uint8 [out, in / 2], scale float16 [out, in / g], zero uint8 [out, in / g])."""
    inverse = [AWQ_ORDER.index(j) for j in range(8)]  # nibble holding channel j
    q = _nibbles(qweight)[..., inverse].reshape(qweight.shape[0], -1)  # [in, out]
    z = _nibbles(qzeros)[..., inverse].reshape(qzeros.shape[0], -1)   # [in / g, out]
    return int4.pack(q.t()), scales.t().to(torch.float16).contiguous(), z.t().to(torch.uint8).contiguous()


def act_order(g_idx: torch.Tensor | None, group_size: int, name: str) -> torch.Tensor | None:
    """The input permutation that makes a GPTQ act-order weight's groups contiguous (input channels
    sorted by group, stably), or None where g_idx is already in order."""
    if g_idx is None:
        return None
    g = g_idx.long()
    if torch.equal(g, torch.arange(g.numel()) // group_size):
        return None
    counts = torch.bincount(g, minlength=g.numel() // group_size)
    if counts.numel() * group_size != g.numel() or not bool((counts == group_size).all()):
        raise CheckpointError(f"{name}: g_idx does not give every group {group_size} input channels")
    return torch.sort(g, stable=True).indices


def gptq_to_ours(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 zero_offset: int, group_size: int, name: str):
    """(packed, scale, zero, perm): perm (act-order) lists the input channel of each packed column,
    None where they are in order."""
    rows_in = qweight.shape[0] * 8
    perm = act_order(g_idx, group_size, name)
    q = _nibbles(qweight).permute(0, 2, 1).reshape(rows_in, -1)  # [in, out]
    if perm is not None:
        q = q[perm]  # column j of ours is input channel perm[j]: group j // group_size
    z = _nibbles(qzeros).reshape(qzeros.shape[0], -1) + zero_offset  # [in / g, out]
    return int4.pack(q.t()), scales.t().to(torch.float16).contiguous(), z.t().to(torch.uint8).contiguous(), perm


class PublishedInt4Reader(CheckpointReader):
    """A CheckpointReader over an AWQ or GPTQ checkpoint that lists, reads and slices our int4
    tensors in place of the format's (see the module's text); float tensors pass through."""

    def __init__(self, root: str | Path, fmt: Int4Format):
        super().__init__(root)
        self.int4_format = fmt
        raw = super().names()
        self._prefixes = sorted({_SUFFIX.sub("", n) for n in raw if n.endswith(".qweight")})
        for prefix in self._prefixes:
            missing = [p for p in _PARTS[fmt.method] if f"{prefix}.{p}" not in raw and p != "g_idx"]
            if missing:
                raise CheckpointError(f"{self.root}: {prefix} lacks {', '.join(missing)} ({fmt.method})")
        self._virtual: dict[str, tuple[str, int]] = {}  # our name -> (prefix, which of the 3 or 4)
        # GPTQ act-order: any weight whose g_idx is out of order makes every weight carry an input
        # permutation (P.weight_input_perm), applied to the activations (tp/layers.py)
        self.act_order = fmt.method == "gptq" and any(
            act_order(super(PublishedInt4Reader, self).read(f"{p}.g_idx"), fmt.group_size, p) is not None
            for p in self._prefixes if f"{p}.g_idx" in raw)
        for prefix in self._prefixes:
            for i, name in enumerate(self._ours(prefix)[: 4 if self.act_order else 3]):
                self._virtual[name] = (prefix, i)
        self._cached: tuple[str, tuple[torch.Tensor, ...]] | None = None

    @staticmethod
    def _ours(prefix: str) -> tuple[str, str, str, str]:
        w = prefix + ".weight"
        return w, int4.group_scale_name(w), int4.group_zero_name(w), int4.input_perm_name(w)

    def is_int4_tensor(self, name: str) -> bool:
        """Whether `name` is one of the int4 tensors this reader converts (P.weight and its groups')."""
        return name in self._virtual

    def names(self) -> list[str]:
        return [n for n in super().names() if not _SUFFIX.search(n)] + list(self._virtual)

    def file_of(self, name: str) -> str:
        return super().file_of(f"{self._virtual[name][0]}.qweight" if name in self._virtual else name)

    def _converted(self, prefix: str) -> tuple[torch.Tensor, ...]:
        if self._cached is None or self._cached[0] != prefix:
            parts = {p: super(PublishedInt4Reader, self).read(f"{prefix}.{p}") for p in _PARTS[self.int4_format.method]
                     if f"{prefix}.{p}" in self._where}
            fmt = self.int4_format
            if fmt.method == "awq":
                ours = (*awq_to_ours(parts["qweight"], parts["qzeros"], parts["scales"]), None)
            else:
                ours = gptq_to_ours(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                                    fmt.zero_offset, fmt.group_size, prefix)
            if self.act_order:  # every weight carries its permutation (the identity where in order)
                ours = (*ours[:3], torch.arange(ours[0].shape[1] * 2) if ours[3] is None else ours[3])
            if ours[1].shape[1] * fmt.group_size != ours[0].shape[1] * 2:
                raise CheckpointError(f"{self.root}: {prefix}: scales for {ours[1].shape[1]} groups of "
                                      f"{fmt.group_size} do not cover its {ours[0].shape[1] * 2} input channels")
            self._cached = (prefix, ours)
        return self._cached[1]

    def _meta_of(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._virtual:
            return super()._meta_of(name)
        prefix, i = self._virtual[name]
        words, _ = super()._meta_of(f"{prefix}.qweight")
        scales, _ = super()._meta_of(f"{prefix}.scales")
        out = scales[1]
        k = words[0] * (8 if self.int4_format.method == "gptq" else 1)
        if i == 3:
            return (k,), torch.int64
        return ((out, k // 2), torch.uint8) if i == 0 else ((out, k // self.int4_format.group_size),
                                                            torch.float16 if i == 1 else torch.uint8)

    def source_shape(self, name: str) -> tuple[int, ...]:
        """The logical [out, in] of a weight `P.weight` held in int4 here."""
        out, half = self.shape(name)
        return out, half * 2

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name not in self._virtual:
            return super().read(name, dim, start, stop)
        prefix, i = self._virtual[name]
        whole = self._converted(prefix)[i]
        index = (slice(None),) * dim + (slice(start, stop),) if dim is not None else (slice(None),)
        return whole[index].clone()

    def file_offset(self, name: str) -> int | None:
        return None if name in self._virtual else super().file_offset(name)

    def rows(self, name: str, start: int, stop: int):
        if name not in self._virtual:
            return super().rows(name, start, stop)
        return nullcontext(self.read(name, 0, start, stop))


def open_checkpoint(root: str | Path) -> CheckpointReader:
    """A reader over a checkpoint directory: ours for a float one, PublishedInt4Reader for AWQ/GPTQ."""
    root = Path(root)
    fmt = detect(root) if (root / "config.json").is_file() else None
    return PublishedInt4Reader(root, fmt) if fmt else CheckpointReader(root)
