"""tp/csrc/gemv.cpp and the choice of decode matmul path: results within float32 summation rounding
of the exact product for every weight dtype, the host's measured choice, and the build itself (a
missing ninja on PATH, a lock left by a killed build)."""
import fcntl
import logging
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tp.cpu_kernels as kernels
from conftest import HOST_ISA, RUNNABLE_ISAS, cpu_flags
from tp import decode_matmul
from tp.quant import quantize_rows


def test_this_x86_host_builds_its_kernel():
    assert os.uname().machine == "x86_64" and HOST_ISA in ("avx2", "avx512"), "every x86 host this project runs on"
    op = kernels.gemv()
    assert op is not None and f"internlm_tp_{HOST_ISA}" in str(op), "the host's kernel is built and used"


def _weights(kind: str, n: int, k: int, g: torch.Generator):
    w = torch.randn(n, k, generator=g)
    if kind == "int8":
        q, scale = quantize_rows(w)
        return q, scale, q.double() * scale.double()[:, None]
    w = w.to(getattr(torch, kind))
    return w, None, w.double()


# K: a multiple of both vector widths, and ones with scalar tails; N off the 4- and 8-row steps.
@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
# Float weights have the activations' dtype in the model; int8 weights take either.
@pytest.mark.parametrize("kind,x_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                          ("int8", torch.float32), ("int8", torch.bfloat16)])
@pytest.mark.parametrize("rows,k", [(1, 2048), (2, 120), (3, 344), (4, 17), (7, 2048), (16, 120)])
def test_kernel_is_float32_exact_up_to_summation_rounding(isa, kind, x_dtype, rows, k):
    """Against the product in float64: float32 rounding of the K-term sum (and of the scale and bias)
    is all that may separate them, bound (K + 3) * 2^-24 of the sum of |terms|; bfloat16 outputs add
    one bfloat16 rounding of the result, and int8 weights with bfloat16 activations the rounding of
    x to int16 blocks."""
    op = kernels.build(isa).gemv
    g = torch.Generator().manual_seed(rows * 1000 + k)
    n = 4097 if k == 2048 else 389
    w, scale, exact_w = _weights(kind, n, k, g)
    x = torch.randn(rows, k, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g).to(x_dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the rows split over threads
    try:
        y = op(x, w, scale, bias)
    finally:
        torch.set_num_threads(threads)
    assert y.dtype == x_dtype and y.shape == (rows, n)
    exact = x.double() @ exact_w.t() + bias.double()
    magnitude = x.double().abs() @ exact_w.abs().t() + bias.double().abs()
    bound = (k + 3) * 2 ** -24 * magnitude
    if kind == "int8" and x_dtype == torch.bfloat16:
        # x as int16 per block of 32 (gemv.cpp's BlockedX): each element off by at most 2^-15 of its
        # block's largest |x|; the K % 32 tail stays exact.
        blocks = k // 32
        largest = x[:, :blocks * 32].double().abs().reshape(rows, blocks, 32).amax(-1)
        x_error = torch.zeros(rows, k, dtype=torch.float64)
        x_error[:, :blocks * 32] = largest.repeat_interleave(32, dim=1) * 2 ** -15
        bound = bound + x_error @ exact_w.abs().t()
    if x_dtype == torch.bfloat16:
        bound = bound + exact.abs() * 2 ** -8
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
def test_bfloat16_dot_products_run_where_the_cpu_has_them_within_the_same_bound(isa):
    """bfloat16 x bfloat16 from 2 rows on takes vdpbf16ps where the CPU has AVX512_BF16 (the AVX-512
    build asks the CPU at run time): the same float32-summation bound as the widening path, and
    different low bits from it (other sums), which shows the dot path ran; one row, or bf16_dot=False,
    is the widening path to the bit."""
    ops = kernels.build(isa)
    assert ops.has_bf16_dot() == (isa == "avx512" and "avx512_bf16" in cpu_flags())
    g = torch.Generator().manual_seed(5)
    k, n = 2048 + 24, 4097
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(16, k, generator=g).to(torch.bfloat16)
    exact = x.double() @ w.double().t()
    bound = (k + 3) * 2 ** -24 * (x.double().abs() @ w.double().abs().t()) + exact.abs() * 2 ** -8
    dot, widened = ops.gemv(x, w, None, None), ops.gemv(x, w, None, None, False)
    for y in (dot, widened):
        assert ((y.double() - exact).abs() <= bound).all()
    assert torch.equal(dot, widened) != ops.has_bf16_dot()
    assert torch.equal(ops.gemv(x[:1], w, None, None), widened[:1])


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
def test_int8_weights_with_bfloat16_activations_exact_within_a_block_range_of_2_to_the_7(isa):
    """bfloat16 activations meet int8 weights as int16 blocks of 32: every element within 2^7 of its
    block's largest is carried exactly, so integer data (sums under 2^24) come out exactly as the
    integer product, rounded once to bfloat16."""
    op = kernels.build(isa).gemv
    g = torch.Generator().manual_seed(7)
    k, n = 256 + 5, 67  # 8 whole blocks and a tail of 5
    x = torch.randint(-100, 101, (3, k), generator=g).float()
    x[:, ::32] = 100.0  # each block's largest is 100: every nonzero integer is within 2^7 of it
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    y = op(x.to(torch.bfloat16), w, torch.ones(n), None)
    exact = (x.double() @ w.double().t()).to(torch.bfloat16)
    assert torch.equal(y, exact)


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
def test_int8_weights_with_bfloat16_activations_round_small_elements_within_the_bound(isa):
    """Elements far below their block's largest round to 2^-16 of it (2^-15 bounds it): the result
    moves by no more than that bound, and is not exact (the rounding is real, not skipped)."""
    op = kernels.build(isa).gemv
    g = torch.Generator().manual_seed(8)
    k, n = 512, 129
    x = (torch.randn(1, k, generator=g) * 2 ** -9).to(torch.bfloat16)
    x[0, ::32] = 2.0 ** 10  # 2^19 above the rest: they keep only their top bits
    q, scale = quantize_rows(torch.randn(n, k, generator=g))
    w = q.double() * scale.double()[:, None]
    y = op(x, q, scale, None).double()
    through_float = op(x.float(), q, scale, None).double()
    x_error = torch.full((1, k), 2.0 ** 10 * 2 ** -15, dtype=torch.float64)
    bound = x_error @ w.abs().t() + (k + 3) * 2 ** -24 * (x.double().abs() @ w.abs().t())
    exact = x.double() @ w.t()
    assert ((y - exact).abs() <= bound + exact.abs() * 2 ** -8).all()
    assert not torch.equal(y, through_float.to(torch.bfloat16).double())


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
def test_int8_weights_with_bfloat16_activations_carry_nan_and_inf(isa):
    op = kernels.build(isa).gemv
    x = torch.ones(3, 64, dtype=torch.bfloat16)
    x[1, 40], x[2, 3] = float("nan"), float("inf")
    y = op(x, torch.ones(5, 64, dtype=torch.int8), torch.ones(5), None)
    assert torch.equal(y[0], torch.full((5,), 64.0, dtype=torch.bfloat16))
    assert y[1:].isnan().all()


def test_kernel_refuses_bad_input_with_a_message():
    op = kernels.gemv()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="int8 weights need their per-row scale"):
        op(x, torch.zeros(3, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="w: contiguous \\[N, K\\] with x's K"):
        op(x, torch.zeros(3, 9))
    with pytest.raises(RuntimeError, match="bias: \\[N\\] in x's dtype"):
        op(x, torch.zeros(3, 8), None, torch.zeros(3, dtype=torch.bfloat16))
    assert op(torch.randn(0, 8), torch.zeros(3, 8)).shape == (0, 3)
    assert not op(torch.randn(2, 0), torch.zeros(3, 0)).any()


def test_every_path_gives_the_same_product():
    g = torch.Generator().manual_seed(0)
    for kind, x_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.bfloat16),
                          ("int8", torch.float32)):
        w, scale, exact_w = _weights(kind, 300, 256, g)
        x = torch.randn(1, 256, generator=g).to(x_dtype)
        exact = (x.double() @ exact_w.t())
        paths = decode_matmul.candidates(w, x_dtype)
        assert paths[0] == "ours" and len(paths) > 1
        for path in paths:
            y = decode_matmul.run(path, x, w, scale, None)
            tol = 1e-4 if x_dtype == torch.float32 and path != "int8pack" else 2e-2
            assert torch.allclose(y.double(), exact, rtol=tol, atol=tol * exact.abs().max().item()), (kind, path)


