"""Batched generation: left-padded prefill, then the static decode step (tp.model.DecodeStep) against
the KV cache, each row at its own position; `admit` prefills one row into a batch already decoding."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from tp.device import synchronize
from tp.model import InternLM
from tp.routing import eos_check_interval
from tp.sampler import Sampling, greedy, sample_with  # Sampling: re-exported for the tasks


@dataclass
class Generation:
    tokens: list[list[int]]      # generated ids per prompt, EOS included when produced
    first_token_ms: float        # prefill + choice of the first token, whole batch
    next_token_ms: float         # mean time of one decode step (nan when only one token)
    decode_steps: int
    # With profile=True, the mean decode step split into input preparation, the forward pass and
    # the choice of the token (the Ascend reference's pre / forward / post columns); nan otherwise.
    pre_ms: float = float("nan")
    forward_ms: float = float("nan")
    post_ms: float = float("nan")


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits [B, V]: greedy, or the batched sampler's exact draw (tp/sampler.py)
    with its uniform numbers from `generator`, on the logits' device: seeded alike on every rank, and
    rank 0's choice is broadcast anyway."""
    if sampling.temperature <= 0:
        return greedy(logits)

    def uniform(at: torch.Tensor) -> torch.Tensor:
        device = generator.device if generator is not None else logits.device
        return torch.rand(at.numel(), generator=generator, device=device).to(logits.device)
    return sample_with(logits, [sampling] * logits.shape[0], uniform)


@dataclass
class Prefix:
    """A prompt prefix shared by several prompts (C-Eval's header and shots, a system prompt), run
    through the model once: its ids and every layer's keys and values [1, kv heads, len, head_dim]."""
    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@torch.inference_mode()
def compute_prefix(model: InternLM, ids: list[int]) -> Prefix:
    """Run `ids` once (batch 1) and keep its KV cache, to be copied under each prompt that follows it."""
    if not ids:
        raise ValueError("an empty prefix")
    model.setup_cache(1, len(ids))
    positions = torch.arange(len(ids), device=model.device).unsqueeze(0)
    model(torch.tensor([ids], device=model.device), positions, None, 0)
    keys, values = model.cache_prefix(len(ids))
    return Prefix(list(ids), keys, values)


def prefill_inputs(prompts: list[list[int]], pad_id: int, capacity: int, device, prefix_len: int = 0):
    """Left-padded ids [B, L], key validity [B, capacity], rotary positions [B, L], mask
    [B, 1, L, prefix_len + L] (None when no prompt is padded and there is no prefix: SDPA's causal
    fast path, in prefill and decode alike). With a prefix, cache slots [0, prefix_len) hold it and the
    prompts (padded on the left, after it) continue its positions."""
    P = prefix_len
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = max(len(p) for p in prompts)  # from the host's list: no device read
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), capacity, dtype=torch.bool, device=device)
    valid[:, :P] = True
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        valid[row, P + width - len(prompt):P + width] = True
    positions = (valid[:, :P + width].cumsum(-1) - 1).clamp(min=0)[:, P:]
    # Query i sits at slot P + i and sees keys up to it. A padding query attends to itself only: never a
    # fully masked row, whose NaNs would reach the cache and poison real rows through 0 * NaN.
    causal = torch.ones(width, P + width, dtype=torch.bool, device=device).tril(diagonal=P)
    itself = torch.arange(P + width, device=device)[None, :] == torch.arange(width, device=device)[:, None] + P
    mask = (causal & valid[:, None, None, :P + width]) | itself
    padded = P > 0 or any(len(p) != width for p in prompts)
    return ids, valid, positions, mask if padded else None, lengths


