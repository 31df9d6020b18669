"""The static decode step (tp.model.DecodeStep, InternLM.decode): rows at different points of their own
sequences in one batch, each getting exactly the tokens it gets alone; nothing read back to the host
inside a step; every static input and cache tensor kept at its address from step to step. (That the
step gives today's tokens at TP=1, 2, 3, every layout, prefix reuse and int8 is what the rest of the
suite checks through `generate`, which decodes with it.)"""
import pytest
import torch

from conftest import PROMPTS
from tp.generate import admit, generate
from tp.load import load_model
from tp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_and_prompts(tiny_ckpt):
    tok = Tokenizer(tiny_ckpt)
    return load_model(tiny_ckpt), [tok.encode(p) for p in PROMPTS[:2]]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits[..., -1, :].argmax(-1) if logits.dim() == 3 else logits.argmax(-1)


@pytest.mark.parametrize("dtype,path", [("float32", "cpu kernels"), ("bfloat16", "cpu kernels"),
                                        ("float32", "accelerator ops")])
def test_rows_at_different_positions_get_the_tokens_they_get_alone(tiny_ckpt, dtype, path, monkeypatch):
    """Row 0 is admitted and decodes 35 steps alone; then row 1 is admitted beside it: from there one
    row is ~40 tokens into its answer, the other 0-5, in the same steps. "accelerator ops": the step as
    it runs off the CPU's kernels (keys and values written by index, SDPA over the whole cache under
    the validity mask), here on the CPU."""
    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt, dtype=dtype)
    if path == "accelerator ops":
        import tp.model
        real = tp.model.cpu_kernels.op_for
        monkeypatch.setattr(tp.model.cpu_kernels, "op_for",
                            lambda name, *a: None if name == "rope_into_cache" else real(name, *a))
        for attention in model.attentions():
            attention.decode_path = "sdpa"
    first, second = tok.encode(PROMPTS[0]), tok.encode(PROMPTS[2])
    alone = [generate(model, [p], n, eos_id=-1).tokens[0] for p, n in ((first, 46), (second, 11))]
    model.setup_cache(2, len(first) + 64)
    state, got = model.step, [[], []]

    def start(row, ids):
        token = greedy(admit(model, row, ids))
        state.tokens[row] = token
        got[row].append(int(token))

    start(0, first)
    for _ in range(35):  # row 1 idle: not admitted yet, it decodes garbage in its own row only
        state.tokens.copy_(greedy(model.decode(state)))
        got[0].append(int(state.tokens[0]))
    start(1, second)
    assert int(state.positions[0]) - int(state.positions[1]) == len(first) + 35 - len(second)
    for _ in range(10):
        state.tokens.copy_(greedy(model.decode(state)))
        for row in (0, 1):
            got[row].append(int(state.tokens[row]))
    assert got[0] == alone[0] and got[1] == alone[1]


def test_a_step_reads_nothing_back_and_keeps_every_tensor_in_place(model_and_prompts, monkeypatch):
    model, prompts = model_and_prompts
    model.setup_cache(2, 64)  # room past what generate needs, for the steps below
    generate(model, prompts, 4, eos_id=-1)  # a left-padded batch, its step set up
    state = model.step
    caches = [t for a in model.attentions() for t in (a.cache.k, a.cache.v)]
    tables = (model.rope_cos, model.rope_sin)
    addresses = [t.data_ptr() for t in (*state.tensors(), *caches, *tables)]

    def host_read(*args, **kwargs):
        raise AssertionError("the decode step read a tensor back to the host")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    before = state.positions.clone()
    with torch.inference_mode():  # generate's tensors are inference tensors
        for _ in range(3):
            state.tokens.copy_(greedy(model.decode(state)))
    monkeypatch.undo()
    assert [t.data_ptr() for t in (*state.tensors(), *caches, *tables)] == addresses
    assert torch.equal(state.positions, before + 3) and torch.equal(state.lengths, state.slots)


def test_the_guard_above_does_fail_on_a_host_read(model_and_prompts, monkeypatch):
    """The monkeypatched reads do reach a read inside the step's code (tp.model), so the test above
    could fail."""
    model, prompts = model_and_prompts
    generate(model, prompts, 2, eos_id=-1)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (_ for _ in ()).throw(AssertionError("read")))
    real = model.model.embed_tokens.forward
    monkeypatch.setattr(model.model.embed_tokens, "forward", lambda ids: (ids.max().item(), real(ids))[1])
    with pytest.raises(AssertionError, match="read"):
        model.decode(model.step)


def test_admit_refuses_a_prompt_the_cache_cannot_hold(model_and_prompts):
    model, _ = model_and_prompts
    model.setup_cache(2, 8)
    n = model.max_seq
    with pytest.raises(ValueError, match=f"a prompt of {n} tokens does not fit a cache of {n} slots"):
        admit(model, 0, [1] * n)
