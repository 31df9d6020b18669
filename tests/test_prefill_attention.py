"""tp/prefill_attention.py: causal attention over a prompt in query blocks against attention in float64
(grouped-query heads, prompts shorter than a block and not a multiple of it), a rank's heads alone
equal to the same heads among all (TP sizes agree), the host's measured choice, and greedy tokens
equal through either path."""
import logging

import pytest
import torch
import torch.nn.functional as F

from tp import prefill_attention
from tp.generate import generate
from tp.load import load_model
from tp.tiny import write_tiny_checkpoint


def _reference(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    t = q.shape[2]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("heads,kv_heads,positions", [(8, 8, 200), (8, 2, 64), (4, 1, 7), (6, 3, 129)])
def test_blocks_match_causal_attention_in_float64(heads, kv_heads, positions):
    g = torch.Generator().manual_seed(heads * 1000 + positions)
    q = torch.randn(2, heads, positions, 32, generator=g)
    k, v = (torch.randn(2, kv_heads, positions, 32, generator=g) for _ in range(2))
    scale = 32 ** -0.5
    y = prefill_attention.blocks(q, k, v, scale)
    exact = _reference(q, k, v, scale)
    assert y.shape == q.shape and y.dtype == torch.float32
    # the sums' rounding: a few float32 ulp of the largest |v|, as SDPA's own error
    sdpa_error = (F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
                  .double() - exact).abs().max()
    assert (y.double() - exact).abs().max() <= max(1e-5 * v.abs().max().item(), 4 * sdpa_error.item())


def test_a_ranks_heads_alone_give_the_values_they_give_among_all():
    """TP=2 holds query heads [0, 4) with kv head 0 on rank 0: its attention must be bit for bit what
    TP=1 computes for those heads, or greedy tokens could depend on the TP size."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, 300, 64, generator=g)
    k, v = (torch.randn(1, 2, 300, 64, generator=g) for _ in range(2))
    whole = prefill_attention.blocks(q, k, v, 0.125)
    for rank in range(2):
        half = prefill_attention.blocks(q[:, 4 * rank:4 * rank + 4].contiguous(), k[:, rank:rank + 1].contiguous(),
                                        v[:, rank:rank + 1].contiguous(), 0.125)
        assert torch.equal(half, whole[:, 4 * rank:4 * rank + 4])


def test_choice_is_measured_and_logged(monkeypatch, caplog):
    class Attn:
        local_heads, local_kv_heads, head_dim, prefill_path = 2, 1, 16, None
    modules = [Attn(), Attn()]
    # 2 heads x 512 positions x 16 in float32: 64 KB of queries, under the floor: SDPA, not timed
    monkeypatch.setattr(prefill_attention, "_seconds", lambda *a: pytest.fail("timed a call of microseconds"))
    assert prefill_attention.choose(modules, torch.float32) == "sdpa"
    assert all(m.prefill_path == "sdpa" for m in modules)
    monkeypatch.undo()
    # measured: the faster path wins only by MARGIN, either way the choice is logged with both times
    for blocks_ms, expected in ((1.0, "blocks"), (1.1, "sdpa")):  # sdpa 1.2 ms, MARGIN 1.1
        monkeypatch.setattr(prefill_attention, "MIN_MEASURED_BYTES", 0)
        monkeypatch.setattr(prefill_attention, "_seconds", lambda p, *a, b=blocks_ms: (b if p == "blocks" else 1.2) / 1e3)
        with caplog.at_level(logging.INFO, logger="internlm_tp"):
            assert prefill_attention.choose(modules, torch.float32) == expected
        assert all(m.prefill_path == expected for m in modules)
        assert (f"prefill attention (2 heads x 512 positions, float32, measured here): sdpa 1.2 ms, "
                f"blocks {blocks_ms:.1f} ms -> {expected}") in caplog.text
    assert prefill_attention.choose([], torch.float32) is None
    with pytest.raises(ValueError, match="unknown prefill attention path 'flash'"):
        prefill_attention.run("flash", torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 1.0)


def test_greedy_tokens_are_the_same_through_either_path(tmp_path, monkeypatch):
    calls = []
    blocks = prefill_attention.blocks
    monkeypatch.setattr(prefill_attention, "blocks", lambda *a: calls.append(a[0].shape) or blocks(*a))
    write_tiny_checkpoint(tmp_path, shards=2, dtype=torch.float32)
    model = load_model(tmp_path)
    assert all(a.prefill_path == "sdpa" for a in model.attentions()), "tiny model: untimed, SDPA"
    prompt = [[1] + [(7 * i) % 90 + 3 for i in range(150)]]  # unpadded: the path this choice is for
    runs = {}
    for path in prefill_attention.PATHS:
        for a in model.attentions():
            a.prefill_path = path
        runs[path] = generate(model, prompt, 10, eos_id=-1).tokens
    layers = len(model.attentions())
    assert len(calls) == layers and calls[0][2] == 151, "blocks ran once a layer, on the whole prompt only"
    assert runs["blocks"] == runs["sdpa"]
