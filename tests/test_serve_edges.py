"""task=serve at its edges, at TP=1 and TP=2 on a 2-row server: clients that give up (non-streamed, on a client
timeout) free their rows at once; /health stays 200 through a 15 s step (liveness is each rank's
heartbeat, not the step time); a request that fails inside the loop gets a 500 and the server goes on;
500 requests whose clients leave at random points leave nothing running or waiting, and the last
answer equals its solo answer."""
import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PROMPTS
from serve_client import Server
from tp.generate import generate
from tp.load import load_model
from tp.tokenizer import Tokenizer

MODEL = "internlm-tiny"


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def server(request, tiny_ckpt, tmp_path_factory):
    s = Server(tiny_ckpt, request.param, tmp_path_factory.mktemp("edges") / "run", "task.max_seq=4200", rows=2,
               env={"INTERNLM_TP_TEST_HOOKS": "1"})
    yield s
    s.stop()


def wait_idle(server, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while (server.running() or server.metric("num_requests_waiting")) and time.time() < deadline:
        time.sleep(0.1)
    assert server.running() == 0 and server.metric("num_requests_waiting") == 0, "rows or queue left busy"


def test_clients_that_time_out_free_their_rows(server):
    import openai
    slow = server.client(timeout=3)
    generated = server.metric("generation_tokens_total")
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: _timed_out(slow, openai), range(2)))
    assert outcomes == ["timeout", "timeout"]
    t0 = time.time()
    answer = server.client(timeout=30).completions.create(model=MODEL, prompt="你好", max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and time.time() - t0 < 5, "rows freed at once"
    wait_idle(server, 5)
    assert server.metric("generation_tokens_total") - generated < 4000, "a row ran on for a client that had left"


def _timed_out(client, openai) -> str:
    try:
        client.completions.create(model=MODEL, prompt="你好", max_tokens=4000, temperature=0, extra_body={"ignore_eos": True})
        return "answered"
    except openai.APITimeoutError:
        return "timeout"


def test_health_stays_up_through_a_15_s_step_and_a_failing_request_gets_500(server):
    import openai
    client = server.client(timeout=60)
    done = {}
    worker = threading.Thread(target=lambda: done.update(answer=client.completions.create(
        model=MODEL, prompt="你好", max_tokens=2, temperature=0, extra_body={"test_hook": {"sleep_s": 15}})))
    t0 = time.time()
    worker.start()
    codes = []
    while worker.is_alive() and time.time() - t0 < 30:
        codes.append(server.health())
        time.sleep(0.5)
    worker.join()
    assert time.time() - t0 >= 15 and "answer" in done, "the step took its 15 s and answered"
    assert len(codes) >= 20 and set(codes) == {200}, codes
    with pytest.raises(openai.InternalServerError, match="prefill fails"):
        client.completions.create(model=MODEL, prompt="你好", max_tokens=3, extra_body={"test_hook": {"fail": True}})
    streamed = _raw(server, {"model": MODEL, "prompt": "你好", "max_tokens": 3, "stream": True,
                             "test_hook": {"fail": True}})
    assert '"error"' in streamed and "prefill fails" in streamed and streamed.rstrip().endswith("data: [DONE]")
    assert client.completions.create(model=MODEL, prompt="你好", max_tokens=3).choices[0].finish_reason
    assert server.health() == 200


def _aborted(server) -> float:
    try:
        return server.metric('request_success_total{finished_reason="abort"}')
    except StopIteration:  # none yet
        return 0.0


def _raw(server, body: dict) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    text = connection.getresponse().read().decode()
    connection.close()
    return text


def test_500_abandoned_requests_leave_nothing_behind(server, tiny_ckpt):
    rng = random.Random(0)
    plans = [(rng.random() < 0.5, rng.uniform(0.0, 0.3), rng.choice(PROMPTS), rng.randint(1, 200)) for _ in range(500)]

    def leave(plan) -> None:
        stream, after_s, prompt, max_tokens = plan
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]),
                "stream": stream}
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            connection.sock.settimeout(after_s)
            if stream:
                response = connection.getresponse()
                response.readline()
            else:
                connection.getresponse().read()
        except OSError:
            pass  # timed out: the client leaves here
        finally:
            connection.close()
    aborted = _aborted(server)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(leave, plans))
    wait_idle(server, 30)
    assert _aborted(server) - aborted >= 100, "the clients left before their answers ended"
    assert server.health() == 200
    model, tok = load_model(tiny_ckpt), Tokenizer(tiny_ckpt)
    expected = generate(model, [tok.encode(PROMPTS[0])], 20, model.cfg.stop_ids).tokens[0]
    last = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                              extra_body={"return_token_ids": True})
    assert last.choices[0].model_extra["token_ids"] == expected