def test_candidates_follow_the_switch(monkeypatch):
    w, q = torch.zeros(8, 32), torch.zeros(8, 32, dtype=torch.int8)
    monkeypatch.setenv(kernels.ENV, "torch")
    assert decode_matmul.candidates(w, torch.float32) == ["linear", "mv"]
    assert decode_matmul.candidates(q, torch.bfloat16) == ["int8pack"]
    assert decode_matmul.candidates(q[:, :24], torch.bfloat16) == ["dequant"], "torch's kernel needs K % 16 == 0"
    assert decode_matmul.candidates(q, torch.float32) == ["dequant"], "and bfloat16 activations"
    monkeypatch.setenv(kernels.ENV, "ours")
    assert decode_matmul.candidates(w, torch.float32) == ["ours"]
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="INTERNLM_TP_GEMV='fast': expected one of auto, ours, torch"):
        decode_matmul.candidates(w, torch.float32)


class _Layer:
    def __init__(self, n, k, dtype=torch.float32):
        self.weight, self.weight_scale = torch.randn(n, k).to(dtype), None


def test_choice_is_the_fastest_measured_per_shape(monkeypatch, caplog):
    monkeypatch.setattr(decode_matmul, "MIN_MEASURED_BYTES", 0)
    speed = {"ours": 3.0, "linear": 1.0, "mv": 2.0}
    monkeypatch.setattr(decode_matmul, "_seconds",  # as if `path` read `speed[path]` GB/s
                        lambda path, x, sample: sum(w.numel() * w.element_size() for w, _ in sample) / 1e9 / speed[path])
    layers = [_Layer(64, 32), _Layer(64, 32), _Layer(16, 64)]
    with caplog.at_level(logging.INFO, logger="internlm_tp"):
        assert decode_matmul.choose(layers, torch.float32) == {(torch.float32, 64, 32): "ours",
                                                               (torch.float32, 16, 64): "ours"}
    assert [m.decode_path for m in layers] == ["ours"] * 3
    speed["ours"] = 0.5
    assert set(decode_matmul.choose(layers, torch.float32).values()) == {"mv"}
    assert [m.decode_path for m in layers] == ["mv"] * 3
    assert "64x32 float32: ours 3.0, linear 1.0, mv 2.0 GB/s -> ours" in caplog.text, "logged with the figures"
    speed["ours"] = 1.95
    assert set(decode_matmul.choose(layers, torch.float32).values()) == {"ours"}, "within MARGIN: ours stays"


