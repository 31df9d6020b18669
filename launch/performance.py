"""task=performance: first-token and next-token latency over a grid of batch x input x output lengths.

As the Ascend reference: random prompts, a warm-up, device-synchronised clocks, each time the
maximum over ranks. The decode loop is timed without syncs inside it; the pre / forward / post split
comes from a second, profiled pass. Rank 0 writes performance_test_{device}_{model}.csv into the run directory.
"""
from __future__ import annotations

import csv
import itertools
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launch.session import Session, UserError
from launch.tasks import int_list
from tp.generate import generate
from tp.routing import reduction_dtype

log = logging.getLogger("internlm_tp")

COLUMNS = ["batch_size", "input_seq_len(Encoding)", "output_seq_len(Decoding)", "ResponseTime(s)",
           "forward_first_token_time(ms)", "forward_next_token_time(ms)", "pre_next_token_time(ms)",
           "post_next_token_time_post(ms)", "tokens_per_s", "weight_GBps"]


def random_prompts(batch: int, length: int, vocab: int, eos_id: int, generator: torch.Generator) -> list[list[int]]:
    """Random ids in [3, vocab) other than EOS (so never BOS/EOS/UNK), identical on every rank."""
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    return ids.masked_fill(ids == eos_id, 3 if eos_id != 3 else 4).tolist()


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=reduction_dtype(device.type), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def model_label(cfg: DictConfig, overrides: list[str]) -> str:
    """The CSV's model name: `model.name` when the user chose a `model=` config, else the checkpoint
    directory's name (the default config's name says nothing about the checkpoint at model.path)."""
    if any(o.lstrip("+~").startswith("model=") for o in overrides):
        return str(cfg.model.name)
    return Path(str(cfg.model.path)).resolve().name


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: DictConfig, session: Session, out_dir: Path) -> None:
    task = cfg.task
    grid = list(itertools.product(int_list(task, "batch_size"), int_list(task, "input_len"),
                                  int_list(task, "output_len")))
    model, tok = session.model_for(cfg)
    limit = model.cfg.max_position_embeddings
    for _, n_in, n_out in grid:
        if n_in + n_out > limit:
            raise UserError(f"task.input_len {n_in} + task.output_len {n_out} exceeds the model's context of {limit}")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    vocab = min(tok.vocab_size, model.cfg.vocab_size)
    warm = random_prompts(grid[0][0], min(grid[0][1], 16), vocab, tok.eos_id, gen)
    generate(model, warm, 4, eos_id=-1)  # first calls allocate and pick kernels: not timed
    rows = []
    for batch, n_in, n_out in grid:
        prompts = random_prompts(batch, n_in, vocab, tok.eos_id, gen)
        # Timed as it runs: no device sync inside the decode loop. -1: exactly n_out tokens.
        result = generate(model, prompts, n_out, eos_id=-1)
        steps = result.decode_steps
        response_s = (result.first_token_ms + (result.next_token_ms * steps if steps else 0.0)) / 1e3
        # forward / pre / post: the decode step's forward pass, input preparation and token choice,
        # from a second, profiled pass (its syncs would slow the timed one on an accelerator).
        split = generate(model, prompts, n_out, eos_id=-1, profile=True) if steps else None
        response_s, first, nxt, fwd, pre, post = _max_over_ranks(
            [response_s, result.first_token_ms, *([result.next_token_ms, split.forward_ms, split.pre_ms,
                                                   split.post_ms] if steps else [0.0] * 4)], session.dist.device)
        rows.append({
            "batch_size": batch, "input_seq_len(Encoding)": n_in, "output_seq_len(Decoding)": n_out,
            "ResponseTime(s)": round(response_s, 6), "forward_first_token_time(ms)": round(first, 4),
            "forward_next_token_time(ms)": round(fwd, 4), "pre_next_token_time(ms)": round(pre, 4),
            "post_next_token_time_post(ms)": round(post, 4),
            "tokens_per_s": round(batch * n_out / response_s, 3),
            "weight_GBps": round(model.decode_weight_bytes(batch) / (nxt * 1e6), 3) if nxt > 0 else 0.0,
        })
        if session.dist.is_main:
            log.info("batch %d, in %d, out %d: first token %.2f ms, next token %.3f ms, %.1f tokens/s",
                     batch, n_in, n_out, first, nxt, rows[-1]["tokens_per_s"])
    if session.dist.is_main:
        path = out_dir / f"performance_test_{session.dist.kind}_{model_label(cfg, _overrides())}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        log.info("wrote %s", path)
