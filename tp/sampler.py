"""The next token of every row of a step in one batched call: logit bias, penalties, a minimum length
(stop ids masked), then greedy rows by argmax and sampled rows by temperature, top-k and top-p, each
drawn with uniform numbers from its own generator; log-probabilities where a request asks for them.

Definitions, as the APIs users know state them:
- presence_penalty p and frequency_penalty f (OpenAI): logit[j] -= f * count[j] + p * (count[j] > 0),
  count[j] the times token j was generated so far in this answer;
- repetition_penalty r (transformers, vLLM): for every token j of the prompt or the answer so far,
  logit[j] / r where it is positive, logit[j] * r otherwise;
- logit_bias (OpenAI): added to the logits;
- logprobs: log_softmax of the model's raw logits in float32 (before any of the above, as vLLM's
  default), the chosen token's and the top k.
A row that needs none of this takes the same argmax as `tp.generate` (the answer a prompt gets alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tp import cpu_kernels


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters; penalties 0 (repetition 1)
    and an empty logit_bias change nothing."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token per row of logits [B, V] (the first maximum, as argmax)."""
    op = cpu_kernels.op_for("argmax_rows", logits) if logits.dim() == 2 else None
    if op is not None:  # the same choice in two vectorized passes (tp/csrc/argmax.cpp): 115 -> 24 us
        return op(logits.contiguous())
    return torch.max(logits, dim=-1).indices  # 4x faster than argmax on bfloat16 CPU


def sample_with(logits: torch.Tensor, settings: list[Sampling], uniform) -> torch.Tensor:
    """`sample` for rows of logits [S, V] each with its own (temperature > 0) settings."""
    def column(values, dtype):
        return torch.tensor(values, dtype=dtype, device=logits.device)
    return sample(logits.float(), column([s.temperature for s in settings], torch.float32),
                  column([s.top_p for s in settings], torch.float32), column([s.top_k for s in settings], torch.long),
                  uniform)


WINDOW = 256  # the most likely tokens a top-p row is drawn from, when they hold more than its top_p
MAX_TRIES = 32  # draws a top-p row may reject before it is sorted whole (each is kept with probability > top_p)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           uniform) -> torch.Tensor:
    """One token per row of float32 logits [S, V], drawn from its tempered softmax filtered by top_k and
    top_p (top-p keeps the token that crosses it), by inverting the cumulative distribution at a
    uniform number: `uniform(rows)` gives one fresh number in [0, 1) for each of those rows (from the
    row's own generator). Exact: token j is chosen with its filtered probability.

    No row sorts its vocabulary when it need not (a whole sort of 16 x 92544 logits costs ~60 ms on 2
    cores, a decode step ~100): unfiltered rows draw from the unsorted softmax; top-k rows from their
    k most likely tokens (torch.topk); top-p rows from the WINDOW most likely when those hold more than
    top_p of the mass, else from the whole softmax, a draw kept when the mass of the tokens more likely
    than it is at most top_p (rejection: each draw is kept with probability > top_p, and what is kept
    follows the filtered distribution)."""
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    # one pass of exp for the whole batch: e = exp((logit - max) / T), unnormalised; mass = its row sums
    # (the order of the logits, and so every top-k, does not depend on T > 0)
    inverse_t = (1.0 / temperature)[:, None]
    top = logits.amax(-1, keepdim=True)
    e = ((logits - top) * inverse_t).exp_()
    mass = e.sum(-1, keepdim=True)
    with_k = (top_k > 0) & (top_k < vocab)
    for group, width in ((with_k, None), (~with_k & (top_p < 1), WINDOW)):
        index = group.nonzero().squeeze(-1)
        if not index.numel():
            continue
        width = min(vocab, int(top_k[index].max()) if width is None else width)
        values, order = _rows(logits, index).topk(width, dim=-1)  # most likely first
        probs = ((values - top[index]) * inverse_t[index]).exp_() / mass[index]
        covered = with_k[index] | (probs.sum(-1) > top_p[index])
        inside = covered.nonzero().squeeze(-1)
        if inside.numel():
            at = index[inside]
            window = probs[inside]
            drawn = _draw(window * _kept(window, top_p[at], top_k[at]), uniform(at))
            tokens[at] = order[inside].gather(-1, drawn[:, None]).squeeze(-1)
        if inside.numel() < index.numel():
            _reject(e, mass, top_p, index[~covered], tokens, uniform)
    plain = ((top_p >= 1) & ~with_k).nonzero().squeeze(-1)
    if plain.numel():
        tokens[plain] = _draw(_rows(e, plain), uniform(plain))
    return tokens


