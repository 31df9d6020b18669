"""A tiny random InternLM checkpoint in the exact published layout, for tests and `make demo`.

Same files as internlm/internlm-7b: InternLM config keys, `pytorch_model-0000k-of-0000n.bin` shards
with `pytorch_model.bin.index.json`, `rotary_emb.inv_freq` buffers in the shards, a sentencepiece
`tokenizer.model` (trained here on text the project generates, tp/demo_data.py: unk 0 / bos 1 / eos 2)
and the tokenizer json files.
The vocabulary (4999) is divisible by neither 2, 3 nor 4, and the 12 heads split over 1, 2, 3 or 4
ranks. Weights are drawn large enough that greedy choices differ from prompt to prompt.

Other layouts (SPEC §1b), for the family's tests: `write_internlm2_checkpoint` (packed wqkv,
grouped-query attention, safetensors shards + index, two EOS ids) and `write_llama_checkpoint`
(transformers' names, `model.safetensors`, tied embeddings, a `tokenizer.json` trained on the fly).

    python -m tp.tiny OUTPUT_DIR [--layout internlm|internlm2|llama] [--shards 3] [--dtype float32]
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
    trained on the project's own generated text, so the same bytes come out on every machine.
    Covering 99.95% of the characters takes ~4070 pieces; a smaller vocabulary covers 99.5% and
    spells the rarer characters in bytes."""
    character_coverage = 0.9995 if vocab_size >= 4100 else 0.995
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_text()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", character_coverage=character_coverage,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def random_weights(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LLaMA-named random weights of `cfg`'s shape: `num_key_value_heads` kv heads, q/k/v/o biases where
    the layout has them, InternLM's `rotary_emb.inv_freq` buffers in its layout, no LM head when tied.
    Drawn large enough that greedy choices differ from prompt to prompt."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv, hd = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads
    bias = cfg.get("attention_bias", cfg.get("bias", False))
    shapes = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd)}

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    sd = {"model.embed_tokens.weight": normal(v, h, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, (rows, cols) in shapes.items():
            sd[p + f"self_attn.{proj}.weight"] = normal(rows, cols, std=1 / math.sqrt(cols))
            if bias:
                sd[p + f"self_attn.{proj}.bias"] = normal(rows, std=0.1)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        sd[p + "mlp.up_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        sd[p + "mlp.down_proj.weight"] = normal(h, inter, std=1 / math.sqrt(inter))
        sd[p + "input_layernorm.weight"] = (1 + normal(h, std=0.1)).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + normal(h, std=0.1)).to(dtype)
        if cfg.get("model_type") == "internlm":
            sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    sd["model.norm.weight"] = (1 + normal(h, std=0.1)).to(dtype)
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = normal(v, h, std=3 / math.sqrt(h))
    return sd


def pack_internlm2(sd: dict[str, torch.Tensor], heads: int, kv: int) -> dict[str, torch.Tensor]:
    """LLaMA-named weights in InternLM2's names, q/k/v packed into wqkv per kv group."""
    out = {}
    for name, t in sd.items():
        if ".self_attn.q_proj." in name:
            p = name.split("self_attn")[0]
            q, k, v = (sd[f"{p}self_attn.{x}_proj.weight"] for x in "qkv")
            hd = k.shape[0] // kv
            groups = [torch.cat([q.view(kv, heads // kv * hd, -1)[g], k.view(kv, hd, -1)[g], v.view(kv, hd, -1)[g]])
                      for g in range(kv)]
            out[p + "attention.wqkv.weight"] = torch.cat(groups)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            for old, new in ((".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
                             (".mlp.up_proj.", ".feed_forward.w3."), (".mlp.down_proj.", ".feed_forward.w2."),
                             (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
                             ("model.embed_tokens.", "model.tok_embeddings.")):
                name = name.replace(old, new)
            out["output.weight" if name == "lm_head.weight" else name] = t
    return out


def write_safetensors_shards(out: Path, sd: dict[str, torch.Tensor], shards: int) -> None:
    """`model-0000k-of-0000n.safetensors` + index (or one `model.safetensors`), as transformers saves."""
    from safetensors.torch import save_file
    names = list(sd)
    if shards == 1:
        save_file({n: t.contiguous() for n, t in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
        return
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names[k * per:(k + 1) * per]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))


def train_tokenizer_json(path: Path, vocab_size: int) -> None:
    """A byte-level BPE `tokenizer.json` (the `tokenizers` library, as transformers saves LLaMA-3-style
    tokenizers), <unk> <s> </s> as ids 0 1 2, BOS added by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))


def _family_config(layout: str, kv_heads: int, tie: bool, **overrides) -> dict:
    base = {k: v for k, v in TINY_CONFIG.items() if k not in ("auto_map", "bias")}
    if layout == "internlm2":
        base.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False, rope_theta=1000000.0,
                    auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                              "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    else:
        base.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, rope_theta=500000.0)
    return {**base, "num_key_value_heads": kv_heads, "tie_word_embeddings": tie, **overrides}


def write_internlm2_checkpoint(out: str | Path, kv_heads: int = 4, eos_ids: tuple[int, ...] = (2, 4998),
                               shards: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """InternLM2 layout: packed wqkv, sentencepiece tokenizer, a chat model's two EOS ids."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _family_config("internlm2", kv_heads, False, **overrides)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.model").write_bytes(train_tokenizer(min(cfg["vocab_size"], 4999)))
    sd = pack_internlm2(random_weights(cfg, seed, dtype), cfg["num_attention_heads"], kv_heads)
    write_safetensors_shards(out, sd, shards)
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": True, "add_eos_token": False}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": list(eos_ids)}))
    return out


def write_llama_checkpoint(out: str | Path, kv_heads: int = 2, tie: bool = True, dtype: torch.dtype = torch.float32,
                           seed: int = 0, **overrides) -> Path:
    """LLaMA layout as transformers saves it: `model.safetensors`, tied embeddings, tokenizer.json only."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _family_config("llama", kv_heads, tie, **overrides)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    train_tokenizer_json(out / "tokenizer.json", min(cfg["vocab_size"], 4999))
    write_safetensors_shards(out, random_weights(cfg, seed, dtype), 1)
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


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
    ap.add_argument("--layout", default="internlm", choices=["internlm", "internlm2", "llama"])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.layout == "internlm2":
        path = write_internlm2_checkpoint(args.output_dir, shards=args.shards, dtype=dtype)
    elif args.layout == "llama":
        path = write_llama_checkpoint(args.output_dir, dtype=dtype)
    else:
        path = write_tiny_checkpoint(args.output_dir, args.shards, dtype)
    print(f"tiny {args.layout} checkpoint written to {path}")


if __name__ == "__main__":
    main()
