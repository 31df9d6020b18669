"""The project's hand-written CPU kernels, built on first use for the vector ISA this CPU has:
tp/csrc/gemv.cpp (decode matmuls in float32, bfloat16, int8 and int4), tp/csrc/decode_attention.cpp
(attention for one new token per sequence), and for the small steps between, each one call where
torch makes several: tp/csrc/rms_norm.cpp, tp/csrc/rope.cpp, tp/csrc/swiglu.cpp; greedy decoding's
choice (tp/csrc/argmax.cpp); the shared-memory collectives' copy, wait and sum (tp/csrc/shm_comm.cpp,
for tp/comm.py); one extension sharing tp/csrc/vec.h. -ffp-contract=off: a product and a sum stay two roundings, as in torch's
elementwise ops, never one fused multiply-add. -fno-trapping-math (as torch's own build): with no
floating-point traps to preserve, the compiler may turn a select into a blend and vectorize loops
with one (swiglu's); the value of every operation stays IEEE's.

torch.utils.cpp_extension compiles them (g++ and ninja, ~20 s once, then cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions): with AVX-512 where torch reports that capability,
else with AVX2 + FMA, else not at all. `ninja` is a dependency of the package; it lands in the venv's
`bin/`, which is put on PATH for the build (a user running `.venv/bin/torchrun` does not have it there).
Where they cannot be built (a warning says why) or INTERNLM_TP_GEMV=torch, decode takes torch's
paths (tp/decode_matmul.py and tp/decode_attention.py choose among what there is).
"""
from __future__ import annotations

import fcntl
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

ENV = "INTERNLM_TP_GEMV"  # auto (measure our kernel against torch's paths) | ours | torch
CHOICES = ("auto", "ours", "torch")
MAX_ROWS = 16  # rows of activations sent to the kernel; past that, torch's GEMM (prefill)
_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("gemv.cpp", "decode_attention.cpp", "rms_norm.cpp", "rope.cpp", "swiglu.cpp", "argmax.cpp",
                         "shm_comm.cpp")]
_NAMES = ", ".join(source.name for source in _SOURCES)
# The flags per ISA: the kernel's vector width follows them (tp/csrc/gemv.cpp).
ISA_FLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
COMMON_FLAGS = ["-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
_state: dict[str, object] = {}
log = logging.getLogger("internlm_tp")


def choice() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def host_isa() -> str | None:
    """The widest vector ISA the kernel is built for that this CPU runs, as torch detected it."""
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())


def _build_directory(isa: str) -> Path:
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    directory = base / f"internlm_tp_{isa}-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
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
            warnings.warn(f"CPU kernel: removing {leftover}, left by a build that did not finish")
            leftover.unlink(missing_ok=True)
        yield


@contextmanager
def _tools_on_path():
    """The interpreter's own bin/ first on PATH while building: where pip put `ninja` for this venv."""
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


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


def build(isa: str):
    """Compile (or load the cached build of) the kernels for `isa`; returns their op namespace
    (`.gemv`, `.decode_attention`, `.rms_norm`, `.add_rms_norm`, `.rope`, `.rope_into_cache`, `.swiglu`,
    `.argmax_rows`, `.shm_exchange`, `.shm_all_reduce`). Raises on failure."""
    from torch.utils.cpp_extension import load
    namespace = f"internlm_tp_{isa}"
    directory = _build_directory(isa)
    with _tools_on_path(), _one_build_at_a_time(directory):
        load(name=namespace, sources=[str(source) for source in _SOURCES], build_directory=str(directory), is_python_module=False,
             extra_cflags=["-O3", *ISA_FLAGS[isa], f"-DOPS_NAMESPACE={namespace}", *COMMON_FLAGS],
             extra_ldflags=_openmp_runtime())
    return getattr(torch.ops, namespace)


def _build():
    """The ops for this host, or None where they are not to be used (warned, unless asked for)."""
    if choice() == "torch":
        return None
    isa = host_isa()
    if isa is None:
        warnings.warn(f"CPU kernels: this CPU's capability is {torch.backends.cpu.get_cpu_capability()}, "
                      "neither AVX512 nor AVX2; decode uses torch's matmuls")
        return None
    try:
        ops = build(isa)
        log.info("CPU kernels: %s built for %s and in use (cached in %s)", _NAMES, isa, _build_directory(isa))
        return ops
    except Exception as e:  # no compiler, no ninja, a failed build: slower, but it still runs
        warnings.warn(f"CPU kernels: could not build {_NAMES} ({type(e).__name__}: {e}); "
                      "decode uses torch's matmuls")
        return None


def _ops():
    if "ops" not in _state:
        _state["ops"] = _build()
    return _state["ops"]


def gemv():
    """gemv(x [M, K] float32|bfloat16, w [N, K] float32|bfloat16|int8, scale float32 [N] | None,
    bias [N] | None) -> [M, N] in x's dtype, or None where the kernels are not available; built once
    per process."""
    return op("gemv")


def op(name: str):
    """The op `name` of the extension (gemv, gemv_int4, dequantize_int4, has_bf16_dot, int4_int8_x, decode_attention, rms_norm,
    add_rms_norm, rope, rope_into_cache, swiglu, argmax_rows, shm_exchange, shm_all_reduce: each source in
    tp/csrc states its inputs and outputs), or None where the kernels are not available."""
    ops = _ops()
    return None if ops is None else getattr(ops, name)


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the activations the kernels take


def op_for(name: str, x: torch.Tensor, max_rows: int | None = None):
    """op(name) where it serves activations `x`, else None (take torch's path): x off the CPU or of
    another dtype, more than `max_rows` rows (the leading dimensions), or no kernels built."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        return None
    if max_rows is not None and x.numel() // x.shape[-1] > max_rows:
        return None
    return op(name)
