"""Weight-only int8: error bounds, cut == load-time quantization bit for bit, TP=2 == TP=1, refusals."""
import json
import os

import pytest
import torch

from conftest import PROMPTS
from cut_weights import CutOptions, cut
from tp.checkpoint import CheckpointError, CheckpointReader
from tp.load import load_model
from tp.quant import int8_linear, is_quantized, quantize_rows
from tp.tokenizer import Tokenizer
from tp_worker import spawn


def test_quantize_rows_error_is_at_most_half_a_step():
    w = torch.randn(64, 300) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.dtype == torch.float32
    assert torch.equal(q[5], torch.zeros(300, dtype=torch.int8)) and scale[5] == 1
    assert (q.float().abs().amax(dim=1)[torch.arange(64) != 5] == 127).all(), "each row uses the full range"
    err = (w - q.float() * scale[:, None]).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def _quantized_product(rows: int, k: int, dtype: torch.dtype, n: int = 385):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g).to(dtype)
    q, scale = quantize_rows(w)
    return x, w, q, scale


# up to 16 rows: our kernel; more: the dequantized GEMM (bfloat16 or float32).
# 120, 344, 17: K off a multiple of 16 (masked tails); 385 output rows: off the kernel's 4-row steps.
@pytest.mark.parametrize("rows,k", [(1, 256), (2, 120), (3, 344), (4, 17), (9, 344), (32, 256), (40, 256), (40, 120)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_against_float_within_the_derived_bound(rows, k, dtype):
    x, w, q, scale = _quantized_product(rows, k, dtype)
    y = int8_linear(x, q, scale)
    assert y.dtype == dtype and y.shape == (rows, 385)
    exact = x.double() @ w.double().t()
    # |x . (w - q s)| <= sum|x| * s / 2 (weight rounding), plus the arithmetic: at worst a bfloat16
    # scale, product and output each add one relative rounding (2^-8) of the dequantized product.
    dequantized = x.double().abs() @ (q.double() * scale.double()[:, None]).abs().t()
    bound = x.double().abs() @ (scale.double() / 2).unsqueeze(0).expand(k, -1) + dequantized * 3 * 2 ** -8 + 1e-6
    err = (y.double() - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0, "the comparison sees a quantized product"


@pytest.mark.parametrize("rows,k", [(1, 2048), (2, 120), (3, 344), (4, 17), (7, 2048), (16, 120)])
def test_cpu_gemv_kernel_is_float32_exact_up_to_summation_rounding(rows, k, monkeypatch):
    """Our kernel against the dequantized product in float64: only float32 rounding of the K-term sum
    (and the scale) may separate them, so the bound is (K + 2) * 2^-24 of the sum of |terms|."""
    import tp.cpu_kernels as kernels
    monkeypatch.delenv(kernels.ENV, raising=False)
    op = kernels._build()
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert op is None, "the kernel is AVX-512 code: it must not be used on this CPU"
        return
    assert op is not None, "this CPU runs AVX-512, so the kernel must have been built"
    monkeypatch.setitem(kernels._state, "op", op)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the rows split over threads (a 2048-wide row: 8 row groups a thread)
    try:
        x, _, q, scale = _quantized_product(rows, k, torch.float32, n=4097 if k == 2048 else 385)
        y = op(x, q, scale).double()
        assert torch.equal(int8_linear(x, q, scale), op(x, q, scale)), "int8_linear routes <= 16 rows to it"
    finally:
        torch.set_num_threads(threads)
    dequantized = q.double() * scale.double()[:, None]
    exact = x.double() @ dequantized.t()
    bound = (k + 2) * 2 ** -24 * (x.double().abs() @ dequantized.abs().t())
    assert ((y - exact).abs() <= bound).all()


def test_int8_linear_routes_each_case_to_its_path(monkeypatch):
    """Up to 16 rows: our kernel, or without it torch's kernel, which must only ever see bfloat16
    activations and K % 16 == 0 (it rounds inputs to bfloat16 and reads past shorter rows); more rows:
    the dequantized GEMM. Empty inputs give empty or zero outputs."""
    import tp.cpu_kernels as kernels
    import tp.quant as quant
    seen = []
    real_pack, real_dequant = torch._weight_int8pack_mm, quant.dequantized_linear
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, q, s: seen.append(("torch", *x.shape)) or real_pack(x, q, s))
    monkeypatch.setattr(quant, "dequantized_linear", lambda x, q, s: seen.append(("dequant", *x.shape)) or real_dequant(x, q, s))
    cases = [(1, 256, torch.bfloat16), (16, 256, torch.bfloat16), (5, 256, torch.float32), (5, 120, torch.bfloat16),
             (17, 256, torch.bfloat16), (17, 256, torch.float32)]
    for kernel in (kernels.int8_gemv(), None):
        monkeypatch.setitem(kernels._state, "op", kernel)
        seen.clear()
        for rows, k, dtype in cases:
            x, _, q, scale = _quantized_product(rows, k, dtype)
            int8_linear(x, q, scale)
        large = [("dequant", 17, 256), ("dequant", 17, 256)]
        if kernel is not None:
            assert seen == large, "<= 16 rows: the kernel; more: the dequantized GEMM"
        else:
            assert seen == [("torch", 1, 256), ("torch", 16, 256), ("dequant", 5, 256), ("dequant", 5, 120)] + large
    q, scale = quantize_rows(torch.randn(7, 32))
    assert int8_linear(torch.randn(0, 32), q, scale).shape == (0, 7)
    empty_k = int8_linear(torch.randn(2, 0), torch.zeros(7, 0, dtype=torch.int8), torch.ones(7))
    assert empty_k.shape == (2, 7) and not empty_k.any()


def test_dequantized_linear_in_blocks_equals_one_block(monkeypatch):
    """Blocks of rows through one reused scratch buffer: the same result as one block, and as the
    plainly dequantized weight, call after call (the buffer holds the previous call's weights)."""
    import tp.quant as quant
    x, _, q, scale = _quantized_product(6, 64, torch.float32, n=1000)
    whole = quant.dequantized_linear(x, q, scale)
    assert torch.allclose(whole, x @ (q.float() * scale[:, None]).t(), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(quant, "_DEQUANT_BLOCK_BYTES", 64 * 4 * 300)  # blocks of 300 rows, the last one 100
    assert torch.equal(quant.dequantized_linear(x, q, scale), whole)
    x2, _, q2, scale2 = _quantized_product(3, 16, torch.float32, n=50)  # a smaller weight after a larger one
    assert torch.allclose(quant.dequantized_linear(x2, q2, scale2), x2 @ (q2.float() * scale2[:, None]).t(),
                          rtol=1e-5, atol=1e-5)
    assert torch.equal(quant.dequantized_linear(x, q, scale), whole)


def test_cpu_gemv_kernel_selection(monkeypatch):
    import torch.utils.cpp_extension

    import tp.cpu_kernels as kernels
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels._build() is None, "INTERNLM_TP_INT8_GEMV=torch asks for torch's kernel"
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="expected auto or torch"):
        kernels._build()
    monkeypatch.setenv(kernels.ENV, "auto")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match="capability is AVX2, not AVX512"):
        assert kernels._build() is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="could not build int8_gemv.cpp .*Ninja is required.*torch's int8 paths"):
        assert kernels._build() is None
    # and without the kernel, decode rows still get a correct product
    monkeypatch.setitem(kernels._state, "op", None)
    x, w, q, scale = _quantized_product(1, 256, torch.bfloat16)
    assert (int8_linear(x, q, scale).double() - x.double() @ w.double().t()).abs().max() < 0.5


