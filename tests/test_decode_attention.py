"""tp/csrc/decode_attention.cpp and the choice of decode attention path: the kernel against attention
in float64 (grouped-query heads, left padding, cache slices with the cache's strides, head dims with
scalar tails), its refusals, the host's measured choice, and greedy tokens equal through either path."""
import logging

import pytest
import torch

import tp.cpu_kernels as kernels
from conftest import RUNNABLE_ISAS
from tp import decode_attention
from tp.generate import generate
from tp.load import load_model
from tp.tiny import write_tiny_checkpoint


def _reference(q, k, v, scale, mask):
    """softmax(scale q k^T) v in float64, query head h on kv head h // (H / KVH)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,keys", [(8, 8, 128, 1), (8, 2, 128, 37), (4, 1, 20, 300)])
def test_kernel_matches_attention_in_float64(isa, dtype, heads, kv_heads, head_dim, keys):
    op = kernels.build(isa).decode_attention
    g = torch.Generator().manual_seed(keys * 10 + heads)
    batch, capacity = 3, keys + 5
    q = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype)
    cache_k, cache_v = (torch.randn(batch, kv_heads, capacity, head_dim, generator=g).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]  # as KVCache.update returns them: strided slices
    mask = torch.ones(batch, keys, dtype=torch.bool)
    mask[1, : keys // 2] = False  # left padding of row 1
    scale = head_dim ** -0.5
    # per-row lengths over the whole cache: row b reads keys [0, lengths[b]), the rest may hold anything
    lengths = torch.tensor([keys, max(1, keys // 3), keys])
    row_mask = torch.arange(capacity)[None, :] < lengths[:, None]
    padded = torch.ones(batch, capacity, dtype=torch.bool)
    padded[1, : int(lengths[1]) // 2] = False  # left padding of row 1, within its length
    for m, kk, vv, n, exact_mask in ((None, k, v, None, None), (mask, k, v, None, mask),
                                     (None, cache_k, cache_v, lengths, row_mask),
                                     (padded, cache_k, cache_v, lengths, row_mask & padded)):
        y = op(q, kk, vv, scale, m, n)
        exact = _reference(q, cache_k, cache_v, scale, exact_mask) if n is not None else _reference(q, k, v, scale, m)
        assert y.dtype == dtype and y.shape == q.shape
        # float32: the sums' rounding (a few ulp of the largest |v|); bfloat16: one rounding of the result more
        bound = 1e-5 * v.double().abs().amax() + (exact.abs() * 2 ** -8 if dtype == torch.bfloat16 else 0)
        assert ((y.double() - exact).abs() <= bound).all(), (y.double() - exact).abs().max()
    # a row read to its length gives bit for bit what the cache sliced to that length gives
    short = op(q[1:2], cache_k[1:2], cache_v[1:2], scale, None, lengths[1:2])
    assert torch.equal(short, op(q[1:2], cache_k[1:2, :, :lengths[1]], cache_v[1:2, :, :lengths[1]], scale, None))


def test_kernel_refuses_bad_input_with_a_message():
    op = kernels.op("decode_attention")
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="q: contiguous \\[B, H, 1, D\\]"):
        op(torch.randn(1, 4, 2, 16), k, k, 1.0, None)
    with pytest.raises(RuntimeError, match="query heads must be a multiple of kv heads"):
        op(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), 1.0, None)
    with pytest.raises(RuntimeError, match="k, v: q's dtype"):
        op(q, k.bfloat16(), k.bfloat16(), 1.0, None)
    with pytest.raises(RuntimeError, match="mask: bool \\[B, L\\]"):
        op(q, k, k, 1.0, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="lengths\\[0\\] = 6 outside \\[0, 5\\]"):
        op(q, k, k, 1.0, None, torch.tensor([6]))
    with pytest.raises(RuntimeError, match="lengths: contiguous int64 \\[B\\]"):
        op(q, k, k, 1.0, None, torch.tensor([5, 5]))


def test_choice_is_measured_and_logged(monkeypatch, caplog):
    class Attn:
        local_heads, local_kv_heads, head_dim, decode_path = 4, 2, 64, None
    modules = [Attn(), Attn()]
    # 2 kv heads x 256 keys x 64 x bfloat16, keys and values: 128 KB a call, under the floor: not timed
    monkeypatch.setattr(decode_attention, "_seconds", lambda *a: pytest.fail("timed a cache-resident call"))
    with caplog.at_level(logging.INFO, logger="internlm_tp"):
        assert decode_attention.choose(modules, torch.bfloat16) == "ours"
    assert "decode attention (4 heads x 256 keys, bfloat16): ours (128 KB of keys and values a call: not timed)" \
        in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(decode_attention, "MIN_MEASURED_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="internlm_tp"):
        chosen = decode_attention.choose(modules, torch.bfloat16)
    assert chosen in ("ours", "sdpa") and all(m.decode_path == chosen for m in modules)
    assert "decode attention (4 heads x 256 keys, bfloat16, measured here): ours" in caplog.text
    assert decode_attention.candidates(torch.float16) == ["sdpa"], "float16: the kernel has no such path"
    monkeypatch.setenv(kernels.ENV, "torch")
    assert decode_attention.candidates(torch.float32) == ["sdpa"]
    monkeypatch.setenv(kernels.ENV, "ours")
    assert decode_attention.candidates(torch.float32) == ["ours"]


def test_greedy_tokens_are_the_same_through_either_path(tmp_path):
    write_tiny_checkpoint(tmp_path, shards=2, dtype=torch.float32)
    model = load_model(tmp_path)
    prompts = [[1, 5, 9, 30, 31, 7], [1, 8, 3]]  # of two lengths: the second row is left-padded
    runs = {}
    for path in ("ours", "sdpa"):
        for a in model.attentions():
            a.decode_path = path
        runs[path] = generate(model, prompts, 12, eos_id=-1).tokens
    assert runs["ours"] == runs["sdpa"]
