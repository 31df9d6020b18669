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
