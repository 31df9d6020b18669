"""task=inference: warm-up, then the prompts, `task.batch_size` at a time; rank 0 writes inference.jsonl."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from launch.session import Session, UserError
from launch.tasks import batches, positive_int
from tp.generate import Sampling, compute_prefix, generate, shared_prefix

log = logging.getLogger("internlm_tp")


def _sampling(task: DictConfig) -> Sampling:
    if not task.get("do_sample", False):
        return Sampling()
    return Sampling(float(task.temperature), float(task.top_p), int(task.top_k))


def run(cfg: DictConfig, session: Session, out_dir: Path) -> None:
    task = cfg.task
    raw = task.get("prompts")
    prompts = [raw] if isinstance(raw, str) else [str(p) for p in raw or []]
    if not prompts:
        raise UserError("task.prompts is empty: give at least one prompt")
    batch_size, max_new = positive_int(task, "batch_size"), positive_int(task, "max_new_tokens")
    model, tok = session.model_for(cfg)
    limit = model.cfg.max_position_embeddings
    system = str(task.get("system_prompt") or "")
    encoded = []
    for text in prompts:
        ids = tok.encode(system + text)
        if len(ids) + max_new > limit:
            raise UserError(f"prompt of {len(ids)} tokens + task.max_new_tokens={max_new} exceeds "
                            f"the model's context of {limit} tokens: shorten the prompt")
        encoded.append(ids)
    sampling, gen = _sampling(task), session.generator(cfg.seed)
    if int(task.get("warmup_tokens", 0)) > 0:
        generate(model, encoded[:1], int(task.warmup_tokens), model.cfg.stop_ids, sampling=sampling, generator=gen)
    # A system prompt every prompt starts with is run once, its KV cache reused under every batch.
    P = shared_prefix(encoded, 16) if system else 0
    prefix = compute_prefix(model, encoded[0][:P]) if P else None
    rows = []
    for batch_text, batch_ids in zip(batches(prompts, batch_size), batches(encoded, batch_size)):
        result = generate(model, [ids[P:] for ids in batch_ids], max_new, model.cfg.stop_ids, sampling=sampling,
                          generator=gen, prefix=prefix)
        for text, ids in zip(batch_text, result.tokens):
            rows.append({"prompt": text, "output": tok.decode(ids), "output_ids": ids,
                         "first_token_ms": round(result.first_token_ms, 3),
                         "next_token_ms": round(result.next_token_ms, 3) if result.decode_steps else None})
    if session.dist.is_main:
        path = out_dir / "inference.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        for row in rows:
            print(f"### prompt: {row['prompt']}\n### output: {row['output']}\n"
                  f"    first token {row['first_token_ms']} ms, next token {row['next_token_ms']} ms", flush=True)
        log.info("wrote %s", path)

