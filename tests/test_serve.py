"""task=serve through torchrun, as a user starts it, driven by the official `openai` client and by raw
HTTP: 32 concurrent requests of different lengths and max_tokens (streamed and not) each get the
answer `generate` gives their prompt alone (task=inference's), at TP=1 and TP=2; chat completions with
the checkpoint's template; errors as the client's own exception types; a client that leaves mid-stream
frees its row; a dead rank ends the server."""
import json
import os
import shutil
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PROMPTS
from serve_client import CHAT_TEMPLATE, Server
from tp.generate import generate
from tp.load import load_model
from tp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chat_ckpt(tiny_ckpt, tmp_path_factory):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("chat") / "tiny-chat")
    settings = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHAT_TEMPLATE}))
    return ckpt


@pytest.fixture(scope="module")
def solo(chat_ckpt):
    """(prompt text, max_tokens) -> (text, ids) as generate gives them alone: task=inference's answer."""
    model, tok = load_model(chat_ckpt), Tokenizer(chat_ckpt)
    cases = [(p + suffix, n) for i, p in enumerate(PROMPTS) for suffix, n in
             (("", 3 + 5 * i), ("？", 40 - 7 * i), ("。请回答", 1 + i), (" 好", 25), ("一二三", 9), ("A", 2 + 11 * i),
              ("B。", 30), ("C，", 6))]
    answers = {}
    for text, n in cases:
        ids = generate(model, [tok.encode(text)], n, model.cfg.stop_ids).tokens[0]
        answers[(text, n)] = (tok.decode(ids), ids)
    return answers


def ask(client, text: str, n: int, stream: bool) -> tuple[str, list[int] | None]:
    if stream:
        chunks = client.completions.create(model="tiny-chat", prompt=text, max_tokens=n, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices), None
    answer = client.completions.create(model="tiny-chat", prompt=text, max_tokens=n, temperature=0,
                                       extra_body={"return_token_ids": True})
    return answer.choices[0].text, answer.choices[0].model_extra["token_ids"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_concurrent_answers_equal_their_solo_answers(ranks, chat_ckpt, solo, tmp_path):
    assert len(solo) == 32
    server = Server(chat_ckpt, ranks, tmp_path / "run")
    try:
        client = server.client()
        assert [m.id for m in client.models.list()] == ["tiny-chat"]
        cases = list(solo)
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda i: ask(client, *cases[i], stream=i % 2 == 1), range(len(cases))))
        for i, ((text, ids), case) in enumerate(zip(got, cases)):
            assert text == solo[case][0], case
            if ids is not None:
                assert ids == solo[case][1], case
        assert server.running() == 0
        # SIGTERM to torchrun (a service manager's stop) while a request runs: it ends, and no rank is left
        body = {"model": "tiny-chat", "prompt": "你好", "max_tokens": 1500, "temperature": 0, "stream": True}
        pids = server.rank_pids()
        assert len(pids) == ranks
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: urllib.request.urlopen(urllib.request.Request(
                server.base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json"}), timeout=60).read().decode())
            while server.running() == 0:
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            streamed = pending.result(60)
        assert '"finish_reason": "abort"' in streamed and streamed.rstrip().endswith("data: [DONE]")
        server.proc.wait(60)
        time.sleep(1)
        assert not [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read()
                    and "(Z" not in open(f"/proc/{p}/stat").read()], "a rank was left behind"
    finally:
        server.stop()


def test_chat_streaming_usage_and_the_clients_error_types(chat_ckpt, tmp_path):
    import openai
    server = Server(chat_ckpt, 1, tmp_path / "run", "task.api_key=secret", "task.max_queue=1", "task.max_seq=64", rows=1)
    try:
        client = server.client(api_key="secret")
        messages = [{"role": "user", "content": "你好"}]
        answer = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0)
        model, tok = load_model(chat_ckpt), Tokenizer(chat_ckpt)
        prompt = tok.encode("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", bos=False)
        expected = generate(model, [prompt], 5, model.cfg.stop_ids).tokens[0]
        assert answer.choices[0].message.content == tok.decode(expected)
        assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == len(expected)
        chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tok.decode(expected)
        assert chunks[-1].usage.completion_tokens == len(expected)
        scored = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=2).choices[0].logprobs.content
        assert len(scored) == len(expected) and all(len(t.top_logprobs) == 2 for t in scored)
        assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob >= t.top_logprobs[1].logprob
                   for t in scored), "greedy: each chosen token is the most likely one"
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="other", prompt="你好", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="context is 64 tokens"):
            client.completions.create(model="tiny-chat", prompt="你好", max_tokens=100)
        with pytest.raises(openai.BadRequestError, match="n must be an integer in"):
            client.completions.create(model="tiny-chat", prompt="你好", max_tokens=2, n=2)  # 1 row
        with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
            client.completions.create(model="tiny-chat", prompt="你好", max_tokens=2, suffix="x")
        request = urllib.request.Request(server.base + "/v1/completions", data=b"{not json", method="POST",
                                         headers={"Authorization": "Bearer secret", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 400 and "not valid JSON" in json.loads(err.value.read())["error"]["message"]

        def long_request(_):
            try:
                client.completions.create(model="tiny-chat", prompt="你好", max_tokens=50, temperature=0)
                return "ok"
            except openai.RateLimitError:
                return "429"
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(long_request, range(6)))
        assert "429" in outcomes and "ok" in outcomes, outcomes
        assert client.completions.create(model="tiny-chat", prompt="你好", max_tokens=2).choices[0].text is not None
    finally:
        server.stop()


def test_a_client_that_leaves_frees_its_row_and_a_dead_rank_ends_the_server(chat_ckpt, tmp_path):
    import http.client
    server = Server(chat_ckpt, 2, tmp_path / "run")
    try:
        body = {"model": "tiny-chat", "prompt": "你好", "max_tokens": 1500, "temperature": 0, "stream": True}
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        assert server.running() == 1
        connection.sock.close()  # the client goes away mid-stream
        connection.close()
        deadline = time.time() + 20
        while server.running() and time.time() < deadline:
            time.sleep(0.2)
        assert server.running() == 0, "the row was not freed"
        assert server.metric("generation_tokens_total") < 1500, "it ran to max_tokens: never aborted"
        text = server.client().completions.create(model="tiny-chat", prompt="你好", max_tokens=3, temperature=0)
        assert text.choices[0].finish_reason in ("stop", "length")
        rank1 = server.rank_pids()[1]
        t0 = time.time()
        os.kill(rank1, signal.SIGKILL)
        assert server.proc.wait(60) != 0
        assert time.time() - t0 < 60
    finally:
        server.stop()
