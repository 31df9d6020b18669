"""The precision task with and without prefix reuse (task.prefix_cache), side by side in one run.

Runs `launch/run.py task=precision` through torchrun with and without reuse on the same subjects, model
and settings, in --rounds K alternated rounds (with/without, then without/with, ...: the host's fast
and slow spells fall on both alike), then prints each way's wall time (median and range over the
rounds), the per-round ratio's median and range, the prompt tokens each sent through the layers (from
the task's log), the predictions compared one by one in every round, and the largest difference of
the A/B/C/D logits between the two ways of computing them (in-process, float32, on the first subject).

    python bench/ceval.py [--rounds 5] [--model 830m|tiny] [--subjects a,b,c|all] [--batch-size 8]
                          [--world-size 1] [--protocol official|atb] [--data-dir DIR] [--workdir DIR] [--json F]

Data: --data-dir, else $INTERNLM_TP_CEVAL_DIR, else the built-in demo questions (not C-Eval).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode import SHAPE, cpu_description, shown  # noqa: E402
from launch.precision import answer_ids, encode_prompt  # noqa: E402
from tp import ceval  # noqa: E402
from tp.demo_data import is_demo_set, write_demo_set  # noqa: E402
from tp.generate import compute_prefix, next_token_logits, shared_prefix  # noqa: E402
from tp.load import load_model  # noqa: E402
from tp.tiny import write_tiny_checkpoint  # noqa: E402
from tp.tokenizer import Tokenizer  # noqa: E402


def run_task(ckpt, data, subjects, args, reuse: bool, run_dir: Path) -> tuple[float, list[dict], str]:
    shutil.rmtree(run_dir, ignore_errors=True)  # a cache left there would be resumed, not recomputed
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(args.world_size),
           str(ROOT / "launch" / "run.py"), "task=precision", f"model.path={ckpt}", f"task.data_dir={data}",
           f"task.subjects=[{','.join(subjects)}]", f"task.batch_size={args.batch_size}", "dtype=float32",
           f"task.protocol={args.protocol}", f"task.prefix_cache={str(reuse).lower()}", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    with open(run_dir / "test_result" / "cache0.csv", newline="", encoding="utf-8") as fh:
        return seconds, list(csv.DictReader(fh)), proc.stdout + proc.stderr


@torch.inference_mode()
def largest_logit_difference(ckpt, data, subject, batch_size) -> tuple[float, int]:
    """max |letter logits with reuse - without| over one subject's questions, and how many there were."""
    model, tok = load_model(ckpt, dtype="float32"), Tokenizer(ckpt)
    mapping, letters = ceval.load_mapping(data), answer_ids(tok, "答案：")
    shots = ceval.load_split(data, subject, "dev")
    prompts = [encode_prompt(tok, "official", mapping, shots, q, model.cfg.max_position_embeddings)[0]
               for q in ceval.load_split(data, subject, "val")]
    P = shared_prefix(prompts, 16)
    prefix = compute_prefix(model, prompts[0][:P])
    worst = 0.0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        plain = next_token_logits(model, batch)[:, letters]
        reused = next_token_logits(model, [p[P:] for p in batch], prefix=prefix)[:, letters]
        worst = max(worst, (plain - reused).abs().max().item())
    return worst, len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="830m", choices=["830m", "tiny"])
    ap.add_argument("--subjects", default=None, help="comma-separated, or all (default: 3 of the data set)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--protocol", default="official", choices=["official", "atb"])
    ap.add_argument("--data-dir", default=os.environ.get("INTERNLM_TP_CEVAL_DIR"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ceval-"))
    data = Path(args.data_dir) if args.data_dir else write_demo_set(work / "demo-questions")
    ckpt = work / args.model
    if not (ckpt / "config.json").is_file():
        write_tiny_checkpoint(ckpt, shards=4, **(SHAPE if args.model == "830m" else {}))
    mapping = ceval.load_mapping(data)
    subjects = (sorted(mapping) if args.subjects == "all" else args.subjects.split(",") if args.subjects
                else sorted(mapping)[:3])
    print(f"CPU: {cpu_description()}")
    print(f"{'built-in demo questions (NOT C-Eval)' if is_demo_set(data) else 'C-Eval val'}: {len(subjects)} subject(s), "
          f"model {args.model}, TP={args.world_size}, batch {args.batch_size}, protocol {args.protocol}, float32")
    seconds = {True: [], False: []}
    identical = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        results = {reuse: run_task(ckpt, data, subjects, args, reuse, work / f"run-{reuse}") for reuse in order}
        for reuse in order:
            seconds[reuse].append(results[reuse][0])
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(results[True][1], results[False][1]))
        identical.append(same)
        print(f"  round {r + 1}: wall with reuse {results[True][0]:.1f} s, without {results[False][0]:.1f} s; "
              f"predictions identical {same}/{len(results[True][1])}", flush=True)
    for reuse, (_, rows, log) in results.items():
        m = re.search(r"prompt tokens through the layers: (\d+) with prefix reuse (on|off), (\d+) without "
                      r".*; (\d+) computed with", log)
        print(f"  prefix_cache={str(reuse).lower():5} wall {shown(seconds[reuse], 1)} s, {len(rows)} questions, "
              f"prompt tokens through the layers {m.group(1) if m else '?'} (of {m.group(3) if m else '?'}; "
              f"{m.group(4) if m else '?'} with left padding)")
    print(f"  predictions identical: {min(identical)}/{len(results[True][1])} in every round; "
          f"order identical: {[(r['subject'], r['id']) for r in results[True][1]] == [(r['subject'], r['id']) for r in results[False][1]]}")
    ratios = [b / a for a, b in zip(seconds[True], seconds[False])]
    print(f"  wall time without / with reuse, per round: {shown(ratios, 2)}x  (bar >= 3 on the 830M model)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "subjects": subjects, "seconds_with": seconds[True],
                                               "seconds_without": seconds[False], "ratios": ratios,
                                               "identical": identical, "questions": len(results[True][1])}, indent=1))
    if args.protocol == "official":
        worst, n = largest_logit_difference(ckpt, data, subjects[0], args.batch_size)
        print(f"  largest |A/B/C/D logit difference| with vs without reuse ({subjects[0]}, {n} questions): {worst:.3g}")


if __name__ == "__main__":
    main()
