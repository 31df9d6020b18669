"""task=serve's HTTP side: FastAPI endpoints over rank 0's Scheduler (launch/serve.py).

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint's `chat_template`,
launch/chat.py), `stream: true` as server-sent events ending `data: [DONE]`, GET /health, GET /metrics
(Prometheus). Errors as OpenAI clients expect them: {"error": {"message", "type", "param", "code"}}
with 400, 401, 404, 429, 500. A client that goes away, streamed or not, aborts its requests at the
next step: every handler looks at its connection at least every POLL_S while it waits.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from launch.detokenize import TextStream
from launch.openai_api import ApiError, Call, chat_logprobs, completion_logprobs, parse

POLL_S = 0.25


class Frontend:
    """What the HTTP handlers share: the scheduler, the tokenizer and the checks of a request."""

    def __init__(self, scheduler, tokenizer, chat, model_name: str, max_seq: int, stop_ids: tuple[int, ...],
                 api_key: str | None, test_hooks: bool = False):
        self.scheduler, self.tok, self.chat, self.model_name = scheduler, tokenizer, chat, model_name
        self.max_seq, self.stop_ids, self.api_key, self.test_hooks = max_seq, stop_ids, api_key, test_hooks

    def check_key(self, authorization: str | None) -> None:
        if self.api_key and authorization != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    def call(self, body, chat: bool) -> Call:
        hook = body.pop("test_hook", None) if self.test_hooks and isinstance(body, dict) else None
        engine = self.scheduler.engine
        call = parse(body, chat, self.tok, self.chat, self.model_name, self.max_seq, len(engine.rows),
                     engine.model.cfg.vocab_size, self.stop_ids, engine.check)
        for request in call.requests:
            request.extra["test_hook"] = hook
        return call


class Answer:
    """One choice of a response as it builds up."""

    def __init__(self, tok, request):
        self.request, self.text = request, TextStream(tok, request.stop_strings, request.min_tokens)
        self.finish: str | None = None
        self.started = False  # its first chunk went out (echo rides on it)


def build_app(front: Frontend) -> FastAPI:
    from launch.serve import Stream
    app = FastAPI()
    scheduler, tok = front.scheduler, front.tok

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err):
        return JSONResponse(ApiError(400, f"malformed request: {err.errors()[:1]}").body(), status_code=400)

    @app.get("/health")
    async def health():
        ok = scheduler.heartbeat.healthy() and not scheduler.stopping.is_set()
        return PlainTextResponse("ok" if ok else "unavailable", status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(scheduler.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        front.check_key(http.headers.get("authorization"))
        return {"object": "list", "data": [{"id": front.model_name, "object": "model", "created": 0,
                                            "owned_by": "internlm-tp"}]}

    async def complete(http: HttpRequest, chat: bool):
        front.check_key(http.headers.get("authorization"))
        try:
            body = json.loads(await http.body())
        except ValueError as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from err
        call = front.call(body, chat)
        events: asyncio.Queue = asyncio.Queue()
        loop, index = asyncio.get_running_loop(), {r.id: i for i, r in enumerate(call.requests)}
        scheduler.submit([[Stream(r, loop, events, index[r.id]) for r in group] for group in call.groups])
        answers = [Answer(tok, r) for r in call.requests]
        created = int(time.time())
        name, kind = (f"chatcmpl-{call.id}", "chat.completion") if chat else (f"cmpl-{call.id}", "text_completion")

        def head(chunk: bool) -> dict:
            """What every response object (or streamed chunk) of this request starts with."""
            return {"id": name, "object": f"{kind}.chunk" if chunk and chat else kind, "created": created,
                    "model": front.model_name}

        async def updates():
            """(choice, text delta, finish, ids kept this time) as tokens arrive; aborts what is left
            open when it ends early (the client left, a failure)."""
            open_, checked = set(range(len(answers))), time.monotonic()
            try:
                while open_:
                    try:
                        i, tokens, finish = await asyncio.wait_for(events.get(), POLL_S)
                    except asyncio.TimeoutError:
                        i = None
                    if time.monotonic() - checked >= POLL_S or i is None:
                        checked = time.monotonic()
                        if await http.is_disconnected():
                            return
                    if i is None or i not in open_:
                        continue  # a stop string ended it already: what the engine still sent is dropped
                    answer = answers[i]
                    if finish == "error":
                        raise ApiError(500, f"the request failed: {answer.request.error}", "server_error")
                    before = answer.text.kept
                    text, finish = answer.text.add(tokens, finish)
                    if finish == "stop_string":
                        scheduler.abort(answer.request.id)
                        finish = "stop"
                    if finish is not None:
                        answer.finish = finish
                        open_.discard(i)
                    yield i, text, finish, before
            finally:
                for i in open_:
                    scheduler.abort(call.requests[i].id)

        def logprobs_for(answer: Answer, start: int, stop: int, offset: int, with_prompt: bool):
            request = answer.request
            if call.logprobs is None:
                return None
            ids, values = request.output[start:stop], request.output_logprobs[start:stop]
            if chat:
                return chat_logprobs(tok, ids, values)
            if with_prompt and request.prompt_logprobs is not None:
                ids, values = request.prompt + ids, [None] + request.prompt_logprob_values + values
            return completion_logprobs(tok, ids, values, offset)

        def usage() -> dict:
            prompt = sum(len(group[0].prompt) for group in call.groups)
            done = sum(a.text.kept for a in answers)
            return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

        if call.stream:
            async def sse():
                async with contextlib.aclosing(updates()) as stream:
                    try:
                        async for i, text, finish, before in stream:
                            answer = answers[i]
                            ids = answer.request.output[before:answer.text.kept]
                            prompt_text = call.echoed(i)
                            echo = "" if answer.started else prompt_text
                            if not (text or finish or echo or ids and (call.return_token_ids or call.logprobs is not None)):
                                continue
                            # text_offset of this chunk's first token in the whole answer (echo: the prompt's first)
                            offset = 0 if echo else len(prompt_text) + len(answer.text.sent) - len(text)
                            choice = ({"index": i, "delta": {"role": "assistant", "content": text} if text or not finish
                                       else {}, "finish_reason": finish} if chat
                                      else {"index": i, "text": echo + text, "finish_reason": finish})
                            choice["logprobs"] = logprobs_for(answer, before, answer.text.kept, offset, bool(echo))
                            if call.return_token_ids:
                                choice["token_ids"] = ids
                            answer.started = True
                            data = {**head(chunk=True), "choices": [choice]}
                            yield f"data: {json.dumps(data)}\n\n"
                    except ApiError as err:  # the status line went out with the first chunk: the error as an event
                        yield f"data: {json.dumps(err.body())}\n\n"
                if call.usage_in_stream:
                    data = {**head(chunk=True), "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        async with contextlib.aclosing(updates()) as stream:
            async for _ in stream:
                pass
        if any(a.finish is None for a in answers):  # the client left: nobody reads this
            return Response(status_code=499)
        choices = []
        for i, answer in enumerate(answers):
            text, kept = answer.text.sent, answer.text.kept
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text},
                          "logprobs": logprobs_for(answer, 0, kept, 0, False), "finish_reason": answer.finish}
            else:
                echo = call.echoed(i)
                choice = {"index": i, "text": echo + text, "logprobs": logprobs_for(answer, 0, kept, 0, call.echo),
                          "finish_reason": answer.finish}
            if call.return_token_ids:
                choice["token_ids"] = answer.request.output[:kept]
            choices.append(choice)
        return {**head(chunk=False), "choices": choices, "usage": usage()}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, chat=True)

    return app
