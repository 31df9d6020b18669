"""Continuous batching over the static decode step: requests join a running batch and leave it between
steps, so a short answer never waits for a long one and a new prompt never waits for a batch to drain
(nano-vllm's scheduler, without paging: each row of the KV cache holds one request).

Every step, rank 0 decides a `Plan` (which waiting requests go into which free rows, which rows are
aborted) and every rank applies the same plan: prefill each admitted prompt alone into its row
(tp.generate.admit), then one decode step (tp.model.DecodeStep) over the rows up to the last busy one
(all rows where the step is a captured graph), the greedy choice per row. The tokens are identical on every rank (all ranks hold the same logits), so each rank knows by
itself which rows ended: only the plan travels (torch.distributed.broadcast_object_list), not the
tokens. Rows without a request below the last busy one decode too; their slots are put back to 0
after each step, so they never run off the cache.

A greedy request's answer is what `generate` gives its prompt alone; a sampled one draws from its
own generator, seeded by the request.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tp.generate import Sampling, admit, choose
from tp.model import InternLM


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_tokens: int
    stop_ids: tuple[int, ...] = ()
    sampling: Sampling = Sampling()  # temperature 0: greedy
    seed: int = 0  # a sampled request's generator, seeded alike on every rank
    output: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (a stop id, kept in output), "length" (max_tokens or the cache), "abort"


@dataclass
class Plan:
    """What every rank does in one step, as rank 0 decided it."""
    admit: list[tuple[int, Request]] = field(default_factory=list)
    abort: list[int] = field(default_factory=list)
    stop: bool = False  # every rank leaves its serving loop


class Engine:
    def __init__(self, model: InternLM, max_batch: int, max_seq: int):
        if max_batch < 1 or max_seq < 2:
            raise ValueError(f"an engine needs max_batch >= 1 and max_seq >= 2, got {max_batch} and {max_seq}")
        self.model, self.max_seq = model, max_seq
        model.setup_cache(max_batch, max_seq)  # rows end at max_seq; a larger cache kept is fine
        self.rows: list[Request | None] = [None] * max_batch
        self.idle = torch.ones(max_batch, dtype=torch.bool, device=model.device)
        self.waiting: deque[Request] = deque()
        self.generators: dict[int, torch.Generator] = {}  # row -> its sampled request's generator
        self.aborted: set[str] = set()
        self._reset_idle()

    # -- rank 0: the queue ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if not request.prompt or len(request.prompt) >= self.max_seq:
            raise ValueError(f"request {request.id}: a prompt of {len(request.prompt)} tokens does not fit a "
                             f"context of {self.max_seq} (at least one token must follow it)")
        if request.max_tokens < 1:
            raise ValueError(f"request {request.id}: max_tokens must be >= 1, got {request.max_tokens}")
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """End a request at the next step boundary, waiting or running."""
        self.aborted.add(request_id)

    def plan(self) -> Plan:
        """Aborted rows freed, then free rows filled from the queue, first come first served. An aborted
        request still waiting just leaves the queue (finish "abort")."""
        plan = Plan()
        for row, request in enumerate(self.rows):
            if request is not None and request.id in self.aborted:
                plan.abort.append(row)
        for request in [r for r in self.waiting if r.id in self.aborted]:
            self.waiting.remove(request)
            request.finish = "abort"
        self.aborted.clear()  # ids of requests that had already ended are dropped too
        free = [row for row, request in enumerate(self.rows) if request is None or row in plan.abort]
        while free and self.waiting:
            plan.admit.append((free.pop(0), self.waiting.popleft()))
        return plan

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # -- every rank: the step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan: Plan) -> list[Request]:
        """Apply `plan`, decode one token for every running row; returns the requests that received
        tokens this step (finished ones with `finish` set, their rows already free)."""
        touched: list[Request] = []
        for row in plan.abort:
            request, self.rows[row] = self.rows[row], None
            request.finish = "abort"
            touched.append(request)
        state = self.model.step
        for row, request in plan.admit:
            if request.sampling.temperature > 0:
                self.generators[row] = torch.Generator(self.model.device).manual_seed(request.seed)
            token = int(self._choose(admit(self.model, row, request.prompt)[None], [request], [row])[0])
            state.tokens[row] = token
            self.rows[row] = request
            self._take(request, token)
            touched.append(request)
        self._update_idle()
        running = [row for row, r in enumerate(self.rows) if r is not None]
        if running:
            values = self._decode(running[-1] + 1)  # the step's one read back: which rows ended, what to stream
            for row in running:
                request = self.rows[row]
                self._take(request, values[row])
                if request not in touched:
                    touched.append(request)
        for row, request in enumerate(self.rows):
            if request is not None and request.finish is not None:
                self.rows[row] = None
                self.generators.pop(row, None)
        self._update_idle()
        self._reset_idle()
        return touched

    def _decode(self, busy: int) -> list[int]:
        """One decode step; each row's next token. Eagerly (the CPU), only rows [0, busy) are computed:
        rows fill from the lowest free one, so one client pays for one row, not max_batch. A captured
        graph has one shape: every row."""
        state, model = self.model.step, self.model
        if model.graphs is not None or busy == len(self.rows):
            logits = model.decode(state)[:, -1]
        else:
            with model.cache_rows(0, busy):
                logits = model.decode(state.first_rows(busy))[:, -1]
        tokens = self._choose(logits, self.rows[:busy], range(busy))
        state.tokens[:busy] = tokens
        return tokens.tolist()

    def _choose(self, logits: torch.Tensor, requests, rows) -> torch.Tensor:
        """Greedy for every row in one call, then each sampled row drawn with its own generator (the
        same draws on every rank: the same seed, the same logits)."""
        tokens = choose(logits, Sampling(), None)
        for i, (request, row) in enumerate(zip(requests, rows)):
            if request is not None and request.finish is None and request.sampling.temperature > 0:
                tokens[i] = choose(logits[i:i + 1], request.sampling, self.generators[row])[0]
        return tokens

    def _take(self, request: Request, token: int) -> None:
        if request.finish is not None:
            return
        request.output.append(token)
        if token in request.stop_ids:
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
