"""task=precision: C-Eval accuracy by subject and by category (SPEC §3).

protocol=official: answer-only k-shot prompt, prediction = argmax of the next-token logits over the
pieces A/B/C/D. protocol=atb: the Ascend reference's own script (English header, `Answer:`, first
letter of a 32-token greedy generation). Every rank computes; rank 0 appends each batch to
test_result/cache0.csv, so a killed run resumes where it stopped, and writes the accuracies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from launch.session import Session, UserError
from launch.tasks import positive_int
from tp import ceval
from tp.demo_data import is_demo_set
from tp.generate import compute_prefix, generate, next_token_logits, shared_prefix
from tp.partition import model_files_dir

log = logging.getLogger("internlm_tp")

ATB_MAX_PROMPT_TOKENS = 2000
ATB_NEW_TOKENS = 32
MIN_PREFIX_TOKENS = 16  # a shorter shared prefix is not worth its own pass
HUB_DATASET = "ceval/ceval-exam"
DATA_ENV = "INTERNLM_TP_CEVAL_DIR"


def resolve_data_dir(configured: str | None) -> Path:
    """task.data_dir, else $INTERNLM_TP_CEVAL_DIR, else the copy cached by an earlier download, else the
    hub's (downloaded once, by rank 0; with several nodes, give task.data_dir on a shared file system)."""
    if configured:
        return ceval.check_data_dir(configured)
    if os.environ.get(DATA_ENV):
        return ceval.check_data_dir(os.environ[DATA_ENV])
    target = Path.home() / ".cache" / "internlm-tp" / "ceval"
    return Path(_from_rank0(lambda: str(fetch_from_hub(target))))


