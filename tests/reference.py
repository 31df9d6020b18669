"""transformers' LlamaForCausalLM(attention_bias=True) on the same files: the numerical reference."""
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def reference_config(ckpt: Path) -> LlamaConfig:
    c = json.loads((ckpt / "config.json").read_text())
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
        attention_bias=c["bias"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)})


def reference_model(ckpt: Path, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(reference_config(ckpt)).eval()
    model.load_state_dict({k: v.float() for k, v in state.items() if "inv_freq" not in k}, strict=True)
    return model


@torch.inference_mode()
def reference_greedy(model, ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(generated ids, last-position logits of the prompt), the prompt run alone."""
    x = torch.tensor([ids])
    logits = model(x).logits[0, -1]
    out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist(), logits
