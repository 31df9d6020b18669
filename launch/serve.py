"""task=serve: an OpenAI-compatible HTTP server on rank 0, continuous batching over every rank.

Rank 0 runs the HTTP side (FastAPI on uvicorn, in a thread of its own) and the scheduler (this
process's main thread): each loop it takes what the handlers queued (new requests, aborts), plans a
step (tp/engine.py), broadcasts the plan, runs it like every other rank, and hands each request its
new tokens. Other ranks hold no socket: they run the plans they receive. When nothing runs, rank 0
still sends an empty plan every HEARTBEAT_S, so the other ranks' broadcast never times out.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint's
`chat_template`, launch/chat.py), `stream: true` as server-sent events ending `data: [DONE]`,
GET /health, GET /metrics (Prometheus text). Errors as OpenAI clients expect them:
{"error": {"message", "type", "param", "code"}} with 400, 401, 404, 429. A client that goes away
aborts its request at the next step boundary.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from omegaconf import DictConfig

from launch.chat import ChatTemplate
from launch.session import Session, UserError
from tp.engine import Engine, Plan, Request, run_plan
from tp.generate import Sampling
from tp.partition import model_files_dir

log = logging.getLogger("internlm_tp")
HEARTBEAT_S = 1.0
GRACEFUL_S = 5  # seconds the HTTP side has, once stopping, to finish the responses under way
SUPPORTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "seed", "stop", "n", "stream", "stream_options", "user", "return_token_ids"}  # the last as vLLM's
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Stream:
    """One request's side of the server: what the scheduler has produced for it so far."""
    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    sent: int = 0


class Histogram:
    def __init__(self, name: str, doc: str):
        self.name, self.doc, self.counts, self.total, self.n = name, doc, [0] * len(LATENCY_BUCKETS), 0.0, 0

    def observe(self, seconds: float) -> None:
        self.n, self.total = self.n + 1, self.total + seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(LATENCY_BUCKETS, self.counts)]
        return out + [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total}",
                      f"{self.name}_count {self.n}"]


