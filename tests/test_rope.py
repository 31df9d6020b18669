"""tp/csrc/rope.cpp: the rotary embedding bit for bit equal to torch's elementwise path (the same
roundings, in float32 and bfloat16), on q and k as split from the fused qkv projection (strided)."""
import pytest
import torch

import tp.cpu_kernels as kernels
from conftest import RUNNABLE_ISAS
from tp import model as model_module


def _torch_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,head_dim", [(1, 1, 128), (3, 7, 64), (2, 40, 20)])
def test_kernel_equals_torchs_elementwise_rope(isa, dtype, batch, tokens, head_dim):
    op = kernels.build(isa).rope
    g = torch.Generator().manual_seed(batch * tokens + head_dim)
    heads, kv = 4, 2
    qkv = torch.randn(batch, tokens, heads + 2 * kv, head_dim, generator=g).to(dtype).transpose(1, 2)
    q, k, _ = qkv.split([heads, kv, kv], dim=1)  # strided views, as Attention.forward makes them
    angles = torch.rand(batch, 1, tokens, head_dim, generator=g) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    for x in (q, k):
        y = op(x, cos, sin)
        assert y.is_contiguous() and y.dtype == dtype
        torch.testing.assert_close(y, _torch_rope(x, cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv", [(1, 4, 4), (3, 4, 2), (2, 8, 1)])
def test_rope_into_cache_is_the_two_ropes_and_the_cache_writes(isa, dtype, batch, heads, kv):
    """Each row into its own slot (rows at different points of their sequences)."""
    ops = kernels.build(isa)
    g = torch.Generator().manual_seed(batch * heads + kv)
    D, S = 64, 9
    slots = torch.tensor([5, 0, 8][:batch])
    qkv = torch.randn(batch, (heads + 2 * kv) * D, generator=g).to(dtype)
    angles = torch.rand(batch, 1, 1, D, generator=g) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_cache, v_cache = (torch.randn(batch, kv, S, D, generator=g).to(dtype) for _ in range(2))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = ops.rope_into_cache(qkv, cos, sin, k_cache, v_cache, slots, heads)
    split = qkv.view(batch, 1, heads + 2 * kv, D).transpose(1, 2)  # as Attention.forward's torch path
    q_ref, k_ref, v_ref = split.split([heads, kv, kv], dim=1)
    assert q.shape == (batch, heads, 1, D) and q.is_contiguous()
    assert torch.equal(q, ops.rope(q_ref, cos, sin)) and torch.equal(q, _torch_rope(q_ref, cos, sin))
    k_rotated = _torch_rope(k_ref, cos, sin)
    for b, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[b, :, slot], k_rotated[b, :, 0])
        assert torch.equal(v_cache[b, :, slot], v_ref[b, :, 0])
        others = [s for s in range(S) if s != slot]
        assert torch.equal(k_cache[b, :, others], k_before[b, :, others]), "no other slot is written"
        assert torch.equal(v_cache[b, :, others], v_before[b, :, others])
    with pytest.raises(RuntimeError, match="slot 9 outside the cache's 9"):
        ops.rope_into_cache(qkv, cos, sin, k_cache, v_cache, torch.full((batch,), S), heads)
    with pytest.raises(RuntimeError, match="slots: contiguous int64 \\[B\\]"):
        ops.rope_into_cache(qkv, cos, sin, k_cache, v_cache, slots.int(), heads)
    with pytest.raises(RuntimeError, match="qkv: contiguous \\[B, \\(heads \\+ 2 KVH\\) D\\]"):
        ops.rope_into_cache(qkv, cos, sin, k_cache, v_cache, slots, heads + 1)


def test_model_uses_the_kernel_on_the_cpu(monkeypatch):
    calls = []
    real = kernels.op("rope")
    monkeypatch.setattr(kernels, "op", lambda name: lambda x, c, s: calls.append((name, x.shape)) or real(x, c, s))
    x, cos, sin = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(model_module.apply_rope(x, cos, sin), _torch_rope(x, cos, sin), rtol=0, atol=0)
    assert calls == [("rope", (1, 2, 1, 8))]
    monkeypatch.setattr(kernels, "op", lambda name: None)  # no kernel built: torch's path, same values
    torch.testing.assert_close(model_module.apply_rope(x, cos, sin), _torch_rope(x, cos, sin), rtol=0, atol=0)


def test_kernel_refuses_bad_input_with_a_message():
    op = kernels.op("rope")
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="cos, sin: contiguous \\[B, 1, T, D\\] in x's dtype"):
        op(x, torch.randn(1, 1, 3, 8).bfloat16(), torch.randn(1, 1, 3, 8))
    with pytest.raises(RuntimeError, match="D even"):
        op(torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7))
