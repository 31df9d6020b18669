"""The CPU's bound decode step (tp/cpu_step.py) against the eager one it stands for: the same logits
to the bit and the same keys and values in the cache, step after step, in every weight format and
activation dtype, at TP=1 and over 2 real processes; the eager step wherever a kernel it binds is
missing."""
import pytest
import torch

from conftest import PROMPTS
from test_formats import write_published
from tp import cpu_kernels
from tp.cpu_step import CpuDecodeStep
from tp.generate import generate
from tp.load import load_model
from tp.tiny import write_tiny_checkpoint
from tp.tokenizer import Tokenizer
from tp_worker import spawn_steps, steps_both_ways


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Bias on q/k/v/o (InternLM), hidden 256 and MLP 512: whole groups of 32 for int4."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("step") / "tiny", hidden_size=256, intermediate_size=512,
                                 num_attention_heads=16)


@pytest.fixture(scope="module")
def prompts(ckpt):
    tok = Tokenizer(ckpt)
    return [tok.encode(p) for p in PROMPTS[:2]]  # two lengths: the second row left-padded


@pytest.mark.parametrize("dtype,quantize", [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"),
                                            ("bfloat16", "int8"), ("float32", "int4"), ("bfloat16", "int4")])
def test_bound_step_gives_the_eager_steps_logits_and_cache_to_the_bit(ckpt, prompts, dtype, quantize):
    model = load_model(ckpt, dtype=dtype, quantize=quantize, group_size=32)
    eager, bound = steps_both_ways(model, prompts, 8)
    assert isinstance(model.bound_step, CpuDecodeStep), "the bound step ran"
    for (logits_e, cache_e), (logits_b, cache_b) in zip(eager, bound):
        assert torch.equal(logits_e, logits_b)
        assert all(torch.equal(a, b) for a, b in zip(cache_e, cache_b))


def test_bound_step_over_some_rows_of_the_cache_as_serve_runs_it(ckpt, prompts):
    """InternLM.cache_rows: the engine's step over its busy rows only; the bound step looks the cache
    up at every step, so it writes into the rows' views."""
    model = load_model(ckpt, dtype="bfloat16", quantize="int4", group_size=32)
    eager, bound = steps_both_ways(model, prompts, 4, rows=1)
    assert isinstance(model.bound_step, CpuDecodeStep)
    for (logits_e, cache_e), (logits_b, cache_b) in zip(eager, bound):
        assert logits_b.shape[0] == 1 and torch.equal(logits_e, logits_b)
        assert all(torch.equal(a, b) for a, b in zip(cache_e, cache_b))


def test_act_order_layers_are_called_as_modules_in_the_bound_step(ckpt, prompts, tmp_path):
    """GPTQ with desc_act: the permutation of the inputs is the layer's own (its forward)."""
    path, _ = write_published(ckpt, tmp_path / "gptq", "gptq", g_idx="shuffled")
    model = load_model(path, dtype="float32")
    assert model.model.layers[0].mlp.down_proj.format.act_order
    eager, bound = steps_both_ways(model, prompts, 4)
    assert isinstance(model.bound_step, CpuDecodeStep)
    assert all(torch.equal(e[0], b[0]) for e, b in zip(eager, bound))


def test_a_missing_kernel_means_the_eager_step(ckpt, prompts, monkeypatch):
    model = load_model(ckpt, dtype="float32")
    real = cpu_kernels.op_for
    monkeypatch.setattr(cpu_kernels, "op_for", lambda name, *a: None if name == "rope_into_cache" else real(name, *a))
    generate(model, prompts, 3, eos_id=-1)
    assert model.bound_step is False, "nothing bound: the eager step runs"
    monkeypatch.undo()
    generate(model, prompts, 3, eos_id=-1)  # a new request binds again
    assert isinstance(model.bound_step, CpuDecodeStep)


@pytest.mark.parametrize("dtype,quantize", [("float32", "int4"), ("bfloat16", "int8")])
def test_bound_step_equals_the_eager_one_over_two_processes(ckpt, prompts, tmp_path, dtype, quantize):
    """TP=2 (gloo): the row-parallel all-reduces, the bias after them, the LM head's all-gather."""
    ranks = spawn_steps(2, ckpt, prompts, 6, tmp_path, dtype, quantize)
    for r in ranks:
        assert r["bound"] == "CpuDecodeStep"
        assert all(torch.equal(a, b) for a, b in zip(r["eager"], r["bound_logits"]))
    assert torch.equal(ranks[0]["bound_logits"][-1], ranks[1]["bound_logits"][-1]), "every rank the same logits"