class Scheduler:
    """Rank 0's loop; the handlers talk to it through `incoming` (thread-safe) and their Streams."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.incoming: queue.Queue = queue.Queue()
        self.streams: dict[str, Stream] = {}
        self.lock = threading.Lock()
        self.alive_at = time.monotonic()
        self.stopping = threading.Event()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0}
        self.hist = {"ttft": Histogram("internlm_tp_time_to_first_token_seconds", "Time to first token."),
                     "tpot": Histogram("internlm_tp_time_per_output_token_seconds", "Time per output token."),
                     "e2e": Histogram("internlm_tp_e2e_request_latency_seconds", "End-to-end request latency.")}

    def submit(self, stream: Stream) -> None:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", "server_error")
        with self.lock:
            waiting = sum(1 for s in self.streams.values() if not s.request.output)
            if waiting >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                               "rate_limit_error")
            self.streams[stream.request.id] = stream
        self.incoming.put(("submit", stream.request))

    def abort(self, request_id: str) -> None:
        self.incoming.put(("abort", request_id))

    def _drain(self, block: bool) -> None:
        try:
            item = self.incoming.get(timeout=HEARTBEAT_S) if block else self.incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "submit":
                self.engine.submit(value)
            else:
                self.engine.abort(value)
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return

    def loop(self) -> None:
        engine = self.engine
        while not self.stopping.is_set():
            self.alive_at = time.monotonic()
            self._drain(block=not engine.has_work())
            plan = engine.plan()
            for request in [r for r in self._requests() if r.finish == "abort" and not r.output]:
                self._publish(request)  # aborted while waiting
            touched = run_plan(engine, plan)
            for request in touched:
                self._publish(request)
        self._drain(block=False)
        for request in [r for r in engine.rows if r is not None] + list(engine.waiting):
            engine.abort(request.id)
        plan = engine.plan()  # what runs or waits ends as aborted, and its clients are told
        for request in run_plan(engine, plan) + [r for r in self._requests() if r.finish == "abort"]:
            self._publish(request)
        run_plan(engine, Plan(stop=True))

    def _requests(self) -> list[Request]:
        with self.lock:
            return [s.request for s in self.streams.values()]

    def _publish(self, request: Request) -> None:
        with self.lock:
            stream = self.streams.get(request.id)
            if stream is None:
                return
            if request.finish is not None:
                del self.streams[request.id]
        now = time.perf_counter()
        new = request.output[stream.sent:]
        if new and stream.first_token is None:
            stream.first_token = now
            self.hist["ttft"].observe(now - stream.submitted)
        stream.sent += len(new)
        self.counters["generation_tokens"] += len(new)
        if request.finish is not None:
            self.counters["prompt_tokens"] += len(request.prompt)
            self.hist["e2e"].observe(now - stream.submitted)
            if stream.first_token is not None and len(request.output) > 1:
                self.hist["tpot"].observe((now - stream.first_token) / (len(request.output) - 1))
            ttft = "-" if stream.first_token is None else f"{(stream.first_token - stream.submitted) * 1e3:.0f} ms"
            log.info("request %s: %d prompt tokens, %d generated, %s; first token %s, total %.0f ms", request.id,
                     len(request.prompt), len(request.output), request.finish, ttft, (now - stream.submitted) * 1e3)
        stream.loop.call_soon_threadsafe(stream.events.put_nowait, (list(new), request.finish))

    def metrics(self) -> str:
        engine = self.engine
        running = sum(1 for r in engine.rows if r is not None)
        lines = ["# HELP internlm_tp_num_requests_running Requests in a row of the batch.",
                 "# TYPE internlm_tp_num_requests_running gauge", f"internlm_tp_num_requests_running {running}",
                 "# HELP internlm_tp_num_requests_waiting Requests waiting for a row.",
                 "# TYPE internlm_tp_num_requests_waiting gauge",
                 f"internlm_tp_num_requests_waiting {len(engine.waiting) + self.incoming.qsize()}"]
        for key, doc in (("prompt_tokens", "Prompt tokens of finished requests."),
                         ("generation_tokens", "Generated tokens.")):
            lines += [f"# HELP internlm_tp_{key}_total {doc}", f"# TYPE internlm_tp_{key}_total counter",
                      f"internlm_tp_{key}_total {self.counters[key]}"]
        for h in self.hist.values():
            lines += h.lines()
        return "\n".join(lines) + "\n"


def _int(body: dict, key: str, default, low: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApiError(400, f"{key} must be an integer >= {low}, got {value!r}", param=key)
    return value


def _float(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number in [{low}, {high}], got {value!r}", param=key)
    return float(value)


class Frontend:
    """What the HTTP handlers do: check a request, turn it into prompt ids, wait for its tokens."""

    def __init__(self, scheduler: Scheduler, tokenizer, chat: ChatTemplate | None, model_name: str, max_seq: int,
                 stop_ids: tuple[int, ...], api_key: str | None):
        self.scheduler, self.tok, self.chat, self.model_name = scheduler, tokenizer, chat, model_name
        self.max_seq, self.stop_ids, self.api_key = max_seq, stop_ids, api_key

    def check_key(self, authorization: str | None) -> None:
        if self.api_key and authorization != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    def request(self, body, chat: bool) -> tuple[Request, bool, bool]:
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - SUPPORTED)
        if unknown:
            raise ApiError(400, f"{unknown[0]} is not supported", param=unknown[0])
        if body.get("model") != self.model_name:
            raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server serves "
                                f"{self.model_name!r}", code="model_not_found", param="model")
        if _int(body, "n", 1, 1) != 1:
            raise ApiError(400, "n must be 1", param="n")
        if chat:
            ids = self._chat_ids(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string", param="prompt")
            ids = self.tok.encode(prompt)
        limit = _int(body, "max_completion_tokens", None, 1) if chat else None
        limit = limit or _int(body, "max_tokens", None, 1)
        max_tokens = limit or max(1, self.max_seq - len(ids))
        if len(ids) + max_tokens > self.max_seq:
            raise ApiError(400, f"this model's context is {self.max_seq} tokens; the prompt has {len(ids)} and "
                                f"max_tokens asks for {max_tokens} ({len(ids) + max_tokens} in all)",
                           param="max_tokens", code="context_length_exceeded")
        temperature = _float(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default: sampled
        temperature = 0.0 if temperature < 1e-5 else temperature  # as vLLM: below it, greedy (no inf logits)
        sampling = Sampling(temperature, _float(body, "top_p", 1.0, 0.0, 1.0), _int(body, "top_k", 0, 0) or 0)
        seed = _int(body, "seed", None, 0)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        options = body.get("stream_options") or {}
        request = Request(uuid.uuid4().hex[:16], ids, max_tokens, self.stop_ids, sampling,
                          seed if seed is not None else random.randrange(2 ** 31))
        request.stop_strings = stops  # read by the handler only
        request.return_token_ids = bool(body.get("return_token_ids"))
        return request, bool(body.get("stream")), bool(isinstance(options, dict) and options.get("include_usage"))

    def _chat_ids(self, messages) -> list[int]:
        if self.chat is None:
            raise ApiError(400, "this checkpoint has no chat_template (tokenizer_config.json): use /v1/completions")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} strings", param="messages")
        return self.tok.encode(self.chat.render(messages), bos=False)


def build_app(front: Frontend) -> FastAPI:
    app = FastAPI()
    scheduler = front.scheduler

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err):
        return JSONResponse(ApiError(400, f"malformed request: {err.errors()[:1]}").body(), status_code=400)

    @app.get("/health")
    async def health():
        ok = time.monotonic() - scheduler.alive_at < 10 * HEARTBEAT_S and not scheduler.stopping.is_set()
        return PlainTextResponse("ok" if ok else "unavailable", status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics(), media_type="text/plain; version=0.0.4")

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
        request, stream, usage = front.request(body, chat)
        state = Stream(request, asyncio.get_running_loop(), asyncio.Queue())
        scheduler.submit(state)
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
        pieces = Pieces(front.tok, request)

        def chunk(text: str, finish: str | None, final: bool = False) -> dict:
            choice = ({"index": 0, "delta": {"role": "assistant", "content": text} if text or not final else {},
                       "finish_reason": finish} if chat else {"index": 0, "text": text, "finish_reason": finish})
            return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.id}", "object": f"{kind}.chunk" if chat else kind,
                    "created": created, "model": front.model_name, "choices": [choice]}

        def usage_of() -> dict:
            n = len(request.output[:pieces.kept])
            return {"prompt_tokens": len(request.prompt), "completion_tokens": n,
                    "total_tokens": len(request.prompt) + n}

        async def events():
            try:
                while True:
                    tokens, finish = await state.events.get()
                    before = pieces.kept
                    text, finish = pieces.add(tokens, finish)
                    if finish == "stop_string":
                        scheduler.abort(request.id)
                        finish = "stop"
                    yield text, finish, request.output[before:pieces.kept]
                    if finish is not None:
                        return
            finally:
                if request.finish is None and not pieces.done:
                    scheduler.abort(request.id)  # the client left, or a stop string ended it

        if stream:
            async def sse():
                async for text, finish, ids in events():
                    if await http.is_disconnected():
                        scheduler.abort(request.id)
                        return
                    if request.return_token_ids:  # a chunk for every step's tokens, text or not (as vLLM)
                        data = chunk(text, _reason(finish), finish is not None)
                        data["choices"][0]["token_ids"] = ids
                        yield f"data: {json.dumps(data)}\n\n"
                    elif text or finish:
                        yield f"data: {json.dumps(chunk(text, _reason(finish), finish is not None))}\n\n"
                if usage:
                    yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage_of()})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        text, finish = "", None
        async for piece, finish, _ in events():
            text += piece
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _reason(finish)}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": _reason(finish)})
        if request.return_token_ids:
            choice["token_ids"] = request.output[:pieces.kept]
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.id}", "object": kind, "created": created,
                "model": front.model_name, "choices": [choice], "usage": usage_of()}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, chat=True)

    return app


def _reason(finish: str | None) -> str | None:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(finish, finish)


class Pieces:
    """A request's text as its tokens arrive: each delta is what the whole decoded text gained (so a
    character split over tokens comes out whole), cut at the first stop string."""

    def __init__(self, tokenizer, request: Request):
        self.tok, self.request, self.text, self.kept, self.done = tokenizer, request, "", 0, False
        self.stops = getattr(request, "stop_strings", [])

    def add(self, tokens: list[int], finish: str | None) -> tuple[str, str | None]:
        if self.done:
            return "", None
        self.kept += len(tokens)
        text = self.tok.decode(self.request.output[:self.kept])
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop_string"
        if finish is None and text.endswith("\ufffd"):
            return "", None  # half a character: wait for the rest
        delta, self.text = text[len(self.text):], text
        self.done = finish is not None
        return delta, finish


def run(cfg: DictConfig, session: Session, out_dir: Path) -> None:
    task = cfg.task
    model, tok = session.model_for(cfg)
    max_seq = task.get("max_seq") or model.cfg.max_position_embeddings
    try:
        engine = Engine(model, int(task.max_batch), int(max_seq))
    except ValueError as err:
        raise UserError(str(err)) from err
    if not session.dist.is_main:
        # torchrun passes SIGTERM to every rank at once: this one ends when rank 0's last plan says so
        signal.signal(signal.SIGTERM, lambda *_: None)
        while run_plan(engine, None) is not None:
            pass
        return
    files = Path(str(cfg.model.path))
    name = task.get("model_name") or files.name
    scheduler = Scheduler(engine, int(task.max_queue))
    chat = ChatTemplate.of(model_files_dir(str(cfg.model.path), session.dist.rank), tok)
    front = Frontend(scheduler, tok, chat, name, int(max_seq), model.cfg.stop_ids, task.get("api_key"))
    # SIGTERM (a service manager's stop, through torchrun): no new requests, what runs ends as aborted,
    # every rank leaves its loop
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stopping.set())
    server, http_thread = start_http(build_app(front), str(task.host), int(task.port))
    log.info("serving %s on http://%s:%d/v1 (%d rows, context %d)", name, task.host, task.port, task.max_batch,
             max_seq)
    try:
        scheduler.loop()
    finally:
        scheduler.stopping.set()
        server.should_exit = True  # uvicorn lets the responses under way finish (their last events are queued)
        http_thread.join(GRACEFUL_S + 5)


def start_http(app, host: str, port: int) -> tuple:
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=GRACEFUL_S))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server, thread
