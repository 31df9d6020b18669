"""Which kernel multiplies activations by each weight matrix on this CPU, chosen on this host: a few
rows (decode) per weight shape, and the dtype prefill GEMMs compute in.

Batch-1 decode reads every weight once per step, so the best path is whichever streams memory fastest
here, and that differs between CPUs: torch.mv beat F.linear for bfloat16 by 20% on an Intel host and
lost by 40% on an AMD one. Nothing is hard-coded: when a model is loaded, every candidate multiplies
the model's own weights of each shape (up to CHOOSE_BYTES of them, so they come from memory), and
the fastest is kept for that shape, logged once.

Reproducibility: paths round differently, so a choice that flipped between two loads on one host would
change low bits of the logits. So ours stays unless another path is MARGIN faster, and shapes whose
weights fit in MIN_MEASURED_BYTES (cache-resident, where timings are mostly call overhead and noise)
are not measured: they take the first candidate.

Paths (up to cpu_kernels.MAX_ROWS rows of activations; more rows always take torch's GEMM):
  ours      tp/csrc/gemv.cpp (float32, bfloat16 and int8 weights)
  linear    F.linear
  mv        torch.mv for one row (F.linear for more)
  int8pack  torch._weight_int8pack_mm: bfloat16 activations and K % 16 == 0 only (it rounds
            activations to bfloat16 and reads past shorter rows)
  dequant   tp.quant.dequantized_linear (int8 weights converted block by block)

Prefill (more rows): with bfloat16 activations, the GEMM runs either natively in bfloat16 or on
weight blocks converted to float32 (tp.quant.dequantized_linear). A CPU without bfloat16 dot products
(AVX512_BF16, AMX) runs the latter ~7x faster; one with them, the former. `choose_prefill` times both
on the model's largest layer weight at PREFILL_ROWS rows and keeps the faster, under the same MARGIN
rule; then whether GEMMs over blocks of the weight's rows beat one GEMM over the whole weight (MKL on
an AMD EPYC: 13-25% faster in blocks of 2048 rows of a 11008-row weight).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from tp import cpu_kernels
from tp.int4 import dequantize_rows
from tp.quant import dequantized_linear

log = logging.getLogger("internlm_tp")
CHOOSE_BYTES = 64 << 20  # weights timed per shape and path: past the last-level cache of most hosts
MIN_MEASURED_BYTES = 16 << 20
MARGIN = 1.1
PREFILL_ROWS = 64
# A 64-row GEMM is compute-bound wherever its weight lies, so prefill choices time reliably on weights
# far smaller than decode's MIN_MEASURED_BYTES (a TP=2 shard of the bench model's MLP is 11 MB in
# int8: left untimed, its prefill ran natively in bfloat16, 7x slower on an AVX2 host); tiny models
# (the tests') stay untimed, so that two loads agree.
PREFILL_MIN_MEASURED_BYTES = 1 << 20
PREFILL_GEMM_ROWS = (4096, 2048, 1024)  # weight rows per prefill GEMM tried against the whole weight
_PASSES = 3


def candidates(weight: torch.Tensor, x_dtype: torch.dtype) -> list[str]:
    """The paths that can multiply `x_dtype` activations by `weight` on the CPU, ours first."""
    mode = cpu_kernels.choice()
    ours = [] if mode == "torch" or cpu_kernels.gemv() is None else ["ours"]
    if mode == "ours" and ours:
        return ours
    if weight.dtype == torch.int8:
        packed = x_dtype == torch.bfloat16 and weight.shape[1] % 16 == 0
        return ours + (["int8pack"] if packed else ["dequant"])
    return ours + ["linear", "mv"]


def run(path: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
        bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) times weight [N, K]^T (* scale) (+ bias) through `path`: [M, N]."""
    if path == "ours":
        return cpu_kernels.gemv()(x.contiguous(), weight, scale, bias)
    if path == "linear" or (path == "mv" and x.shape[0] != 1):
        return F.linear(x, weight, bias)
    if path == "mv":
        y = torch.mv(weight, x[0]).unsqueeze(0)
    elif path == "int8pack":
        y = torch._weight_int8pack_mm(x, weight, scale.to(torch.bfloat16))
    elif path == "dequant":
        y = dequantized_linear(x, weight, scale)
    else:
        raise ValueError(f"unknown decode matmul path {path!r}")
    return y if bias is None else y.add_(bias)


