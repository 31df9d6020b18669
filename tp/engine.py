"""Continuous batching over the static decode step: requests join a running batch and leave it between
steps, so a short answer never waits for a long one and a new prompt never waits for a batch to drain
(nano-vllm's scheduler, without paging: each row of the KV cache holds one request).

Every step, rank 0 decides a `Plan` (which waiting requests go into which free rows, which rows are
aborted) and every rank applies the same plan: prefill each admitted prompt alone into its row
(tp.generate.admit), then one decode step (tp.model.DecodeStep) over the rows up to the last busy one
(all rows where the step is a captured graph), then every row's token chosen in one call. The tokens
are identical on every rank (all ranks hold the same logits and seed the same generators), so each
rank knows by itself which rows ended: only the plan travels (torch.distributed.broadcast_object_list),
not the tokens. Rows without a request below the last busy one decode too; their slots are put back to 0
after each step, so they never run off the cache.

A greedy request's answer is what `generate` gives its prompt alone; a sampled one draws from its
own generator, seeded by the request (tp/sampler.py chooses every row's token in one batched call).
Several answers to one prompt (`n`) are requests of one group: admitted together, the prompt prefilled
once into the first one's row and its keys and values copied into the others'.

A request that fails inside a step (its prefill raised) ends alone, `finish` "error"; a failure in
the decode step ends the requests then running; the engine goes on either way.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tp.generate import admit, point_after
from tp.model import InternLM
from tp.sampler import RowLogprobs, Sampler, Sampling, logprobs_of

log = logging.getLogger("internlm_tp")


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_tokens: int  # 0: the prompt alone (its log-probabilities), nothing generated
    stop_ids: tuple[int, ...] = ()
    sampling: Sampling = Sampling()  # temperature 0: greedy
    seed: int = 0  # a sampled request's generator, seeded alike on every rank
    min_tokens: int = 0  # its stop ids cannot end it before this many tokens
    logprobs: int | None = None  # per generated token, its log-probability and this many top ones
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    stop_strings: tuple[str, ...] = ()  # read by rank 0's detokenizer, which ends the request at one
    group: str | None = None  # the id of the request of its group whose prefill it shares (n > 1)
    extra: dict = field(default_factory=dict)  # carried for the server (its test hooks), never read here
    output: list[int] = field(default_factory=list)
    output_logprobs: list[RowLogprobs] = field(default_factory=list)
    prompt_logprob_values: list[RowLogprobs] = field(default_factory=list)
    finish: str | None = None  # "stop" (a stop id, kept in output), "length" (max_tokens or the cache), "abort", "error"
    error: str | None = None


@dataclass
class Plan:
    """What every rank does in one step, as rank 0 decided it."""
    admit: list[tuple[int, Request]] = field(default_factory=list)
    abort: list[int] = field(default_factory=list)
    stop: bool = False  # every rank leaves its serving loop


class Engine:
    def __init__(self, model: InternLM, max_batch: int, max_seq: int, keeps_logprobs: bool = True):
        if max_batch < 1 or max_seq < 2:
            raise ValueError(f"an engine needs max_batch >= 1 and max_seq >= 2, got {max_batch} and {max_seq}")
        self.model, self.max_seq, self.keeps_logprobs = model, max_seq, keeps_logprobs
        model.setup_cache(max_batch, max_seq)  # rows end at max_seq; a larger cache kept is fine
        self.rows: list[Request | None] = [None] * max_batch
        self.idle = torch.ones(max_batch, dtype=torch.bool, device=model.device)
        self.waiting: deque[list[Request]] = deque()  # groups: one request, or the n answers to one prompt
        self.sampler = Sampler(max_batch, model.cfg.vocab_size, model.device)
        self.aborted: set[str] = set()
        self.prefilled_tokens = 0  # prompt tokens run through the model (a group's prompt counts once)
        self.decode_steps, self.choice_s = 0, 0.0  # decode steps, and the host time their token choices took
        self.before_admit = None  # a callable(request) run on every rank before its prefill (the server's test hooks)
        self._reset_idle()

    # -- rank 0: the queue ------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Why `request` cannot run here (ValueError), before it is queued."""
        if not request.prompt or len(request.prompt) >= self.max_seq:
            raise ValueError(f"request {request.id}: a prompt of {len(request.prompt)} tokens does not fit a "
                             f"context of {self.max_seq} (at least one token must follow it)")
        if request.max_tokens < 0 or (request.max_tokens == 0 and request.prompt_logprobs is None):
            raise ValueError(f"request {request.id}: max_tokens must be >= 1 (0 only for the prompt's "
                             f"log-probabilities), got {request.max_tokens}")

    def submit(self, request: Request | list[Request]) -> None:
        group = request if isinstance(request, list) else [request]
        if not group or len(group) > len(self.rows):
            raise ValueError(f"a group of {len(group)} requests does not fit {len(self.rows)} rows")
        for r in group:
            self.check(r)
        self.waiting.append(group)

    def abort(self, request_id: str) -> None:
        """End a request at the next step boundary, waiting or running."""
        self.aborted.add(request_id)

    def waiting_requests(self) -> list[Request]:
        return [r for group in self.waiting for r in group]

    def plan(self) -> Plan:
        """Aborted rows freed, then free rows filled from the queue, first come first served, a group
        only when all of it fits. An aborted request still waiting just leaves the queue ("abort")."""
        plan = Plan()
        for row, request in enumerate(self.rows):
            if request is not None and request.id in self.aborted:
                plan.abort.append(row)
        for group in list(self.waiting):
            for request in [r for r in group if r.id in self.aborted]:
                group.remove(request)
                request.finish = "abort"
            if not group:
                self.waiting.remove(group)
            elif group[0].group is not None:  # its prefill's owner left: the first left owns it
                for r in group:
                    r.group = None if r is group[0] else group[0].id
        self.aborted.clear()  # ids of requests that had already ended are dropped too
        free = [row for row, request in enumerate(self.rows) if request is None or row in plan.abort]
        while self.waiting and len(free) >= len(self.waiting[0]):
            plan.admit += [(free.pop(0), request) for request in self.waiting.popleft()]
        return plan

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # -- every rank: the step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan: Plan) -> list[Request]:
        """Apply `plan`, decode one token for every running row; returns the requests that received
        tokens this step or ended (finished ones with `finish` set, their rows already free)."""
        touched: list[Request] = []
        for row in plan.abort:
            request, self.rows[row] = self.rows[row], None
            request.finish = "abort"
            touched.append(request)
        prefilled: dict[str, tuple[int, torch.Tensor]] = {}  # a group's first request -> (row, next-token logits)
        for row, request in plan.admit:
            touched.append(request)
            try:
                self._admit(row, request, prefilled)
            except Exception as err:  # noqa: BLE001 -- one request's failure ends that request, not the engine
                log.exception("request %s failed in its prefill", request.id)
                request.finish, request.error = "error", f"{type(err).__name__}: {err}"
                self.rows[row] = None
        self._update_idle()
        running = [row for row, r in enumerate(self.rows) if r is not None and r.finish is None]
        if running:
            try:
                values = self._decode(running[-1] + 1)  # the step's one read back: which rows ended, what to stream
            except Exception as err:  # noqa: BLE001
                log.exception("the decode step failed: its %d requests end", len(running))
                for row in running:
                    self.rows[row].finish, self.rows[row].error = "error", f"{type(err).__name__}: {err}"
                values = None
            for row in running:
                request = self.rows[row]
                if values is not None:
                    self._take(request, *values[row])
                if request not in touched:
                    touched.append(request)
        for row, request in enumerate(self.rows):
            if request is not None and request.finish is not None:
                self.rows[row] = None
                self.sampler.release(row)
        self._update_idle()
        self._reset_idle()
        return touched

    def _admit(self, row: int, request: Request, prefilled: dict) -> None:
        if self.before_admit is not None:
            self.before_admit(request)
        self.rows[row] = request
        if request.group is None:
            logits = admit(self.model, row, request.prompt, every_position=request.prompt_logprobs is not None)
            self.prefilled_tokens += len(request.prompt)
            if request.prompt_logprobs is not None:
                if self.keeps_logprobs and len(request.prompt) > 1:
                    ids = torch.tensor(request.prompt[1:], device=logits.device)
                    request.prompt_logprob_values = logprobs_of(logits[:-1], ids, request.prompt_logprobs)
                logits = logits[-1]
            prefilled[request.id] = (row, logits)
        else:  # one more answer to a prompt prefilled this step: its keys and values copied
            source, logits = prefilled[request.group]
            self.model.copy_cache_row(source, row, len(request.prompt))
            point_after(self.model, row, len(request.prompt))
        self.sampler.admit(row, request)
        if request.max_tokens == 0:
            request.finish = "length"
            return
        tokens, logprobs = self.sampler.choose(logits[None], [request], [row], self.keeps_logprobs)
        self.model.step.tokens[row] = tokens[0]
        self._take(request, int(tokens[0]), logprobs.get(0))

    def _decode(self, busy: int) -> list[tuple[int, RowLogprobs | None]]:
        """One decode step; each row's next token (and what it was worth, where asked). Eagerly (the
        CPU), only rows [0, busy) are computed: rows fill from the lowest free one, so one client pays
        for one row, not max_batch. A captured graph has one shape: every row."""
        state, model = self.model.step, self.model
        if model.graphs is not None or busy == len(self.rows):
            logits = model.decode(state)[:, -1]
        else:
            with model.cache_rows(0, busy):
                logits = model.decode(state.first_rows(busy))[:, -1]
        t0 = time.perf_counter()
        tokens, logprobs = self.sampler.choose(logits[:busy], self.rows[:busy], list(range(busy)), self.keeps_logprobs)
        state.tokens[:busy] = tokens
        values = tokens.tolist()
        self.decode_steps, self.choice_s = self.decode_steps + 1, self.choice_s + time.perf_counter() - t0
        return [(t, logprobs.get(i)) for i, t in enumerate(values)]

    def _take(self, request: Request, token: int, logprobs: RowLogprobs | None = None) -> None:
        if request.finish is not None:
            return
        request.output.append(token)
        if logprobs is not None:
            request.output_logprobs.append(logprobs)
        if token in request.stop_ids:  # never before min_tokens: the sampler masks them until then
            request.finish = "stop"
        elif len(request.output) >= request.max_tokens or len(request.prompt) + len(request.output) >= self.max_seq:
            request.finish = "length"

    def _update_idle(self) -> None:
        self.idle.copy_(torch.tensor([r is None or r.finish is not None for r in self.rows]))

    def _reset_idle(self) -> None:
        """Rows without a request back to slot 0, attending only that slot: they decode harmlessly."""
        state = self.model.step
        state.positions.masked_fill_(self.idle, 0)
        state.slots.masked_fill_(self.idle, 0)
        state.valid.masked_fill_(self.idle[:, None], False)


def run_plan(engine: Engine, plan: Plan | None) -> list[Request] | None:
    """One step on every rank: rank 0's plan (None elsewhere) broadcast, then applied; None once
    rank 0 says stop."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    return None if plan.stop else engine.step(plan)
