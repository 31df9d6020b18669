"""task=serve: an OpenAI-compatible HTTP server on rank 0, continuous batching over every rank.

Rank 0 runs the HTTP side (FastAPI on uvicorn, in a thread of its own: launch/serve_app.py) and the
scheduler (this process's main thread): each loop it takes what the handlers queued (new requests,
aborts), plans a step (tp/engine.py), broadcasts the plan, runs it like every other rank, and hands
each request its new tokens. Other ranks hold no socket: they run the plans they receive. When nothing
runs, rank 0 still sends an empty plan every IDLE_PLAN_S, so the other ranks' broadcast never times
out; liveness is the heartbeat's (launch/heartbeat.py), never how long a step took.

Nothing a client sends can end the loop: requests are checked before they are queued
(launch/openai_api.py), and a request that fails inside the loop ends alone, with a 500.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from launch.chat import ChatTemplate
from launch.heartbeat import Heartbeat
from launch.openai_api import ApiError
from launch.serve_metrics import ServeMetrics
from launch.session import Session, UserError
from tp.engine import Engine, Plan, Request, run_plan
from tp.partition import model_files_dir

log = logging.getLogger("internlm_tp")
IDLE_PLAN_S = 1.0
GRACEFUL_S = 5  # seconds the HTTP side has, once stopping, to finish the responses under way
TEST_HOOKS = "INTERNLM_TP_TEST_HOOKS"  # =1: a request's "test_hook" field may slow or fail its prefill


@dataclass
class Stream:
    """One answer's side of the server: where its tokens go, and what was sent so far."""
    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # (choice index, new tokens, finish), shared by the answers of one HTTP request
    index: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    sent: int = 0


class Scheduler:
    """Rank 0's loop; the handlers talk to it through `incoming` (thread-safe) and their Streams."""

    def __init__(self, engine: Engine, max_queue: int, heartbeat: Heartbeat):
        self.engine, self.max_queue, self.heartbeat = engine, max_queue, heartbeat
        self.incoming: queue.Queue = queue.Queue()
        self.streams: dict[str, Stream] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.metrics = ServeMetrics(lambda: sum(1 for r in engine.rows if r is not None), self.waiting)

    def waiting(self) -> int:
        """Requests accepted and not yet in a row (read by /metrics, from the HTTP thread)."""
        in_rows = {r.id for r in list(self.engine.rows) if r is not None}
        with self.lock:
            return sum(1 for s in self.streams.values() if s.request.finish is None and s.request.id not in in_rows)

    def submit(self, groups: list[list[Stream]]) -> None:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", "server_error")
        with self.lock:
            if sum(1 for s in self.streams.values() if not s.request.output) >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                               "rate_limit_error")
            for group in groups:
                for stream in group:
                    self.streams[stream.request.id] = stream
        for group in groups:
            self.incoming.put(("submit", [s.request for s in group]))

    def abort(self, request_id: str) -> None:
        self.incoming.put(("abort", request_id))

    def _drain(self, block: bool) -> None:
        try:
            item = self.incoming.get(timeout=IDLE_PLAN_S) if block else self.incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "abort":
                self.engine.abort(value)
            else:
                try:
                    self.engine.submit(value)
                except Exception as err:  # noqa: BLE001 -- this request ends, the loop goes on
                    log.exception("request %s refused by the engine", value[0].id)
                    for request in value:
                        request.finish, request.error = "error", f"{type(err).__name__}: {err}"
                        self._publish(request)
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return

    def loop(self) -> None:
        engine = self.engine
        self.heartbeat.loop_alive = True
        while not self.stopping.is_set():
            self._drain(block=not engine.has_work())
            plan = engine.plan()
            for request in [r for r in self._requests() if r.finish == "abort" and not r.output]:
                self._publish(request)  # aborted while waiting
            touched = run_plan(engine, plan)
            self.metrics.follow(engine)  # before the clients hear of this step
            for request in touched:
                self._publish(request)
        self._drain(block=False)
        for request in [r for r in engine.rows if r is not None] + engine.waiting_requests():
            engine.abort(request.id)
        plan = engine.plan()  # what runs or waits ends as aborted, and its clients are told
        for request in run_plan(engine, plan) + [r for r in self._requests() if r.finish == "abort"]:
            self._publish(request)
        run_plan(engine, Plan(stop=True))

    def _requests(self) -> list[Request]:
        with self.lock:
            return [s.request for s in self.streams.values()]

    def _publish(self, request: Request) -> None:
        try:
            self._hand_over(request)
        except Exception:  # noqa: BLE001 -- never the loop's end
            log.exception("request %s: its tokens could not be handed over", request.id)

    def _hand_over(self, request: Request) -> None:
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
            self.metrics.ttft.observe(now - stream.submitted)
        if new:  # each token's interval since the one before it, as a client sees them (vLLM's semantics)
            if stream.last_token is None:  # a step that admits a request gives its first two tokens at once
                for _ in new[1:]:
                    self.metrics.tpot.observe(0.0)
            else:
                for _ in new:
                    self.metrics.tpot.observe((now - stream.last_token) / len(new))
            stream.last_token = now
        stream.sent += len(new)
        self.metrics.generation_tokens.inc(len(new))
        if request.finish is not None:
            self.metrics.finished(len(request.prompt), request.finish, now - stream.submitted)
            ttft = "-" if stream.first_token is None else f"{(stream.first_token - stream.submitted) * 1e3:.0f} ms"
            log.info("request %s: %d prompt tokens, %d generated, %s; first token %s, total %.0f ms", request.id,
                     len(request.prompt), len(request.output), request.finish, ttft, (now - stream.submitted) * 1e3)
        stream.loop.call_soon_threadsafe(stream.events.put_nowait, (stream.index, list(new), request.finish))


