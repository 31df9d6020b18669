"""Weight-only int8: error bounds, cut == load-time quantization bit for bit, TP=2 == TP=1, refusals."""
import json

import pytest
import torch

from conftest import PROMPTS
from cut_weights import CutOptions, cut
from tp import malloc
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


# int8_linear (prefill; decode rows go through tp.decode_matmul, tests/test_cpu_kernels.py): the
# dequantized GEMM, bfloat16 or float32. 120, 344, 17: K off a multiple of 16.
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


def test_dequantized_linear_in_blocks_equals_one_block(monkeypatch):
    """Blocks of rows through one reused scratch buffer: the same result as one block, and as the
    plainly dequantized weight, call after call (the buffer holds the previous call's weights)."""
    import tp.quant as quant
    x, _, q, scale = _quantized_product(6, 64, torch.float32, n=1000)
    whole = quant.dequantized_linear(x, q, scale)
    assert torch.allclose(whole, x @ (q.float() * scale[:, None]).t(), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(malloc, "SCRATCH_BYTES", 64 * 4 * 300)  # blocks of 300 rows, the last one 100
    assert torch.equal(quant.dequantized_linear(x, q, scale), whole)
    x2, _, q2, scale2 = _quantized_product(3, 16, torch.float32, n=50)  # a smaller weight after a larger one
    assert torch.allclose(quant.dequantized_linear(x2, q2, scale2), x2 @ (q2.float() * scale2[:, None]).t(),
                          rtol=1e-5, atol=1e-5)
    assert torch.equal(quant.dequantized_linear(x, q, scale), whole)


def test_dequantized_linear_rows_per_gemm_and_scratch_made_under_inference_mode(monkeypatch):
    """rows_per_gemm blocks (float weights multiplied in place, int8 through the scratch) give the
    one-GEMM product; a scratch first made under inference_mode (load-time measurements) still
    serves a later call outside it."""
    import tp.quant as quant
    monkeypatch.setattr(malloc, "_scratch", {})
    x, w, q, scale = _quantized_product(40, 64, torch.float32, n=1000)
    with torch.inference_mode():
        quant.dequantized_linear(x, q, scale, rows_per_gemm=300)
    blocked = quant.dequantized_linear(x, q, scale, rows_per_gemm=300)
    assert torch.allclose(blocked, x @ (q.float() * scale[:, None]).t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(quant.dequantized_linear(x, w, None, rows_per_gemm=300), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_which_tensors_are_quantized():
    assert is_quantized("model.layers.3.self_attn.q_proj.weight", "int8")
    assert is_quantized("model.layers.3.mlp.down_proj.weight", "int8")
    assert is_quantized("model.embed_tokens.weight", "int8")
    assert is_quantized("lm_head.weight", "int8") and not is_quantized("lm_head.weight", "int8", lm_head=False)
    assert not is_quantized("model.layers.3.self_attn.q_proj.bias", "int8")
    assert not is_quantized("model.norm.weight", "int8")
    assert not is_quantized("model.layers.3.mlp.down_proj.weight", "none")


@pytest.mark.parametrize("world_size", [1, 2, 4])  # 4: down_proj's local K is 120: a scalar tail in the kernel
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
