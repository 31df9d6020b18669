"""The next token of every row of a step in one batched call: logit bias, penalties, a minimum length
(stop ids masked), then greedy rows by argmax and sampled rows by temperature, top-k and top-p, each
drawn with one uniform number from its own generator; log-probabilities where a request asks for them.

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


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 logits [S, V], row i drawn with uniforms[i] in [0, 1) by inverting
    the cumulative distribution of its filtered, tempered softmax (top-p keeps the token that crosses
    it). Exact: token j is chosen with its filtered probability."""
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    if bool((top_p < 1).any()) or bool((top_k > 0).any()):
        logits, order = logits.sort(dim=-1, descending=True)
        keep = torch.arange(vocab, device=logits.device)[None, :] < torch.where(top_k > 0, top_k, vocab)[:, None]
        logits = logits.masked_fill(~keep, float("-inf"))
        probs = logits.softmax(-1)
        crossed = probs.cumsum(-1) - probs > top_p[:, None]
        probs = probs.masked_fill(crossed, 0.0)
    else:
        order, probs = None, logits.softmax(-1)
    cumulative = probs.cumsum(-1)
    drawn = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True).squeeze(-1)
    # u * total may round up to the total: never past the last token that has any probability
    last = vocab - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    drawn = torch.minimum(drawn, last)
    return drawn if order is None else order.gather(-1, drawn[:, None]).squeeze(-1)


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
        from tp.generate import choose as argmax  # the greedy choice tp.generate makes (its kernel)
        tokens = argmax(logits, Sampling(), None)
        live = [i for i, r in enumerate(requests) if r is not None and r.finish is None]
        special = [i for i in live if requests[i].sampling.temperature > 0 or requests[i].sampling.adjusts_logits
                   or len(requests[i].output) < requests[i].min_tokens]
        if special:
            index = torch.tensor(special, device=logits.device)
            adjusted = self._adjust(logits[index].float(), [requests[i] for i in special], [rows[i] for i in special])
            sampled = [j for j, i in enumerate(special) if requests[i].sampling.temperature > 0]
            greedy = [j for j, i in enumerate(special) if requests[i].sampling.temperature <= 0]
            if greedy:
                tokens[index[greedy]] = adjusted[greedy].argmax(-1)
            if sampled:
                settings = [requests[special[j]].sampling for j in sampled]
                column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=logits.device)  # noqa: E731
                uniforms = torch.cat([torch.rand(1, generator=self.generators[rows[special[j]]], device=self.device)
                                      for j in sampled]).to(logits.device)
                tokens[index[sampled]] = sample(adjusted[sampled], column([s.temperature for s in settings], torch.float32),
                                                column([s.top_p for s in settings], torch.float32),
                                                column([s.top_k for s in settings], torch.long), uniforms)
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