def test_hook(request: Request) -> None:
    """With INTERNLM_TP_TEST_HOOKS=1 (tests only): {"sleep_s": s} makes this request's prefill take s
    seconds longer on every rank, {"fail": true} makes it raise."""
    hook = request.extra.get("test_hook") or {}
    time.sleep(float(hook.get("sleep_s", 0)))
    if hook.get("fail"):
        raise RuntimeError("test hook: this request's prefill fails")


def run(cfg: DictConfig, session: Session, out_dir: Path) -> None:
    from launch.serve_app import Frontend, build_app
    task = cfg.task
    model, tok = session.model_for(cfg)
    max_seq = task.get("max_seq") or model.cfg.max_position_embeddings
    try:
        engine = Engine(model, int(task.max_batch), int(max_seq), keeps_logprobs=session.dist.is_main)
    except ValueError as err:
        raise UserError(str(err)) from err
    hooks = os.environ.get(TEST_HOOKS) == "1"
    if hooks:
        engine.before_admit = test_hook
    heartbeat = Heartbeat(session.dist.rank, session.dist.world_size)
    if not session.dist.is_main:
        # torchrun passes SIGTERM to every rank at once: this one ends when rank 0's last plan says so
        signal.signal(signal.SIGTERM, lambda *_: None)
        heartbeat.loop_alive = True
        try:
            while run_plan(engine, None) is not None:
                pass
        finally:
            heartbeat.close()
        return
    files = Path(str(cfg.model.path))
    name = task.get("model_name") or files.name
    scheduler = Scheduler(engine, int(task.max_queue), heartbeat)
    chat = ChatTemplate.of(model_files_dir(str(cfg.model.path), session.dist.rank), tok)
    front = Frontend(scheduler, tok, chat, name, int(max_seq), model.cfg.stop_ids, task.get("api_key"), hooks)
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
        heartbeat.close()
        server.should_exit = True  # uvicorn lets the responses under way finish (their last events are queued)
        http_thread.join(GRACEFUL_S + 5)


def start_http(app, host: str, port: int) -> tuple:
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=GRACEFUL_S))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server, thread