def test_which_tensors_are_quantized():
    assert is_quantized("model.layers.3.self_attn.q_proj.weight", "int8")
    assert is_quantized("model.layers.3.mlp.down_proj.weight", "int8")
    assert is_quantized("model.embed_tokens.weight", "int8")
    assert is_quantized("lm_head.weight", "int8") and not is_quantized("lm_head.weight", "int8", lm_head=False)
    assert not is_quantized("model.layers.3.self_attn.q_proj.bias", "int8")
    assert not is_quantized("model.norm.weight", "int8")
    assert not is_quantized("model.layers.3.mlp.down_proj.weight", "none")


@pytest.mark.parametrize("world_size", [1, 2, 4])  # 4: down_proj's local K is 120, off the fast kernel
def test_quantized_cut_equals_load_time_quantization_bit_for_bit(tiny_ckpt, tmp_path, world_size):
    out = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "q"), world_size, quantize="int8", progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantize"] == "int8" and manifest["quantize_lm_head"] is True
    assert json.loads((out / "rank_0" / "config.json").read_text())["quantization"]["method"] == "weight_only_int8"
    with CheckpointReader(out / "rank_0") as r:
        assert r.dtype("model.layers.0.mlp.down_proj.weight") == torch.int8
        assert r.shape("model.layers.0.mlp.down_proj.weight_scale") == (192,), "row-parallel scales stay whole"
        assert r.shape("model.layers.0.mlp.gate_proj.weight_scale") == (480 // world_size,), "column scales split"
    for rank in range(world_size):
        from_cut = dict(load_model(out, rank, world_size, dtype="bfloat16").named_parameters())
        at_load = dict(load_model(tiny_ckpt, rank, world_size, dtype="bfloat16", quantize="int8").named_parameters())
        assert from_cut.keys() == at_load.keys()
        for name, p in at_load.items():
            assert p.dtype == from_cut[name].dtype and torch.equal(p, from_cut[name]), name
        assert from_cut["model.layers.1.self_attn.qkv_proj.weight"].dtype == torch.int8


def test_partition_bytes_shrink(tiny_ckpt, tmp_path):
    f32 = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "f32"), 2, progress=False))
    q = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "q"), 2, quantize="int8", dtype="bfloat16", progress=False))
    size = lambda d: sum(p.stat().st_size for p in d.glob("rank_*/*.safetensors"))  # noqa: E731
    assert size(q) <= 0.3 * size(f32)


