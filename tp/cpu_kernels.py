"""The project's one hand-written CPU kernel, tp/csrc/int8_gemv.cpp, built on first use.

It is compiled with torch.utils.cpp_extension (g++ and ninja, a few seconds, cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) and used only on AVX-512 CPUs. Where it cannot be built or run, or
INTERNLM_TP_INT8_GEMV=torch asks for it, int8 layers use torch._weight_int8pack_mm instead, with a
warning saying why.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch

ENV = "INTERNLM_TP_INT8_GEMV"  # "auto" (default) or "torch"
MAX_ROWS = 4  # rows of activations the kernel takes; prefill and larger batches use torch's GEMM
_SOURCE = Path(__file__).with_name("csrc") / "int8_gemv.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"]
_STALE_LOCK_S = 120  # a build takes seconds; a lock this old was left by a killed process
_state: dict[str, object] = {}


def _build_directory() -> Path:
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    directory = base / f"internlm_tp-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    directory.mkdir(parents=True, exist_ok=True)
    # cpp_extension waits forever on the lock of a build whose process was killed: clear a stale one.
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            warnings.warn(f"int8 GEMV: removing {lock}, left by a build that did not finish")
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    return directory


def _build() -> object | None:
    """The op, or None (with the reason warned) where it is not to be used."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"{ENV}={choice!r}: expected auto or torch")
    if choice == "torch":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AMX"):
        warnings.warn(f"int8 GEMV: this CPU's capability is {capability}, not AVX512; using torch._weight_int8pack_mm")
        return None
    try:
        from torch.utils.cpp_extension import load
        load(name="internlm_tp_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(_build_directory()), is_python_module=False)
        return torch.ops.internlm_tp.int8_gemv
    except Exception as e:  # no compiler, no ninja, a failed build: slower, but it still runs
        warnings.warn(f"int8 GEMV: could not build {_SOURCE.name} ({type(e).__name__}: {e}); "
                      "using torch._weight_int8pack_mm")
        return None


def int8_gemv():
    """torch.ops.internlm_tp.int8_gemv(x float32 [M<=4, K], q int8 [N, K], scale float32 [N]) ->
    float32 [M, N], or None where it is not available; built once per process."""
    if "op" not in _state:
        _state["op"] = _build()
    return _state["op"]