def fetch_from_hub(target: Path) -> Path:
    """The official data from the hub (`datasets`), written in the official csv layout into a
    temporary sibling and renamed into place, so an interrupted download is never taken as data."""
    if (target / "val").is_dir():
        return ceval.check_data_dir(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        from datasets import load_dataset
        for subject in ceval.load_mapping(None):
            data = load_dataset(HUB_DATASET, subject)
            for split in ("dev", "val"):
                (partial / split).mkdir(parents=True, exist_ok=True)
                data[split].to_csv(str(partial / split / f"{subject}_{split}.csv"), index=False)
    except Exception as err:  # no `datasets`, offline, or the hub refused
        raise ceval.CevalError(
            f"C-Eval data not found locally and not downloadable ({type(err).__name__}: {err}). Put the official "
            f"ceval-exam files (dev/{{subject}}_dev.csv, val/{{subject}}_val.csv, subject_mapping.json) in a "
            f"directory and pass task.data_dir=DIR (or set {DATA_ENV}=DIR), or put them in {target}") from err
    partial.rename(target)
    return ceval.check_data_dir(target)


def data_checksum(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(data_dir.glob("*/*.csv")):
        digest.update(path.relative_to(data_dir).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(cfg: DictConfig, data_dir: Path, rank_files: Path) -> dict:
    """What the cached answers depend on; a resume with any of it changed is refused."""
    config = hashlib.sha256((rank_files / "config.json").read_bytes()).hexdigest()[:16]
    return {"model": str(Path(cfg.model.path).resolve()), "model_config": config, "dtype": str(cfg.dtype),
            "data": data_checksum(data_dir), "protocol": str(cfg.task.protocol), "shots": int(cfg.task.shots)}


def _from_rank0(make):
    """Run `make` on rank 0 and hand its result (or its error) to every rank, so a refusal on rank 0
    ends every rank with the same message instead of leaving the others waiting."""
    payload = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            payload = [("ok", make())]
        except (ceval.CevalError, OSError) as err:
            payload = [("error", str(err))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    status, result = payload[0]
    if status == "error":
        raise UserError(result)
    return result


def run(cfg: DictConfig, session: Session, out_dir: Path) -> None:
    task = cfg.task
    protocol = str(task.protocol)
    if protocol not in ("official", "atb"):
        raise UserError(f"task.protocol={protocol!r}: expected official or atb")
    batch_size = positive_int(task, "batch_size")
    shots = task.shots
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise UserError(f"task.shots must be an integer >= 0, got {shots!r}")
    try:
        data_dir = resolve_data_dir(task.get("data_dir"))
        mapping = ceval.load_mapping(data_dir)
        raw = task.get("subjects")
        subjects = ceval.resolve_subjects(mapping, OmegaConf.to_object(raw) if OmegaConf.is_config(raw) else raw)
        questions = {s: ceval.load_split(data_dir, s, "val") for s in subjects}
        dev = {s: ceval.load_split(data_dir, s, "dev")[:shots] for s in subjects}
    except ceval.CevalError as err:
        raise UserError(str(err)) from err

    demo = is_demo_set(data_dir)
    if demo and session.dist.is_main:
        log.warning("%s holds the project's built-in demo questions, NOT C-Eval: the score below only shows "
                    "that the pipeline runs; pass task.data_dir=DIR for the real data", data_dir)
    model, tok = session.model_for(cfg)
    letter_ids = answer_ids(tok, "答案：")
    if protocol == "official" and None in letter_ids:
        raise UserError(f"the tokenizer has no piece for {[c for c, i in zip(ceval.CHOICES, letter_ids) if i is None]}: "
                        f"the official protocol reads the logits of the bare letters A, B, C, D")
    rank_files = model_files_dir(cfg.model.path, session.dist.rank)
    identity = {**fingerprint(cfg, data_dir, rank_files), "quantize": model.quantize,
                "quantize_lm_head": model.quantize_lm_head, "quantize_embedding": model.quantize_embedding}
    cache = None

    def open_cache():
        nonlocal cache
        cache = ceval.ResultCache(out_dir / "test_result", identity)
        return sorted(cache.done())

    done = {tuple(k) for k in _from_rank0(open_cache)}
    pending = [q for s in subjects for q in questions[s] if (q.subject, q.id) not in done]
    if session.dist.is_main and done:
        log.info("resuming: %d answered questions read from the cache, %d to ask", len(done), len(pending))

    context = model.cfg.max_position_embeddings
    reuse = bool(task.get("prefix_cache", True))
    tokens = {"through": 0, "whole": 0, "padded": 0}
    bar = tqdm(total=len(pending), unit="q", desc=f"C-Eval {protocol}", disable=not session.dist.is_main)
    for subject in subjects:
        todo = [q for q in questions[subject] if (q.subject, q.id) not in done]
        if not todo:
            continue
        encoded = {q.id: encode_prompt(tok, protocol, mapping, dev[subject], q, context) for q in questions[subject]}
        # The subject's shared prefix (header + shots) over every question that kept all its shots,
        # all of them, answered or not, so a resumed run splits prompts as an uninterrupted one.
        full = [ids for ids, used in encoded.values() if used == len(dev[subject])]
        P = shared_prefix(full, MIN_PREFIX_TOKENS) if reuse else 0
        prefix = compute_prefix(model, full[0][:P]) if P else None
        if prefix:
            tokens["through"] += P
            tokens["padded"] += P

        def with_prefix(q) -> bool:
            return bool(P) and encoded[q.id][1] == len(dev[subject])

        # Shortest prompts first (stable), so a batch carries little left padding.
        todo.sort(key=lambda q: (not with_prefix(q), len(encoded[q.id][0])))
        for batch in subject_batches(todo, batch_size, with_prefix):
            shared = prefix if with_prefix(batch[0]) else None
            prompts = [encoded[q.id][0][P:] if shared else encoded[q.id][0] for q in batch]
            tokens["whole"] += sum(len(encoded[q.id][0]) for q in batch)
            tokens["through"] += sum(len(p) for p in prompts)
            tokens["padded"] += len(prompts) * max(len(p) for p in prompts)
            if protocol == "official":
                logits = next_token_logits(model, prompts, prefix=shared)[:, letter_ids]
                predictions = [ceval.CHOICES[i] for i in logits.argmax(dim=-1).tolist()]
            else:
                result = generate(model, prompts, ATB_NEW_TOKENS, model.cfg.stop_ids, prefix=shared)
                predictions = [ceval.first_letter(tok.decode(ids)) or "-1" for ids in result.tokens]
            if session.dist.is_main:
                cache.append([{"subject": q.subject, "id": q.id, "answer": q.answer, "prediction": p,
                               "correct": p == q.answer} for q, p in zip(batch, predictions)])
            bar.update(len(batch))
    bar.close()
    if session.dist.is_main and tokens["whole"]:
        log.info("prompt tokens through the layers: %d with prefix reuse %s, %d without (%.2fx fewer); "
                 "%d computed with the batches' left padding", tokens["through"], "on" if reuse else "off",
                 tokens["whole"], tokens["whole"] / tokens["through"], tokens["padded"])

    if session.dist.is_main:
        rows = [r for r in cache.rows() if r["subject"] in questions]
        subject_acc, classes_acc = ceval.score(rows, mapping)
        result_dir = out_dir / "test_result"
        (result_dir / "result_0_subject_acc.json").write_text(json.dumps(subject_acc, indent=2, ensure_ascii=False))
        (result_dir / "result_0_classes_acc.json").write_text(json.dumps(classes_acc, indent=2))
        if demo:
            print("Built-in demo questions (tp/demo_data.py), NOT C-Eval:", flush=True)
        print(ceval.format_table(classes_acc), flush=True)
        log.info("%s (%s, %d-shot) over %d questions of %d subjects: results in %s",
                 "demo questions" if demo else "C-Eval", protocol, shots, len(rows), len(subject_acc), result_dir)


def answer_ids(tok, prompt: str) -> list[int | None]:
    """The ids whose next-token logits decide the official protocol's answer: for each letter, the token
    that prompt + letter ends in when the letter adds exactly one token (sentencepiece's bare `A`, or a
    BPE vocabulary's own token for it in that place), else the bare piece (None if there is none)."""
    base = tok.encode(prompt)
    ids = []
    for letter in ceval.CHOICES:
        full = tok.encode(prompt + letter)
        ids.append(full[-1] if len(full) == len(base) + 1 and full[:-1] == base else tok.piece_id(letter))
    return ids


def subject_batches(todo: list, size: int, with_prefix) -> list[list]:
    """Batches of at most `size` questions in the given order, each all with the shared prefix or all
    without (questions whose shots had to be dropped have their own prompt from the start)."""
    out: list[list] = []
    for q in todo:
        if out and len(out[-1]) < size and with_prefix(out[-1][0]) == with_prefix(q):
            out[-1].append(q)
        else:
            out.append([q])
    return out


def encode_prompt(tok, protocol: str, mapping, shots: list, question, context: int) -> tuple[list[int], int]:
    """(token ids of the question's prompt, shots it kept): shots dropped from the end until it fits."""
    if protocol == "official":
        info = mapping[question.subject]

        def make(k):
            return ceval.official_prompt(info, k, question)

        def fits(text):
            return len(tok.encode(text)) <= context
    else:
        def make(k):
            return ceval.atb_prompt(question.subject, k, question)

        def fits(text):
            n = len(tok.encode(text))
            return n <= ATB_MAX_PROMPT_TOKENS and n + ATB_NEW_TOKENS <= context
    text, used = ceval.fit_prompt(make, shots, fits)
    ids = tok.encode(text)
    limit = context - (ATB_NEW_TOKENS if protocol == "atb" else 0)
    if len(ids) > limit:  # even with no shot: keep the end, where the question and "答案：" are
        ids = ids[:1] + ids[len(ids) - limit + 1:]
    return ids, used