def _sample(weights: list[tuple[torch.Tensor, torch.Tensor | None]],
            budget: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """About `budget` (CHOOSE_BYTES) of the given matrices (whole ones, the last cut to rows)."""
    budget = budget or CHOOSE_BYTES
    taken, total = [], 0
    for w, s in weights:
        rows = min(w.shape[0], max(1, (budget - total) // max(1, w.shape[1] * w.element_size())))
        taken.append((w[:rows], None if s is None else s[:rows]))
        total += rows * w.shape[1] * w.element_size()
        if total >= budget:
            break
    return taken


def best_seconds(fn, passes: int, warm_up: int = 1) -> float:
    """The fastest of `passes` timed calls of fn, after `warm_up` untimed ones (lazy initialisation,
    first-touch page faults): how every load-time choice here and in tp/*_attention.py is timed."""
    for _ in range(warm_up):
        fn()
    return min(_timed(fn) for _ in range(passes))


def _seconds(path: str, x: torch.Tensor, sample) -> float:
    run(path, x, *sample[0], None)  # first call, on one matrix: lazy initialisation, not timed

    def every_matrix():
        for w, s in sample:
            run(path, x, w, s, None)
    return best_seconds(every_matrix, _PASSES, warm_up=0)


@torch.inference_mode()
def choose(modules: list, x_dtype: torch.dtype) -> dict[tuple, str]:
    """Set `decode_path` on each module (objects with `weight` and `weight_scale`) to the fastest path
    for its weight's dtype and shape on this host; returns {(dtype, N, K): path}."""
    groups: dict[tuple, list] = defaultdict(list)
    for m in modules:
        if m.weight.dtype != torch.uint8:  # int4 (packed) has one decode path, tp/csrc's gemv_int4
            groups[(m.weight.dtype, *m.weight.shape)].append(m)
    chosen, report = {}, []
    for key, members in groups.items():
        paths = candidates(members[0].weight, x_dtype)
        weights = sum(m.weight.numel() * m.weight.element_size() for m in members)
        if len(paths) > 1 and weights >= MIN_MEASURED_BYTES:
            sample = _sample([(m.weight, m.weight_scale) for m in members])
            x = torch.randn(1, key[2]).to(x_dtype)
            nbytes = sum(w.numel() * w.element_size() for w, _ in sample)
            speed = {p: nbytes / _seconds(p, x, sample) / 1e9 for p in paths}
            best = max(speed, key=speed.get)
            if speed[best] < MARGIN * speed[paths[0]]:
                best = paths[0]
            report.append(f"{key[1]}x{key[2]} {str(key[0]).removeprefix('torch.')}: "
                          + ", ".join(f"{p} {gbps:.1f}" for p, gbps in speed.items()) + f" GB/s -> {best}")
        else:
            best = paths[0]
        chosen[key] = best
        for m in members:
            m.decode_path = best
    if report:
        log.info("decode matmuls on %d threads, measured here: %s", torch.get_num_threads(), "; ".join(report))
    elif chosen:
        log.info("decode matmuls: %s (weights cache-resident: not timed)", ", ".join(sorted(set(chosen.values()))))
    return chosen


def _prefill(w: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor, compute: torch.dtype | None,
             rows: int | None = None) -> torch.Tensor:
    if w.dtype == torch.int8 or compute is not None or rows is not None:
        return dequantized_linear(x, w, scale, compute, rows)
    return F.linear(x, w)


def _best_of_two(fn) -> float:
    return best_seconds(fn, 2)


@torch.inference_mode()
def choose_prefill(modules: list, x_dtype: torch.dtype) -> tuple[torch.dtype | None, int | None]:
    """Set `prefill_compute` and `prefill_rows` on every module, measured on the model's largest layer
    weight (not the LM head: prefill sends it one row) at PREFILL_ROWS rows of activations:
      - compute: float32 where that is MARGIN faster than computing in `x_dtype` on this host
        (bfloat16 and float16 activations only), else None (x's dtype);
      - rows: at most this many weight rows per GEMM, where one of PREFILL_GEMM_ROWS is MARGIN faster
        than the whole weight in one GEMM (MKL on an AMD EPYC: 11008 x 2048 float32 at 64 rows, 37 ms
        whole, 27 ms in blocks of 2048), else None.
    int4 weights (packed uint8) take the compute dtype: their prefill dequantizes blocks of rows into the
    same GEMM (tp/int4.py), so where every layer is int4 the dtype is measured on the largest one's rows
    dequantized (a bfloat16 GEMM on a CPU without bfloat16 dot products, AMD EPYC with AVX2: a 512-token
    prefill of the 827M bench model took minutes). Returns (compute, rows)."""
    packed = [m for m in modules if m.weight.dtype == torch.uint8]
    modules = [m for m in modules if m.weight.dtype != torch.uint8]
    pool = modules or packed
    if not pool:
        return None, None
    timed = [m for m in pool if getattr(m, "many_prefill_rows", True)] or pool
    largest = max(timed, key=lambda m: m.weight.numel() * m.weight.element_size())
    if largest.weight.numel() * largest.weight.element_size() < PREFILL_MIN_MEASURED_BYTES:
        return None, None
    w, scale = largest.weight, largest.weight_scale
    dtype_name = str(x_dtype).removeprefix("torch.")
    chosen = None
    if x_dtype != torch.float32:
        # the dtype on a sample (a block of rows is what the dequantizing path converts at a time)
        if w.dtype == torch.uint8:
            rows = max(1, min(w.shape[0], MIN_MEASURED_BYTES // (w.shape[1] * 2 * x_dtype.itemsize)))
            w = dequantize_rows(w[:rows], largest.weight_group_scale[:rows], largest.weight_group_zero[:rows], x_dtype)
        (ws, ss), = _sample([(w, scale)], MIN_MEASURED_BYTES)
        x = torch.randn(PREFILL_ROWS, w.shape[1]).to(x_dtype)
        seconds = {c: _best_of_two(lambda: _prefill(ws, ss, x, c)) for c in (None, torch.float32)}
        chosen = torch.float32 if seconds[None] > MARGIN * seconds[torch.float32] else None
        log.info("prefill GEMMs (%d rows x %dx%d %s weights, measured here): %s %.1f ms, float32 %.1f ms -> %s",
                 PREFILL_ROWS, *ws.shape, str(w.dtype).removeprefix("torch."), dtype_name,
                 seconds[None] * 1e3, seconds[torch.float32] * 1e3, "float32" if chosen else dtype_name)
    for m in packed:
        m.prefill_compute = chosen
    if not modules:
        return chosen, None
    # the block size on the whole weight: what it changes is how one GEMM walks a long weight
    rows = None
    blocks = [None] + [r for r in PREFILL_GEMM_ROWS if r < w.shape[0]]
    if len(blocks) > 1:
        x = torch.randn(PREFILL_ROWS, w.shape[1]).to(x_dtype)
        seconds = {r: _best_of_two(lambda: _prefill(w, scale, x, chosen, r)) for r in blocks}
        rows = min(seconds, key=seconds.get)
        if seconds[None] < MARGIN * seconds[rows]:
            rows = None
        log.info("prefill GEMM blocks (%d rows x %dx%d weights, measured here): %s -> %s", PREFILL_ROWS, *w.shape,
                 ", ".join(f"{r or 'unblocked'} {t * 1e3:.1f} ms" for r, t in seconds.items()),
                 f"{rows} weight rows a GEMM" if rows else "unblocked")
    for m in modules:
        m.prefill_compute, m.prefill_rows = chosen, rows
    return chosen, rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
