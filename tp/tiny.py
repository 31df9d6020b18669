"""A tiny random InternLM checkpoint in the exact published layout, for tests and `make demo`.

Same files as internlm/internlm-7b: InternLM config keys, `pytorch_model-0000k-of-0000n.bin` shards
with `pytorch_model.bin.index.json`, `rotary_emb.inv_freq` buffers in the shards, a sentencepiece
`tokenizer.model` (trained here on text the project generates, tp/demo_data.py: unk 0 / bos 1 / eos 2)
and the tokenizer json files.
The vocabulary (4999) is divisible by neither 2, 3 nor 4, and the 12 heads split over 1, 2, 3 or 4
ranks. Weights are drawn large enough that greedy choices differ from prompt to prompt.

    python -m tp.tiny OUTPUT_DIR [--shards 3] [--dtype float32]
"""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import sentencepiece as spm
import torch

from tp.demo_data import tokenizer_text

TINY_CONFIG = {
    "architectures": ["InternLMForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                 "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
    "bias": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "hidden_act": "silu", "hidden_size": 192, "intermediate_size": 480, "initializer_range": 0.02,
    "max_position_embeddings": 2048, "model_type": "internlm", "num_attention_heads": 12,
    "num_hidden_layers": 3, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.33.1", "use_cache": True, "vocab_size": 4999,
}


def train_tokenizer(vocab_size: int) -> bytes:
    """A LLaMA-style sentencepiece BPE model (identity normalisation, byte fallback, split digits),
    trained on the project's own generated text, so the same bytes come out on every machine."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_text()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", character_coverage=0.9995,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def random_weights(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    sd = {"model.embed_tokens.weight": normal(v, h, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{proj}.weight"] = normal(h, h, std=1 / math.sqrt(h))
            sd[p + f"self_attn.{proj}.bias"] = normal(h, std=0.1)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        sd[p + "mlp.up_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        sd[p + "mlp.down_proj.weight"] = normal(h, inter, std=1 / math.sqrt(inter))
        sd[p + "input_layernorm.weight"] = (1 + normal(h, std=0.1)).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + normal(h, std=0.1)).to(dtype)
        half = h // heads
        sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    sd["model.norm.weight"] = (1 + normal(h, std=0.1)).to(dtype)
    sd["lm_head.weight"] = normal(v, h, std=3 / math.sqrt(h))
    return sd


def write_bin_shards(out: Path, sd: dict[str, torch.Tensor], shards: int) -> None:
    """`pytorch_model-0000k-of-0000n.bin` + index, tensors in checkpoint order, as transformers saves."""
    names = list(sd)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n].contiguous() for n in names[k * per:(k + 1) * per]}
        torch.save(part, out / file)
        for n, t in part.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoint(out: str | Path, shards: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0,
                          **overrides) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_CONFIG, **overrides, "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "tokenizer.model").write_bytes(train_tokenizer(min(cfg["vocab_size"], 4999)))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_bin_shards(out, random_weights(cfg, seed, dtype), shards)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "InternLMTokenizer"}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    path = write_tiny_checkpoint(args.output_dir, args.shards, getattr(torch, args.dtype))
    print(f"tiny InternLM checkpoint written to {path}")


if __name__ == "__main__":
    main()
