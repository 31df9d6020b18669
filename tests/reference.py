"""transformers' LlamaForCausalLM on the same files: the numerical reference for every layout.

InternLM: attention_bias=True. InternLM2: its wqkv unpacked into q/k/v and its names renamed here,
independently of tp.layout (what InternLM2's own modeling code computes). LLaMA: as saved.
"""
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def reference_config(ckpt: Path) -> LlamaConfig:
    c = json.loads((ckpt / "config.json").read_text())
    heads = c["num_attention_heads"]
    bias = c.get("attention_bias", False) if c.get("model_type") == "llama" else c.get("bias", c.get("model_type") != "internlm2")
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads", heads),
        max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
        attention_bias=bias, tie_word_embeddings=c.get("tie_word_embeddings", False),
        rope_parameters={"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)})


def unpack_internlm2(state: dict[str, torch.Tensor], heads: int, kv: int) -> dict[str, torch.Tensor]:
    """InternLM2 names and packed wqkv -> LLaMA names and q/k/v (rows: kv groups of [q heads, k, v])."""
    out = {}
    renames = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm", "model.tok_embeddings": "model.embed_tokens", "output": "lm_head"}
    for name, t in state.items():
        if "attention.wqkv" in name:
            per = heads // kv
            groups = t.view(kv, per + 2, -1, t.shape[-1])
            prefix = name.split("attention.wqkv")[0] + "self_attn."
            out[prefix + "q_proj.weight"] = groups[:, :per].reshape(-1, t.shape[-1])
            out[prefix + "k_proj.weight"] = groups[:, per].reshape(-1, t.shape[-1])
            out[prefix + "v_proj.weight"] = groups[:, per + 1].reshape(-1, t.shape[-1])
            continue
        for old, new in renames.items():
            if name.startswith(old + ".") or f".{old}." in name:
                name = name.replace(old, new, 1)
                break
        out[name] = t
    return out


def reference_model(ckpt: Path, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    config = reference_config(ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("model_type") == "internlm2":
        state = unpack_internlm2(state, config.num_attention_heads, config.num_key_value_heads)
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items() if "inv_freq" not in k},
                                                strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), \
        (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.inference_mode()
def reference_greedy(model, ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(generated ids, last-position logits of the prompt), the prompt run alone."""
    x = torch.tensor([ids])
    logits = model(x).logits[0, -1]
    out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist(), logits
