"""task=serve's OpenAI fields, through the official `openai` client against torchrun at TP=1 and TP=2
(one server each, 4 rows): stop strings over several tokens that never leak, streamed or not; an empty
prompt refused while the server goes on; logprobs equal to transformers' log_softmax; n answers from
one prefill, reproducible with a seed; penalties, logit_bias, min_tokens and stop_token_ids as their
definitions say (against next tokens computed by hand); prompt lists and id lists; echo."""
import json
import shutil

import pytest
import torch

from conftest import PROMPTS, read_full_state
from reference import reference_model
from serve_client import Server
from tp.generate import generate, next_token_logits
from tp.load import load_model
from tp.tokenizer import Tokenizer

MODEL = "tiny-nobos"


@pytest.fixture(scope="module")
def nobos_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with a tokenizer that adds no BOS (as SmolLM2's): "" gives no ids."""
    ckpt = shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("nobos") / MODEL)
    settings = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": False}))
    return ckpt


@pytest.fixture(scope="module")
def local(nobos_ckpt):
    """Our model and tokenizer in this process (float32, TP=1: the greedy tokens of every TP size)."""
    return load_model(nobos_ckpt), Tokenizer(nobos_ckpt)


@pytest.fixture(scope="module")
def reference(nobos_ckpt):
    return reference_model(nobos_ckpt, read_full_state(nobos_ckpt))


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def server(request, nobos_ckpt, tmp_path_factory):
    s = Server(nobos_ckpt, request.param, tmp_path_factory.mktemp(f"serve{request.param}") / "run", rows=4)
    yield s
    s.stop()


def solo(local, ids: list[int], n: int) -> list[int]:
    model, _ = local
    return generate(model, [ids], n, model.cfg.stop_ids).tokens[0]


def complete(client, **kwargs):
    kwargs.setdefault("temperature", 0)
    extra = {**kwargs.pop("extra_body", {}), "return_token_ids": True}
    return client.completions.create(model=MODEL, extra_body=extra, **kwargs)


def test_a_stop_string_over_tokens_ends_the_answer_exactly_before_it(server, local):
    _, tok = local
    client = server.client()
    for text in PROMPTS:
        ids = solo(local, tok.encode(text), 30)
        full = tok.decode(ids)
        for k in range(1, len(ids) - 2):
            before, after = tok.decode(ids[:k]), tok.decode(ids[:k + 2])
            stop = after[len(before):]
            if after.startswith(before) and len(stop) >= 2 and full.find(stop) == len(before) \
                    and stop not in tok.decode(ids[:k + 1]):
                break
        else:
            continue
        answer = complete(client, prompt=text, max_tokens=30, stop=[stop])
        streamed = "".join(c.choices[0].text for c in complete(client, prompt=text, max_tokens=30, stop=stop,
                                                                stream=True))
        assert answer.choices[0].text == streamed == full[:len(before)], (stop, full)
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == k + 2
        unchanged = complete(client, prompt=text, max_tokens=30, stop=["\u00a7never\u00a7"])
        assert unchanged.choices[0].text == full and unchanged.choices[0].model_extra["token_ids"] == ids
        return
    raise AssertionError("no answer has a text span over two tokens to stop at")


def test_an_empty_prompt_is_refused_and_the_server_goes_on(server, local):
    import openai
    _, tok = local
    client = server.client()
    assert tok.encode("") == []
    for prompt in ("", [], ["你好", ""]):
        with pytest.raises(openai.BadRequestError, match="empty|non-empty"):
            complete(client, prompt=prompt, max_tokens=3)
    answer = complete(client, prompt="你好", max_tokens=3)
    assert answer.choices[0].model_extra["token_ids"] == solo(local, tok.encode("你好"), 3)