def _through_first_stop(row: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


def all_finished(finished: torch.Tensor) -> bool:
    """The decode loop's one device-to-host read (a sync on an accelerator)."""
    return bool(finished.all())


@torch.inference_mode()
def generate(model: InternLM, prompts: list[list[int]], max_new_tokens: int, eos_id: int | Sequence[int],
             pad_id: int = 0, sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
             profile: bool = False, prefix: Prefix | None = None) -> Generation:
    """Generate up to max_new_tokens per prompt, a sequence ending at any id of `eos_id` (an id or a
    list: chat models end turns with a second EOS); eos_id=-1 never stops early (benchmarks).

    The decode loop reads nothing back from the device: tokens stay there until the end, and whether
    every sequence has ended is looked at every `eos_check_interval` steps (never with eos_id=-1), so
    on an accelerator the host queues step n+1 while step n runs. Unless profiling, the only waits
    are the clock reads around the first token and the final copy of the tokens.

    prefix: a Prefix every prompt continues (prompts are then what follows it); its keys and values
    are copied under each row instead of being computed again.
    """
    if not prompts or max_new_tokens < 1:
        raise ValueError("generate needs at least one prompt and max_new_tokens >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token (BOS)")
    stops = [e for e in ([eos_id] if isinstance(eos_id, int) else list(eos_id)) if e >= 0]
    device = model.device
    P = len(prefix.ids) if prefix else 0
    width = max(len(p) for p in prompts)
    model.setup_cache(len(prompts), P + width + max_new_tokens)
    if prefix:
        model.load_prefix(prefix.keys, prefix.values)
    ids, valid, positions, mask, lengths = prefill_inputs(prompts, pad_id, model.max_seq, device, P)
    broadcast = sampling.temperature > 0 and dist.is_initialized() and dist.get_world_size() > 1

    def pick(logits):
        token = choose(logits[:, -1], sampling, generator)
        if broadcast:  # every rank must continue with the same tokens
            dist.broadcast(token, src=0)
        return token

    synchronize(device)
    t0 = time.perf_counter()
    token = pick(model(ids, positions, mask, P))
    synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3

    out = [token]
    stop_ids = torch.tensor(stops or [-1], device=device)
    finished = torch.isin(token, stop_ids)
    phases = torch.zeros(3, dtype=torch.float64)  # pre, forward, post (profile only)

    def clock() -> float:
        if profile:
            synchronize(device)
        return time.perf_counter()

    # Every row continues after the last slot of the left-padded batch, each at its own position.
    state = model.step
    state.valid.copy_(valid)
    torch.add(lengths, P, out=state.positions)
    state.slots.fill_(P + width)
    if getattr(model, "graphs", None) is not None:
        model.graphs.prepare(state)  # a capture (and its warm-up steps) is not a decode step: before the clock
    check_every = eos_check_interval(device.type)
    steps, t1 = 0, time.perf_counter()
    for step in range(1, max_new_tokens):
        if stops and (step - 1) % check_every == 0 and all_finished(finished):
            break
        ta = clock()
        state.tokens.copy_(token)
        tb = clock()
        logits = model.decode(state)
        tc = clock()
        token = pick(logits).masked_fill(finished, stops[0] if stops else -1)
        out.append(token)
        finished |= torch.isin(token, stop_ids)
        steps += 1
        if profile:
            phases += torch.tensor([tb - ta, tc - tb, clock() - tc], dtype=torch.float64)
    synchronize(device)
    next_ms = (time.perf_counter() - t1) * 1e3 / steps if steps else float("nan")
    pre_ms, forward_ms, post_ms = (phases * 1e3 / steps).tolist() if profile and steps else [float("nan")] * 3

    table = torch.stack(out, dim=1).tolist()
    tokens = [_through_first_stop(row, stops) for row in table]
    return Generation(tokens, first_ms, next_ms, steps, pre_ms, forward_ms, post_ms)


@torch.inference_mode()
def admit(model: InternLM, row: int, ids: list[int], every_position: bool = False) -> torch.Tensor:
    """Prefill `ids` alone into row `row` of the cache (slots [0, len)) while the other rows stay where
    they are in their own sequences, and point the row's decode inputs after it. Returns the logits
    [vocab] of its next token ([len, vocab], one per position, with every_position: a prompt's own
    log-probabilities); that token is the caller's to put in model.step.tokens[row]."""
    if not ids or len(ids) >= model.max_seq:
        raise ValueError(f"a prompt of {len(ids)} tokens does not fit a cache of {model.max_seq} slots")
    with model.cache_rows(row, row + 1):
        positions = torch.arange(len(ids), device=model.device).unsqueeze(0)
        logits = model(torch.tensor([ids], device=model.device), positions, None, 0, last_only=not every_position)
    point_after(model, row, len(ids))
    return logits[0] if every_position else logits[0, -1]


def point_after(model: InternLM, row: int, length: int) -> None:
    """Row `row`'s decode inputs after a sequence of `length` tokens in its slots [0, length)."""
    state = model.step
    state.valid[row] = False
    state.valid[row, :length] = True
    state.positions[row] = length
    state.slots[row] = length


@torch.inference_mode()
def next_token_logits(model: InternLM, prompts: list[list[int]], pad_id: int = 0,
                      prefix: Prefix | None = None) -> torch.Tensor:
    """Float32 logits [B, vocab] of the token after each (left-padded) prompt: one prefill, no decode.
    With a prefix, the prompts are what follows it."""
    P = len(prefix.ids) if prefix else 0
    width = max(len(p) for p in prompts)
    model.setup_cache(len(prompts), P + width)
    if prefix:
        model.load_prefix(prefix.keys, prefix.values)
    ids, _, positions, mask, _ = prefill_inputs(prompts, pad_id, P + width, model.device, P)
    return model(ids, positions, mask, P)[:, -1].float()


def shared_prefix(prompts: list[list[int]], minimum: int = 1) -> int:
    """Length of the longest common prefix of token lists, leaving every prompt at least one token of
    its own (0 when shorter than `minimum`: not worth a separate pass)."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n >= minimum else 0
