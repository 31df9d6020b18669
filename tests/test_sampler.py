"""The batched sampler (tp/sampler.py), the stop-string hold-back (launch/detokenize.py) and the engine's
request groups and failures: draws follow the filtered softmax (a chi-square bound over many draws),
penalties and bias as their definitions say, n answers to one prompt prefilled once, a request whose
prefill fails ending alone."""
import math

import pytest
import torch

from conftest import PROMPTS
from launch.detokenize import TextStream, held_back
from tp.engine import Engine, Request
from tp.generate import generate
from tp.load import load_model
from tp.sampler import Sampler, Sampling, sample
from tp.tokenizer import Tokenizer

# chi-square critical value at p = 0.001 for up to 9 degrees of freedom (a correct sampler fails ~1 in 1000)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


def filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """The distribution a draw must follow, by the definitions, one token at a time."""
    p = (logits / temperature).softmax(-1)
    order = p.argsort(descending=True).tolist()
    kept, total = [], 0.0
    for rank, token in enumerate(order):
        if (top_k and rank >= top_k) or total > top_p:
            break
        kept.append(token)
        total += float(p[token])
    out = torch.zeros_like(p)
    out[kept] = p[kept]
    return out / out.sum()


def test_draws_follow_the_filtered_distribution_for_every_row_of_one_call():
    torch.manual_seed(0)
    logits = torch.randn(4, 10) * 1.5
    settings = [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 4), (0.9, 0.6, 5)]
    draws = 20000
    rows = logits.repeat(draws, 1)
    column = lambda i, dtype: torch.tensor([s[i] for s in settings] * draws, dtype=dtype)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    tokens = sample(rows, column(0, torch.float32), column(1, torch.float32), column(2, torch.long),
                    lambda at: torch.rand(at.numel(), generator=g)).view(draws, 4)
    for r, (t, p, k) in enumerate(settings):
        expected = filtered(logits[r], t, p, k) * draws
        seen = torch.bincount(tokens[:, r], minlength=10).double()
        assert bool((seen[expected == 0] == 0).all()), f"row {r}: a filtered-out token was drawn"
        support = expected > 0
        chi2 = float(((seen[support] - expected[support]) ** 2 / expected[support]).sum())
        assert chi2 < CHI2_999[int(support.sum()) - 1], (r, chi2, seen.tolist(), expected.tolist())


class Req:
    def __init__(self, sampling, prompt=(1,), output=(), min_tokens=0, stop_ids=(), logprobs=None):
        self.sampling, self.prompt, self.output = sampling, list(prompt), list(output)
        self.min_tokens, self.stop_ids, self.logprobs, self.finish, self.seed = min_tokens, stop_ids, logprobs, None, 0


def test_penalties_bias_and_min_tokens_as_defined():
    logits = torch.tensor([[2.0, 1.5, -0.5, 1.9, 0.0, 1.0]])
    cases = [  # (sampling, prompt, generated so far, expected greedy token, by hand)
        (Sampling(frequency_penalty=0.3), [5], [0, 0], 3),  # 2 - 0.6 = 1.4 < 1.9
        (Sampling(presence_penalty=0.2), [5], [0, 0], 3),   # 2 - 0.2 = 1.8 < 1.9
        (Sampling(presence_penalty=0.05), [5], [0, 0], 0),  # 1.95 > 1.9
        (Sampling(repetition_penalty=1.5), [0, 3], [], 1),  # 2/1.5, 1.9/1.5 < 1.5
        (Sampling(repetition_penalty=1.5), [2], [], 0),     # a negative logit: -0.75, the top unchanged
        (Sampling(logit_bias=((4, 2.5),)), [5], [], 4),
        (Sampling(), [5], [], 0),
    ]
    for sampling, prompt, done, expected in cases:
        sampler = Sampler(1, 6, "cpu")
        request = Req(sampling, prompt)
        sampler.admit(0, request)
        for token in done:  # the counts the tokens generated so far left
            sampler.choose(torch.nn.functional.one_hot(torch.tensor([token]), 6).float() * 50, [request], [0])
            request.output.append(token)
        tokens, _ = sampler.choose(logits, [request], [0])
        assert int(tokens[0]) == expected, sampling
    request = Req(Sampling(), min_tokens=2, stop_ids=(0, 3))
    sampler = Sampler(1, 6, "cpu")
    sampler.admit(0, request)
    assert int(sampler.choose(logits, [request], [0])[0][0]) == 1, "stop ids masked below min_tokens"
    request.output = [1, 1]
    assert int(sampler.choose(logits, [request], [0])[0][0]) == 0


def test_logprobs_come_from_the_raw_logits():
    logits = torch.tensor([[2.0, 1.5, -0.5, 1.9]])
    request = Req(Sampling(logit_bias=((2, 10.0),)), logprobs=2)
    sampler = Sampler(1, 4, "cpu")
    sampler.admit(0, request)
    tokens, found = sampler.choose(logits, [request], [0])
    logp = logits.log_softmax(-1)[0]
    assert int(tokens[0]) == 2 and math.isclose(found[0].logprob, float(logp[2]), abs_tol=1e-6)
    assert [t for t, _ in found[0].top] == [0, 3]