@pytest.mark.parametrize("world_size", [2, 4])
def test_int8_greedy_tokens_do_not_depend_on_tp_size(tiny_ckpt, tmp_path, world_size):
    """float32 activations: every int8 matmul (our decode kernel, the dequantizing prefill) and the
    all-reduce stay float32, so the TP size does not move a greedy token.
    (With bfloat16 activations, float or int8, it does on near-ties, here and in every TP system.)"""
    tok = Tokenizer(tiny_ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    (tmp_path / "1").mkdir()
    (tmp_path / "n").mkdir()
    one = spawn(1, tiny_ckpt, prompts, 12, tmp_path / "1", dtype="float32", quantize="int8")[0]
    many = spawn(world_size, tiny_ckpt, prompts, 12, tmp_path / "n", dtype="float32", quantize="int8")
    assert all(r["batched"] == one["batched"] and r["alone"] == one["alone"] for r in many)


def test_quantized_cut_refuses_other_settings(tiny_ckpt, tmp_path):
    out = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "q"), 2, quantize="int8", progress=False))
    with pytest.raises(CheckpointError, match="made with quantize=int8, launched with model.quantize=none"):
        load_model(out, 0, 2, quantize="none")
    with pytest.raises(CheckpointError, match="cut for 2 ranks, launched with 1"):
        load_model(out, 0, 1, quantize="int8")
    plain = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "plain"), 2, progress=False))
    with pytest.raises(CheckpointError, match="made with quantize=none, launched with model.quantize=int8"):
        load_model(plain, 0, 2, quantize="int8")


def test_embedding_quantization_can_be_turned_off(tiny_ckpt, tmp_path):
    out = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "q"), 2, quantize="int8", quantize_embedding=False,
                         progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantize_embedding"] is False
    assert json.loads((out / "rank_1" / "config.json").read_text())["quantization"]["embedding"] is False
    with CheckpointReader(out / "rank_1") as r:
        assert r.dtype("model.embed_tokens.weight") == torch.float32
        assert "model.embed_tokens.weight_scale" not in r.names()
        assert r.dtype("lm_head.weight") == torch.int8
    from_cut = dict(load_model(out, 1, 2).named_parameters())
    at_load = dict(load_model(tiny_ckpt, 1, 2, quantize="int8", quantize_embedding=False).named_parameters())
    assert from_cut.keys() == at_load.keys() and all(torch.equal(p, from_cut[n]) for n, p in at_load.items())
    assert from_cut["model.embed_tokens.weight"].dtype == torch.float32


def test_cpu_gemv_build_waits_for_a_live_build_and_clears_a_dead_ones_lock(tmp_path):
    """cpp_extension waits forever on the `lock` file of a build killed mid-way (a hang, not an
    error). Ours takes an flock first, which dies with its process: while another process holds it,
    we wait; once we hold it, a leftover `lock` is removed and the build goes on."""
    import fcntl
    import subprocess
    import sys
    import time

    import tp.cpu_kernels as kernels
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), kernels.ENV: "auto"}
    directory = tmp_path / kernels._build_directory().name
    directory.mkdir()
    (directory / "lock").touch()  # as a SIGKILLed build leaves it
    with open(directory / "internlm_tp.flock", "w") as live_build:
        fcntl.flock(live_build, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-W", "always", "-c",
                                 "from tp.cpu_kernels import int8_gemv; print(int8_gemv())"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert proc.poll() is None and (directory / "lock").exists(), "it waits while a build is live"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == "internlm_tp.int8_gemv", err
    assert "left by a build that did not finish" in err and not (directory / "lock").exists()