def test_logprobs_equal_log_softmax_of_transformers_logits(server, local, reference):
    _, tok = local
    client = server.client()
    prompt = tok.encode(PROMPTS[0])
    intervals = server.metric("time_per_output_token_seconds_count")
    answer = complete(client, prompt=PROMPTS[0], max_tokens=5, logprobs=3)
    steps = len(answer.choices[0].model_extra["token_ids"]) - 1
    assert server.metric("time_per_output_token_seconds_count") - intervals == steps, "one a step after the first token"
    out = answer.choices[0].model_extra["token_ids"]
    with torch.inference_mode():
        logp = reference(torch.tensor([prompt + out])).logits[0].float().log_softmax(-1)
    got = answer.choices[0].logprobs
    assert len(got.token_logprobs) == len(out) == 5
    for i, token in enumerate(out):
        row = logp[len(prompt) - 1 + i]
        assert abs(got.token_logprobs[i] - float(row[token])) < 1e-4
        assert sorted(got.top_logprobs[i].values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert float(row[token]) >= float(row.max()) - 1e-6, "greedy: the chosen token is the top one"
    # echo with max_tokens 0: the prompt's own log-probabilities (loglikelihood evaluation)
    echo = complete(client, prompt=PROMPTS[0], max_tokens=0, logprobs=1, echo=True).choices[0]
    assert echo.text == PROMPTS[0] and echo.logprobs.token_logprobs[0] is None
    assert len(echo.logprobs.token_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(echo.logprobs.token_logprobs[i] - float(logp[i - 1, prompt[i]])) < 1e-4
    chat_free = server.client().chat.completions  # this checkpoint has no chat template: refused by name
    with pytest.raises(Exception, match="no chat_template"):
        chat_free.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2)


def test_n_answers_from_one_prefill_reproducible_with_a_seed(server, local):
    _, tok = local
    client = server.client()
    prompt = tok.encode(PROMPTS[2])

    def ask():
        before = server.metric("prefill_tokens_computed_total")
        answer = complete(client, prompt=PROMPTS[2], max_tokens=10, n=4, temperature=0.8, seed=11)
        assert server.metric("prefill_tokens_computed_total") - before == len(prompt), "prefilled once"
        assert [c.index for c in answer.choices] == [0, 1, 2, 3]
        return [tuple(c.model_extra["token_ids"]) for c in answer.choices]
    first = ask()
    assert ask() == first and len(set(first)) > 1
    streamed = complete(client, prompt=PROMPTS[2], max_tokens=10, n=4, temperature=0.8, seed=11, stream=True)
    ids = {i: [] for i in range(4)}
    for chunk in streamed:
        for c in chunk.choices:
            ids[c.index] += c.model_extra["token_ids"]
    assert [tuple(ids[i]) for i in range(4)] == first


def test_penalties_and_bias_change_the_greedy_answer_as_defined(server, local):
    model, tok = local
    client = server.client()
    candidates = [p + s for s in ("", "？", "好", "。请回答", "一二三", "A", "B。") for p in PROMPTS]

    def logits(ids):
        return next_token_logits(model, [ids])[0].clone()

    def by_hand(ids, steps, presence=0.0, frequency=0.0, repetition=1.0):
        """Greedy tokens with the penalties applied as OpenAI / transformers define them."""
        out = []
        for _ in range(steps):
            row = logits(ids + out)
            for token in set(out):
                row[token] -= frequency * out.count(token) + presence
            seen = torch.tensor(sorted(set(ids + out)))
            row[seen] = torch.where(row[seen] > 0, row[seen] / repetition, row[seen] * repetition)
            out.append(int(row.argmax()))
        return out

    for fields in ({"frequency_penalty": 2.0}, {"frequency_penalty": -2.0}, {"presence_penalty": 2.0},
                   {"repetition_penalty": 1.3}):
        for text in candidates:  # the first prompt whose answer the rule changes
            ids = tok.encode(text)
            expected = by_hand(ids, 12, **{k.split("_")[0]: v for k, v in fields.items()})
            if expected != solo(local, ids, 12)[:12]:
                break
        else:
            raise AssertionError(f"{fields}: no candidate prompt where the rule changes the answer")
        got = complete(client, prompt=text, max_tokens=12, extra_body=fields)
        assert got.choices[0].model_extra["token_ids"] == expected, fields
    ids = tok.encode(PROMPTS[1])
    plain = solo(local, ids, 6)
    target = int(logits(ids).argsort()[len(plain)])  # a token far from the top
    biased = complete(client, prompt=PROMPTS[1], max_tokens=1, logit_bias={str(target): 100})
    assert biased.choices[0].model_extra["token_ids"] == [target]
    zero = complete(client, prompt=PROMPTS[1], max_tokens=6, presence_penalty=0, frequency_penalty=0, logit_bias={},
                    extra_body={"repetition_penalty": 1.0})
    assert zero.choices[0].model_extra["token_ids"] == plain, "zero values change nothing"
    stop_at = complete(client, prompt=PROMPTS[1], max_tokens=6, extra_body={"stop_token_ids": [plain[2]]})
    assert stop_at.choices[0].model_extra["token_ids"] == plain[:plain.index(plain[2]) + 1]
    assert stop_at.choices[0].finish_reason == "stop"
    late = complete(client, prompt=PROMPTS[1], max_tokens=6, extra_body={"stop_token_ids": [plain[2]], "min_tokens": 4})
    assert plain[2] not in late.choices[0].model_extra["token_ids"][:4]
    free = complete(client, prompt=PROMPTS[1], max_tokens=40, extra_body={"ignore_eos": True})
    assert len(free.choices[0].model_extra["token_ids"]) == 40 and free.choices[0].finish_reason == "length"


def test_prompt_lists_give_a_choice_per_prompt_equal_to_its_solo_answer(server, local):
    _, tok = local
    client = server.client()
    texts = PROMPTS[:3]
    expected = [solo(local, tok.encode(t), 8) for t in texts]
    for prompt in (texts, [tok.encode(t) for t in texts]):
        answer = complete(client, prompt=prompt, max_tokens=8)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert [c.model_extra["token_ids"] for c in answer.choices] == expected
        assert [c.text for c in answer.choices] == [tok.decode(e) for e in expected]
    echoed = complete(client, prompt=[tok.encode(texts[1])], max_tokens=4, echo=True).choices[0]
    assert echoed.text == tok.decode(tok.encode(texts[1])) + tok.decode(expected[1][:4])