class CharTokenizer:
    """Token i is the i-th character of a fixed alphabet (a multi-token stop string is easy to spell)."""
    alphabet = "abcdefgh<|>E "

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def test_a_stop_string_over_several_tokens_never_leaks():
    tok = CharTokenizer()
    ids = [tok.alphabet.index(c) for c in "ab<|ab<|E>cd"]
    stream, sent = TextStream(tok, ("<|E>",)), []
    for i in ids:
        delta, finish = stream.add([i], None)
        sent.append(delta)
        if finish:
            break
    assert "".join(sent) == "ab<|ab" and finish == "stop_string" and stream.kept == 10
    assert sent == ["a", "b", "", "", "<|a", "b", "", "", "", ""], "a possible start held back, then let go"
    assert held_back("xx<|", ("<|E>",)) == 2 and held_back("xx<", ("<|E>", "<")) == 1
    whole = TextStream(tok, ("<|E>",))
    assert whole.add(ids, None) == ("ab<|ab", "stop_string"), "all the tokens at once: the same text"
    never = TextStream(tok, ("zz",))
    assert never.add(ids, "length") == ("ab<|ab<|E>cd", "length")


def test_n_answers_share_one_prefill_and_a_failing_prefill_ends_only_its_request(tiny_ckpt):
    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt)
    prompt = tok.encode(PROMPTS[0])
    solo = generate(model, [prompt], 12, -1).tokens[0]
    engine = Engine(model, max_batch=4, max_seq=96)  # after generate: the engine's cache is its own

    def answers(seed: int) -> list[list[int]]:
        group = [Request(f"s{seed}-{i}", prompt, 12, sampling=Sampling(temperature=0.8), seed=seed + i,
                         group=None if i == 0 else f"s{seed}-0") for i in range(3)]
        before = engine.prefilled_tokens
        engine.submit(group)
        while engine.has_work():
            engine.step(engine.plan())
        assert engine.prefilled_tokens - before == len(prompt), "the prompt prefilled once for its 3 answers"
        return [r.output for r in group]
    first = answers(5)
    assert answers(5) == first and len({tuple(a) for a in first}) > 1
    greedy = [Request("g0", prompt, 12), Request("g1", prompt, 12, group="g0")]
    engine.submit(greedy)
    while engine.has_work():
        engine.step(engine.plan())
    assert greedy[0].output == greedy[1].output == solo, "a copied cache row decodes as its own prefill"

    engine.before_admit = lambda r: (_ for _ in ()).throw(RuntimeError("boom")) if r.id == "bad" else None
    bad, good = Request("bad", prompt, 5), Request("good", prompt, 5)
    engine.submit(bad)
    engine.submit(good)
    while engine.has_work():
        engine.step(engine.plan())
    assert bad.finish == "error" and "boom" in bad.error and bad.output == []
    assert good.output == solo[:5] and engine.rows == [None] * 4
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        engine.submit(Request("zero", prompt, 0))


@pytest.mark.parametrize("tries", [32, 0], ids=["rejection", "whole-sort"])
def test_a_large_vocabulary_draws_by_window_top_k_and_rejection_as_the_filtered_distribution(tries, monkeypatch):
    """V = 3000: a peaked top-p row (drawn from the window), a flat top-p row (the window holds too
    little: rejection from the whole softmax, or with no tries left a whole sort), a top-k row, an
    unfiltered one, in one call; the draws against the exact filtered distribution, binned into 8 bins
    of equal mass (chi-square, 7 dof)."""
    from tp import sampler
    monkeypatch.setattr(sampler, "MAX_TRIES", tries)
    torch.manual_seed(0)
    vocab, draws, bins = 3000, 2000, 8
    peaked, flat = torch.randn(vocab) * 4, torch.randn(vocab) * 0.1
    logits = torch.stack([peaked, flat, flat, flat])
    settings = [(1.0, 0.9, 0), (1.0, 0.9, 0), (0.8, 0.95, 50), (1.2, 1.0, 0)]
    column = lambda i, dtype: torch.tensor([s[i] for s in settings] * draws, dtype=dtype)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    tokens = sample(logits.repeat(draws, 1), column(0, torch.float32), column(1, torch.float32), column(2, torch.long),
                    lambda at: torch.rand(at.numel(), generator=g)).view(draws, 4)
    for r, (t, p, k) in enumerate(settings):
        q = filtered(logits[r], t, p, k)
        assert bool((q[tokens[:, r]] > 0).all()), f"row {r}: a filtered-out token was drawn"
        order = q.argsort(descending=True)
        edges = (q[order].cumsum(0) * bins / q.sum()).clamp(max=bins - 1e-6).floor().long()  # bin of each token
        bin_of = torch.empty(vocab, dtype=torch.long)
        bin_of[order] = edges
        expected = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_of, q.double()) * draws
        seen = torch.bincount(bin_of[tokens[:, r]], minlength=bins).double()
        used = expected > 0
        chi2 = float(((seen[used] - expected[used]) ** 2 / expected[used]).sum())
        assert chi2 < CHI2_999[int(used.sum()) - 1], (r, chi2, seen.tolist(), expected.tolist())
    assert len(set(tokens[:, 1].tolist())) > 500, "the flat row drew from thousands of tokens"