def test_cache_resident_weights_are_not_timed(monkeypatch):
    """Tiny models: timings would be noise, and a choice flipping between loads would move low bits."""
    monkeypatch.setattr(decode_matmul, "_seconds", lambda *a: pytest.fail("timed a cache-resident shape"))
    layers = [_Layer(64, 32), _Layer(64, 32)]
    assert decode_matmul.choose(layers, torch.float32) == {(torch.float32, 64, 32): "ours"}


def test_choice_streams_a_bounded_sample_of_the_models_own_weights(monkeypatch):
    monkeypatch.setattr(decode_matmul, "CHOOSE_BYTES", 10_000)
    w = [(torch.zeros(100, 10), None), (torch.zeros(100, 10), None)]  # 4000 bytes each
    sample = decode_matmul._sample(w + [(torch.zeros(1000, 10, dtype=torch.int8), torch.ones(1000))])
    assert [s[0].shape[0] for s in sample] == [100, 100, 200] and sample[2][1].shape == (200,)


def test_layers_send_decode_rows_to_the_chosen_path_and_prefill_to_torch(monkeypatch):
    from tp.layers import ColumnParallelLinear
    layer = ColumnParallelLinear(32, 8, 1, True, torch.float32)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    seen = []
    real = decode_matmul.run
    monkeypatch.setattr(decode_matmul, "run", lambda path, *a: seen.append((path, a[0].shape[0])) or real(path, *a))
    layer.decode_path = "mv"
    for rows in (1, 16, 17):
        x = torch.randn(1, rows, 32)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    assert seen == [("mv", 1), ("mv", 16)], "more than MAX_ROWS rows: torch's GEMM"


def test_no_kernel_means_a_warning_and_torch_paths(monkeypatch):
    import torch.utils.cpp_extension
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels._build() is None, "INTERNLM_TP_GEMV=torch asks for torch's paths"
    monkeypatch.setenv(kernels.ENV, "auto")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.warns(UserWarning, match="capability is DEFAULT, neither AVX512 nor AVX2"):
        assert kernels._build() is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    names = ", ".join(source.name for source in kernels._SOURCES)
    with pytest.warns(UserWarning, match=f"could not build {names} .*Ninja is required.*torch's matmuls"):
        assert kernels._build() is None
    monkeypatch.setitem(kernels._state, "ops", None)
    assert decode_matmul.candidates(torch.zeros(4, 4), torch.float32) == ["linear", "mv"]