def _kept(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Which of the sorted (descending) probabilities `probs` [R, W] the filters keep."""
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    return (rank < torch.where(top_k > 0, top_k, probs.shape[-1])[:, None]) & \
        (probs.cumsum(-1) - probs <= top_p[:, None])


def _reject(e, mass, top_p, index, tokens, uniform) -> None:
    """Top-p rows whose kept tokens spread past the window: draws from the whole softmax (e: its
    unnormalised values, mass: their sums) until one is kept; rows still without one after MAX_TRIES
    are sorted whole."""
    probs, bound = _rows(e, index), top_p[index, None] * mass[index]
    for _ in range(MAX_TRIES):
        drawn = _draw(probs, uniform(index))
        chosen = probs.gather(-1, drawn[:, None])
        kept = torch.where(probs > chosen, probs, 0.0).sum(-1, keepdim=True) <= bound
        kept = kept.squeeze(-1)
        tokens[index[kept]] = drawn[kept]
        if bool(kept.all()):
            return
        left = (~kept).nonzero().squeeze(-1)
        index, probs, bound = index[left], probs.index_select(0, left), bound[left]
    values, order = _rows(e, index).sort(dim=-1, descending=True)
    values = values / mass[index]
    drawn = _draw(values * _kept(values, top_p[index], torch.zeros_like(index)), uniform(index))
    tokens[index] = order.gather(-1, drawn[:, None]).squeeze(-1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x's rows `index`: x itself when that is all of them (a copy of 16 x 92544 floats costs ~0.4 ms)."""
    if index.numel() == x.shape[0] and bool((index == torch.arange(x.shape[0], device=x.device)).all()):
        return x
    return x.index_select(0, index)


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index per row of unnormalised probabilities [R, W] at uniforms[r] of its cumulative mass."""
    cumulative = probs.cumsum(-1)
    drawn = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True).squeeze(-1)
    drawn = drawn.clamp(max=probs.shape[-1] - 1)
    empty = probs.gather(-1, drawn[:, None]).squeeze(-1) == 0
    if bool(empty.any()):  # u * total rounded up to the total: the last index that has any probability
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
        drawn = torch.where(empty, torch.minimum(drawn, last), drawn)
    return drawn


@dataclass
class RowLogprobs:
    """What a row's chosen token was worth: its log-probability and the top alternatives."""
    logprob: float
    top: list[tuple[int, float]]


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[RowLogprobs]:
    """For rows of raw logits [S, V] and their chosen tokens [S]: log_softmax in float32, each chosen
    token's value and the k most likely (k may be 0)."""
    logp = logits.float().log_softmax(-1)
    values = logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    if k > 0:
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        pairs = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        pairs = [[] for _ in values]
    return [RowLogprobs(v, p) for v, p in zip(values, pairs)]


class Sampler:
    """Per row of the batch: its request's settings, its generator, and the token counts its penalties
    need ([rows, vocab] on the device, allocated the first time a request asks for a penalty)."""

    def __init__(self, rows: int, vocab: int, device):
        self.rows, self.vocab, self.device = rows, vocab, torch.device(device)
        self.generators: dict[int, torch.Generator] = {}
        self.counts: torch.Tensor | None = None  # generated tokens per row, for presence / frequency
        self.seen: torch.Tensor | None = None    # prompt and generated tokens per row, for repetition

    def admit(self, row: int, request) -> None:
        s = request.sampling
        if s.temperature > 0:
            self.generators[row] = torch.Generator(self.device).manual_seed(request.seed)
        else:
            self.generators.pop(row, None)
        if s.adjusts_logits and self.counts is None:
            self.counts = torch.zeros(self.rows, self.vocab, dtype=torch.int32, device=self.device)
            self.seen = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=self.device)
        if self.counts is not None:
            self.counts[row] = 0
            self.seen[row] = False
            if s.repetition_penalty != 1.0:
                self.seen[row, torch.tensor(request.prompt, device=self.device)] = True

    def release(self, row: int) -> None:
        self.generators.pop(row, None)

    def choose(self, logits: torch.Tensor, requests: list, rows: list[int], want_logprobs: bool = True
               ) -> tuple[torch.Tensor, dict[int, RowLogprobs]]:
        """Next token for every row of `logits` [B, V] (requests[i] None: an idle row, argmax); and for
        the i of rows whose request asks for logprobs, what its token was worth."""
        tokens = greedy(logits)
        live = [i for i, r in enumerate(requests) if r is not None and r.finish is None]
        special = [i for i in live if requests[i].sampling.temperature > 0 or requests[i].sampling.adjusts_logits
                   or len(requests[i].output) < requests[i].min_tokens]
        if special:
            index = torch.tensor(special, device=logits.device)
            adjusted = self._adjust(logits[index].float(), [requests[i] for i in special], [rows[i] for i in special])
            sampled = [j for j, i in enumerate(special) if requests[i].sampling.temperature > 0]
            argmax = [j for j, i in enumerate(special) if requests[i].sampling.temperature <= 0]
            if argmax:
                tokens[index[argmax]] = adjusted[argmax].argmax(-1)
            if sampled:
                owners = [self.generators[rows[special[j]]] for j in sampled]

                def uniform(at: torch.Tensor) -> torch.Tensor:  # row i's numbers from row i's generator
                    return torch.cat([torch.rand(1, generator=owners[i], device=self.device)
                                      for i in at.tolist()]).to(logits.device)
                tokens[index[sampled]] = sample_with(adjusted[sampled], [requests[special[j]].sampling for j in sampled],
                                                     uniform)
        if self.counts is not None and live:
            at = torch.tensor([rows[i] for i in live], device=self.device)
            chosen = tokens[torch.tensor(live, device=tokens.device)].to(self.device)
            self.counts.index_put_((at, chosen), torch.ones_like(chosen, dtype=torch.int32), accumulate=True)
            self.seen[at, chosen] = True
        asking = [i for i in live if requests[i].logprobs is not None] if want_logprobs else []
        found: dict[int, RowLogprobs] = {}
        if asking:
            index = torch.tensor(asking, device=logits.device)
            k = max(requests[i].logprobs for i in asking)
            for i, value in zip(asking, logprobs_of(logits[index], tokens[index], k)):
                value.top = value.top[:requests[i].logprobs]
                found[i] = value
        return tokens, found

    def _adjust(self, logits: torch.Tensor, requests: list, rows: list[int]) -> torch.Tensor:
        """Logit bias, penalties and the minimum length applied to float32 rows [S, V], as tensors."""
        settings = [r.sampling for r in requests]
        if any(s.adjusts_logits for s in settings):
            at = torch.tensor(rows, device=self.device)
            column = lambda values: torch.tensor(values, dtype=torch.float32, device=logits.device)[:, None]  # noqa: E731
            counts, seen = self.counts[at].to(logits.device).float(), self.seen[at].to(logits.device)
            logits = logits - column([s.frequency_penalty for s in settings]) * counts \
                - column([s.presence_penalty for s in settings]) * (counts > 0)
            r = column([s.repetition_penalty for s in settings])
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
            bias = [(j, token, value) for j, s in enumerate(settings) for token, value in s.logit_bias
                    if 0 <= token < logits.shape[-1]]
            if bias:
                j, token, value = zip(*bias)
                logits.index_put_((torch.tensor(j, device=logits.device), torch.tensor(token, device=logits.device)),
                                  torch.tensor(value, dtype=logits.dtype, device=logits.device), accumulate=True)
        for j, request in enumerate(requests):
            if len(request.output) < request.min_tokens and request.stop_ids:
                stops = [t for t in request.stop_ids if 0 <= t < logits.shape[-1]]
                logits[j, stops] = float("-inf")
        return logits
