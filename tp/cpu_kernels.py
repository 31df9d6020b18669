"""The project's one hand-written CPU kernel, tp/csrc/int8_gemv.cpp, built on first use.

It is compiled with torch.utils.cpp_extension (g++ and ninja, a few seconds, cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) and used only on AVX-512 CPUs. Where it cannot be
built (a warning says why), or INTERNLM_TP_INT8_GEMV=torch, decode takes int8_linear's other CPU
paths (tp/quant.py).
"""
from __future__ import annotations

import fcntl
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

ENV = "INTERNLM_TP_INT8_GEMV"  # "auto" (default) or "torch"
MAX_ROWS = 16  # rows of activations sent to the kernel; past ~17 a dequantized GEMM is faster here
_SOURCE = Path(__file__).with_name("csrc") / "int8_gemv.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"]
_state: dict[str, object] = {}


def _build_directory() -> Path:
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    directory = base / f"internlm_tp-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextmanager
def _one_build_at_a_time(directory: Path):
    """An flock, which dies with its process. cpp_extension's own `lock` file does not: after a
    build killed mid-way, every later load would wait on it forever. Whoever holds the flock knows
    no build of ours is running, so a `lock` file it finds is such a leftover and goes."""
    with open(directory / "internlm_tp.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        leftover = directory / "lock"
        if leftover.exists():
            warnings.warn(f"int8 GEMV: removing {leftover}, left by a build that did not finish")
            leftover.unlink(missing_ok=True)
        yield


def _openmp_runtime() -> list[str]:
    """Link flags for the OpenMP runtime torch has loaded (its own libgomp, or libiomp5), so the
    kernel's parallel regions run on torch's threads and follow torch.set_num_threads."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith(("libgomp", "libiomp5")) and ".so" in path:
                    return [path]
    except OSError:
        pass
    return ["-fopenmp"]


def _build() -> object | None:
    """The op, or None where it is not to be used (warned, unless asked for)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"{ENV}={choice!r}: expected auto or torch")
    if choice == "torch":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        warnings.warn(f"int8 GEMV: this CPU's capability is {capability}, not AVX512; decode uses torch's int8 paths")
        return None
    try:
        from torch.utils.cpp_extension import load
        directory = _build_directory()
        with _one_build_at_a_time(directory):
            load(name="internlm_tp_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                 extra_ldflags=_openmp_runtime(), build_directory=str(directory), is_python_module=False)
        return torch.ops.internlm_tp.int8_gemv
    except Exception as e:  # no compiler, no ninja, a failed build: slower, but it still runs
        warnings.warn(f"int8 GEMV: could not build {_SOURCE.name} ({type(e).__name__}: {e}); "
                      "decode uses torch's int8 paths")
        return None


def int8_gemv():
    """torch.ops.internlm_tp.int8_gemv(x float32 [M, K], q int8 [N, K], scale float32 [N]) ->
    float32 [M, N], or None where it is not available; built once per process."""
    if "op" not in _state:
        _state["op"] = _build()
    return _state["op"]