def _path_without_ninja(tmp_path: Path) -> str:
    """A bin directory with every system tool but ninja: as on a machine where ninja was never installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "ninja":
            (bin_dir / tool.name).symlink_to(tool)
    return str(bin_dir)


def test_fresh_build_with_no_ninja_on_path_uses_the_venvs(tmp_path):
    """`.venv/bin/torchrun` runs with the venv's bin/ off PATH; the build finds the ninja pip put there.
    Slow by nature (40-70 s on 2 cores): it compiles the kernel sources from nothing, which is what it tests."""
    assert (Path(sys.executable).parent / "ninja").exists(), "ninja is a declared dependency"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PATH": _path_without_ninja(tmp_path),
           kernels.ENV: "auto"}
    proc = subprocess.run([sys.executable, "-W", "always", "-c", "from tp.cpu_kernels import gemv; print(gemv())"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"internlm_tp_{HOST_ISA}.gemv" in proc.stdout, proc.stderr
    assert "could not build" not in proc.stderr


def test_build_waits_for_a_live_build_and_clears_a_dead_ones_lock(tmp_path):
    """cpp_extension waits forever on the `lock` file of a build killed mid-way (a hang, not an
    error). Ours takes an flock first, which dies with its process: while another process holds it,
    we wait; once we hold it, a leftover `lock` is removed and the build goes on.
    Slow by nature (40-70 s on 2 cores): it compiles the kernel sources from nothing, which is what it tests."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), kernels.ENV: "auto"}
    directory = tmp_path / kernels._build_directory(HOST_ISA).name
    directory.mkdir()
    (directory / "lock").touch()  # as a SIGKILLed build leaves it
    with open(directory / "internlm_tp.flock", "w") as live_build:
        fcntl.flock(live_build, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-W", "always", "-c",
                                 "from tp.cpu_kernels import gemv; print(gemv())"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert proc.poll() is None and (directory / "lock").exists(), "it waits while a build is live"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == f"internlm_tp_{HOST_ISA}.gemv", err
    assert "left by a build that did not finish" in err and not (directory / "lock").exists()


def _fake_prefill_clock(monkeypatch, cost):
    """decode_matmul's prefill timings made to read cost(compute, rows) seconds for each candidate."""
    last = {}
    real = decode_matmul._prefill

    def recorded(w, scale, x, compute, rows=None):
        last["key"] = (compute, rows)
        return real(w, scale, x, compute, rows)

    def timed(fn):
        fn()
        return cost(*last["key"])

    monkeypatch.setattr(decode_matmul, "_prefill", recorded)
    monkeypatch.setattr(decode_matmul, "_timed", timed)


def _layers(n_rows, n_cols, dtype, count=2):
    from tp.layers import ColumnParallelLinear
    layers = [ColumnParallelLinear(n_cols, n_rows, 1, True, dtype) for _ in range(count)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    return layers


def test_prefill_compute_dtype_is_measured_and_used(monkeypatch):
    """bfloat16 prefill GEMMs run in float32 on weight blocks where that is faster here (CPUs without
    bfloat16 dot products), else natively; the result is the same product either way."""
    layers = _layers(32, 64, torch.bfloat16)
    assert decode_matmul.choose_prefill(layers, torch.bfloat16) == (None, None), "cache-resident: not timed"
    monkeypatch.setattr(decode_matmul, "PREFILL_MIN_MEASURED_BYTES", 0)
    assert decode_matmul.choose_prefill(_layers(32, 64, torch.float32), torch.float32) == (None, None), \
        "float32: no dtype to choose (and 32 rows: no block size under them)"
    _fake_prefill_clock(monkeypatch, lambda compute, rows: 0.1 if compute == torch.float32 else 1.0)
    assert decode_matmul.choose_prefill(layers, torch.bfloat16) == (torch.float32, None)
    assert all(m.prefill_compute == torch.float32 for m in layers)
    x = torch.randn(1, 40, 64).to(torch.bfloat16)  # 40 rows: past MAX_ROWS, a prefill
    exact = x.double() @ layers[0].weight.double().t() + layers[0].bias.double()
    assert torch.allclose(layers[0](x).double(), exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_gemm_blocks_are_measured_and_give_the_same_product(monkeypatch, caplog, dtype):
    """Prefill GEMMs over blocks of a weight's rows where that is MARGIN faster than one GEMM (MKL on
    an AMD EPYC); the LM head, which prefill sends one row, is not what is timed; same product."""
    from tp.layers import ParallelLMHead
    monkeypatch.setattr(decode_matmul, "PREFILL_MIN_MEASURED_BYTES", 0)
    monkeypatch.setattr(decode_matmul, "PREFILL_GEMM_ROWS", (16, 8))
    layers = _layers(40, 64, dtype)
    head = ParallelLMHead(64, 512, 500, 1, dtype)  # larger than the layers: must not be the one timed
    torch.nn.init.normal_(head.weight)
    timed_rows = set()

    def cost(compute, rows):
        timed_rows.add(rows)
        return {None: 1.0, 16: 0.95, 8: 0.5}[rows]  # 16: within MARGIN of unblocked, 8: past it

    _fake_prefill_clock(monkeypatch, cost)
    with caplog.at_level(logging.INFO, logger="internlm_tp"):
        compute, rows = decode_matmul.choose_prefill([*layers, head], dtype)
    assert rows == 8 and timed_rows == {None, 16, 8}, "every block size under the layer's 40 rows was timed"
    assert "prefill GEMM blocks (64 rows x 40x64 weights, measured here)" in caplog.text, "a layer's, not the head's"
    assert all(m.prefill_rows == 8 for m in [*layers, head])
    x = torch.randn(1, 40, 64).to(dtype)
    exact = x.double() @ layers[0].weight.double().t() + layers[0].bias.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(layers[0](x).double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    _fake_prefill_clock(monkeypatch, lambda compute, rows: {None: 1.0, 16: 0.95, 8: 0.95}[rows])
    assert decode_matmul.choose_prefill(layers, dtype)[1] is None, "no block MARGIN faster: one GEMM"
    assert layers[0].prefill_rows is None


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_every_isa_build_compiles_on_this_host(isa, tmp_path):
    """Each ISA's branch of tp/csrc (vec.h picks it by the compiler's flags) compiles with the flags
    cpu_kernels uses, whether or not this CPU can run it: an AVX2 host still checks the AVX-512 code
    it cannot execute (the tests above run the build the host has).
    Slow by nature (40-70 s on 2 cores): it compiles the kernel sources from nothing, which is what it tests."""
    from torch.utils.cpp_extension import include_paths
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    for source in kernels._SOURCES:
        cmd = ["g++", "-std=c++20", "-fPIC", "-O1", *kernels.ISA_FLAGS[isa], *kernels.COMMON_FLAGS,
               f"-DOPS_NAMESPACE=internlm_tp_{isa}_check", *includes, "-c", str(source), "-o", str(tmp_path / "o.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{source.name} for {isa}:\n{proc.stderr[-3000:]}"
        assert (tmp_path / "o.o").stat().st_size > 0


def test_int4_prefill_takes_the_measured_compute_dtype_even_where_every_layer_is_int4(monkeypatch):
    """int4 prefill dequantizes blocks of rows into a float GEMM: in float32 where this host's bfloat16
    GEMM is the slower (measured on the largest int4 weight's rows dequantized when no other weight
    is there; a bfloat16 GEMM without bfloat16 dot products took minutes for a 512-token prefill)."""
    from tp import int4
    from tp.layers import ColumnParallelLinear
    from tp.quant import WeightFormat
    monkeypatch.setattr(decode_matmul, "PREFILL_MIN_MEASURED_BYTES", 0)
    fmt = WeightFormat("int4", 32)
    layers = [ColumnParallelLinear(64, 48, 1, False, torch.bfloat16, quantized=fmt) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        packed, scale, zero = int4.quantize_groups(torch.randn(48, 64, generator=g), 32)
        layer.weight.copy_(packed), layer.weight_group_scale.copy_(scale), layer.weight_group_zero.copy_(zero)
    timed = []

    def cost(compute, rows):
        timed.append(compute)
        return 0.1 if compute == torch.float32 else 1.0

    _fake_prefill_clock(monkeypatch, cost)
    assert decode_matmul.choose_prefill(layers, torch.bfloat16) == (torch.float32, None)
    assert set(timed) == {None, torch.float32}, "bfloat16 against float32, timed on dequantized int4 rows"
    assert all(m.prefill_compute == torch.float32 for m in layers)
    x = torch.randn(1, 40, 64).to(torch.bfloat16)  # past MAX_ROWS: the dequantizing prefill path
    w = int4.dequantize(layers[0].weight, layers[0].weight_group_scale, layers[0].weight_group_zero)
    exact = x.double() @ w.double().t()
    assert torch.allclose(layers[0](x).double(), exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())
    _fake_prefill_clock(monkeypatch, lambda compute, rows: 1.0 if compute == torch.float32 else 0.1)
    assert decode_matmul.choose_prefill(layers, torch.bfloat16) == (None, None)
    assert all(m.prefill_compute is None for m in layers)
