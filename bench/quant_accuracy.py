"""What int8 weights cost in accuracy: C-Eval (official protocol) on the test fixture in float32,
bfloat16 and int8, against float32.

Random tiny models have small margins between answer logits, so bfloat16 (whose only change is
rounding) is the yardstick: int8's agreement with float32 should be within 3 points of bfloat16's.
Prints, per variant, how often its answer equals float32's, its accuracy, and the max / mean
absolute error of its next-token logits against float32's.

    python bench/quant_accuracy.py [--subjects all|a,b,...] [--batch-size 8] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.precision import encode_prompt  # noqa: E402
from tp import ceval  # noqa: E402
from tp.generate import next_token_logits  # noqa: E402
from tp.load import load_model  # noqa: E402
from tp.demo_data import is_demo_set, write_demo_set  # noqa: E402
from tp.tiny import write_tiny_checkpoint  # noqa: E402
from tp.tokenizer import Tokenizer  # noqa: E402

VARIANTS = {  # label: (activation dtype, weights)
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int8 (bf16 activations)": ("bfloat16", "int8"),
    "int8 (fp32 activations)": ("float32", "int8"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="all")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--data-dir", default=os.environ.get("INTERNLM_TP_CEVAL_DIR"),
                    help="C-Eval in the official layout (default $INTERNLM_TP_CEVAL_DIR, else the built-in demo set)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        data = Path(args.data_dir) if args.data_dir else write_demo_set(work / "demo-questions")
        mapping = ceval.load_mapping(data)
        subjects = ceval.resolve_subjects(mapping, None if args.subjects == "all" else args.subjects)
        ckpt = work / "tiny"
        if not (ckpt / "config.json").is_file():
            write_tiny_checkpoint(ckpt)
        tok = Tokenizer(ckpt)
        letters = [tok.piece_id(c) for c in ceval.CHOICES]
        questions, prompts = [], []
        for s in subjects:
            shots = ceval.load_split(data, s, "dev")
            for q in ceval.load_split(data, s, "val"):
                questions.append(q)
                prompts.append(encode_prompt(tok, "official", mapping, shots, q, 2048)[0])
        logits = {}
        for label, (dtype, quantize) in VARIANTS.items():
            model = load_model(ckpt, dtype=dtype, quantize=quantize)
            logits[label] = torch.cat([next_token_logits(model, prompts[i:i + args.batch_size])
                                       for i in range(0, len(prompts), args.batch_size)])
            del model
        answers = {k: [ceval.CHOICES[i] for i in v[:, letters].argmax(-1).tolist()] for k, v in logits.items()}
        truth = [q.answer for q in questions]
        source = "built-in demo questions (NOT C-Eval)" if is_demo_set(data) else "C-Eval val"
        print(f"{source}, official 5-shot, {len(questions)} questions of {len(subjects)} subjects, tiny random model")
        print(f"{'':26}{'agree w/ fp32':>14}{'accuracy':>10}{'max |dlogit|':>14}{'mean |dlogit|':>15}")
        agreement = {}
        for label in VARIANTS:
            agreement[label] = 100 * sum(a == b for a, b in zip(answers[label], answers["float32"])) / len(questions)
            accuracy = 100 * sum(a == t for a, t in zip(answers[label], truth)) / len(questions)
            err = (logits[label] - logits["float32"]).abs()
            print(f"{label:26}{agreement[label]:13.2f}%{accuracy:9.2f}%{err.max().item():14.4f}{err.mean().item():15.4f}")
        gap = agreement["bfloat16"] - agreement["int8 (bf16 activations)"]
        print(f"bfloat16 agreement - int8 agreement = {gap:.2f} points  (bar <= 3)  {'PASS' if gap <= 3 else 'FAIL'}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
