"""Config keys as transformers 4 and 5 write them: the rotary base and scaling read from wherever the
writer put it (5 writes only `rope_parameters`), every key that changes the arithmetic and that we do not
implement refused by name, and a generated id the tokenizer lacks kept in the output, not fatal.

The checkpoint here is transformers' own `save_pretrained` output (the installed transformers), with a
rotary base of 100000: its tokens must equal transformers' on the same files at TP=1, 2, 3, from the
checkpoint and from a cut, and change when only the base changes (so the comparison can fail)."""
import json
import logging
import shutil

import pytest
import torch

from conftest import PROMPTS, torchrun
from cut_weights import CutOptions, cut
from tp.config import ConfigError, ModelConfig
from tp.generate import generate, next_token_logits
from tp.load import load_model
from tp.tiny import random_weights, train_tokenizer, train_tokenizer_json, write_tiny_checkpoint
from tp.tokenizer import Tokenizer
from tp_worker import spawn

MAX_NEW = 16
BASE = 100000.0  # SmolLM2's; anything but the 10000 a reader falls back to
SHAPE = dict(vocab_size=4999, hidden_size=192, intermediate_size=480, num_hidden_layers=3, num_attention_heads=12,
             num_key_value_heads=6, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)


def save_with_transformers(out, rope_parameters: dict, seed: int = 0):
    """A LLaMA-layout checkpoint as the installed transformers writes it: `save_pretrained` of a
    LlamaForCausalLM holding the project's random weights (large enough that greedy choices differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPE, rope_parameters=dict(rope_parameters))
    model = LlamaForCausalLM(config)
    model.load_state_dict(random_weights({**SHAPE, "model_type": "llama"}, seed, torch.float32))
    model.save_pretrained(out)
    train_tokenizer_json(out / "tokenizer.json", SHAPE["vocab_size"])
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out


@torch.inference_mode()
def transformers_tokens(ckpt, prompts):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokens = [model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    logits = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
    return tokens, logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint, prompt ids, transformers' tokens, transformers' last logits)."""
    ckpt = save_with_transformers(tmp_path_factory.mktemp("t5") / "llama-t5", {"rope_type": "default", "rope_theta": BASE})
    raw = json.loads((ckpt / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == BASE, "not transformers 5's layout"
    tok = Tokenizer(ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    tokens, logits = transformers_tokens(ckpt, prompts)
    assert len({tuple(t) for t in tokens}) == len(tokens), "the fixture answers prompts alike"
    return ckpt, prompts, tokens, logits


def test_rope_parameters_are_read():
    cfg = ModelConfig.from_dict({**SHAPE, "model_type": "llama", "rope_parameters": {"rope_theta": BASE,
                                                                                      "rope_type": "default"}})
    assert (cfg.rope_theta, cfg.rope_scaling) == (BASE, None)
    cfg = ModelConfig.from_dict({**SHAPE, "model_type": "llama",
                                 "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": BASE}})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (BASE, "linear", 4.0)
    # transformers 4: top-level rope_theta, rope_scaling with "type"
    cfg = ModelConfig.from_dict({**SHAPE, "model_type": "llama", "rope_theta": 5e5,
                                 "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (5e5, "dynamic", 2.0)
    # InternLM's rotary, its scaling factor included
    cfg = ModelConfig.from_dict({**SHAPE, "rotary": {"base": 20000, "type": "dynamic", "scaling_factor": 3.0}})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (20000, "dynamic", 3.0)
    # both spellings, agreeing: the rope dictionary's base comes before the top-level one (as transformers 5)
    cfg = ModelConfig.from_dict({**SHAPE, "model_type": "llama", "rope_theta": 10000.0,
                                 "rope_scaling": {"type": "linear", "factor": 2.0},
                                 "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (10000.0, "linear", 2.0)


@pytest.mark.parametrize("extra,named", [
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": BASE}},
     "rope_parameters rope_type 'llama3' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters rope_type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "longrope", "factor": 4.0}}, "rope_scaling rope_type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "linear"}}, "rope_parameters factor must be a positive number for rope_type "
                                                   "'linear', got None"),
    ({"rope_parameters": {"rope_type": "default", "mscale": 0.7}}, "rope_parameters key 'mscale' (0.7) is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}},
     "rope_parameters per layer type (full_attention, sliding_attention) is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"type": "linear", "factor": 4.0}},
     "and rope_scaling {'type': 'linear', 'factor': 4.0} disagree"),
    ({"rotary": {"base": 10000, "type": "ntk"}}, "rotary type 'ntk' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias True is not supported"),
    ({"sliding_window": 1024}, "sliding_window 1024 is not supported"),
    ({"use_sliding_window": True, "sliding_window": 512}, "sliding_window 512 is not supported"),
    ({"use_sliding_window": True}, "sliding_window None is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 is not supported"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0 is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
     "rope_parameters partial_rotary_factor 0.25 is not supported"),
    ({"qk_norm": True}, "qk_norm True is not supported"),
    ({"use_qk_norm": True}, "use_qk_norm True is not supported"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "'sliding_attention', 'full_attention'] is not supported"),
    ({"logits_scaling": 8.0}, "logits_scaling 8.0 is not supported"),
])
def test_arithmetic_we_do_not_implement_is_refused_by_name(extra, named):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**SHAPE, "model_type": "llama", **extra})
    assert named in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("config.json: ")


def test_keys_that_leave_the_arithmetic_alone_keep_loading():
    plain = ModelConfig.from_dict({**SHAPE, "model_type": "llama"})
    for extra in ({"auto_map": {"AutoConfig": "x.Y"}}, {"torch_dtype": "bfloat16"}, {"dtype": "bfloat16"},
                  {"transformers_version": "5.24.0"}, {"use_cache": False}, {"pretraining_tp": 1},
                  {"attention_dropout": 0.1}, {"hidden_act": "silu"}, {"mlp_bias": False}, {"qk_norm": False},
                  {"sliding_window": None}, {"sliding_window": 4096},  # not shorter than the 2048 context
                  {"use_sliding_window": False, "sliding_window": 512},  # Qwen2-style: named and switched off
                  {"layer_types": ["full_attention"] * 3}, {"partial_rotary_factor": 1.0},
                  {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 2048}}):
        assert ModelConfig.from_dict({**SHAPE, "model_type": "llama", **extra}) == plain, extra


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_transformers5_checkpoint_gives_transformers_tokens(world_size, saved, tmp_path):
    ckpt, prompts, tokens, logits = saved
    for r, result in enumerate(spawn(world_size, ckpt, prompts, MAX_NEW, tmp_path)):
        assert result["alone"] == tokens, f"rank {r}"
        assert result["batched"] == tokens, f"rank {r}: left-padded batch"
        torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_cut_of_it_through_the_launcher_gives_transformers_tokens(world_size, saved, tmp_path):
    ckpt, prompts, tokens, _ = saved
    out = cut(CutOptions(str(ckpt), str(tmp_path / "cut"), world_size, progress=False))
    written = json.loads((out / "rank_0" / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_theta": BASE, "rope_type": "default"}
    assert "torch_dtype" not in written and written["dtype"] == "float32", "the dtype under its writer's key"
    run = tmp_path / "run"
    proc = torchrun(world_size, "task=inference", f"model.path={out}", f"hydra.run.dir={run}",
                    "task.prompts=" + json.dumps(PROMPTS, ensure_ascii=False), "task.batch_size=2",
                    f"task.max_new_tokens={MAX_NEW}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run / "inference.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["output_ids"] for r in rows] == tokens


def test_only_the_base_changed_changes_the_tokens(saved, tmp_path):
    """What a reader that ignored rope_parameters computes (base 10000): other tokens, so the
    comparisons above would catch it."""
    ckpt, prompts, tokens, _ = saved
    other = shutil.copytree(ckpt, tmp_path / "base-10000")
    raw = json.loads((other / "config.json").read_text())
    raw["rope_parameters"]["rope_theta"] = 10000.0
    (other / "config.json").write_text(json.dumps(raw))
    assert generate(load_model(ckpt), prompts, MAX_NEW, 2).tokens == tokens
    assert generate(load_model(other), prompts, MAX_NEW, 2).tokens != tokens


def test_linear_scaling_in_rope_parameters_gives_transformers_tokens(tmp_path):
    ckpt = save_with_transformers(tmp_path / "linear", {"rope_type": "linear", "factor": 4.0, "rope_theta": BASE}, seed=1)
    tok = Tokenizer(ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    tokens, logits = transformers_tokens(ckpt, prompts)
    model = load_model(ckpt)
    assert (model.cfg.rope_scaling, model.cfg.rope_factor, model.cfg.rope_theta) == ("linear", 4.0, BASE)
    assert generate(model, prompts, MAX_NEW, 2).tokens == tokens
    torch.testing.assert_close(next_token_logits(model, prompts), logits, rtol=0, atol=1e-4)


def test_refused_before_anything_is_written_or_loaded(saved, tmp_path):
    ckpt = shutil.copytree(saved[0], tmp_path / "gelu")
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        cut(CutOptions(str(ckpt), str(tmp_path / "cut"), 2, progress=False))
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".cut*"))
    proc = torchrun(2, "task=inference", f"model.path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}",
                    "task.max_new_tokens=2")
    assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "hidden_act 'gelu' is not supported" in line]
    assert len(lines) == 2 and "Traceback" not in proc.stdout, proc.stdout  # one line a rank, no traceback
    assert not (tmp_path / "run" / "inference.jsonl").exists()


def test_an_id_outside_the_tokenizer_is_kept_and_rendered_as_nothing(caplog, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    tok = Tokenizer(ckpt)
    known = tok.encode("你好", bos=False)
    with caplog.at_level(logging.WARNING, logger="internlm_tp"):
        assert tok.decode([*known, tok.vocab_size + 3, *known]) == tok.decode(known + known)
        assert tok.decode([tok.vocab_size, -1]) == ""
    warnings = [r.getMessage() for r in caplog.records if "outside the tokenizer" in r.getMessage()]
    assert len(warnings) == 1 and f"[{tok.vocab_size + 3}]" in warnings[0], warnings


def test_padded_vocabulary_runs_inference_to_its_file(tmp_path):
    """vocab_size 4003 over a 4000-piece tokenizer, at TP=2, 100 new tokens. The LM head rows of the
    prompt's first greedy token and of id 4001 are swapped, so the model does generate an id the
    tokenizer lacks (first, whatever follows)."""
    ckpt = write_tiny_checkpoint(tmp_path / "padded", shards=1, vocab_size=4003)
    (ckpt / "tokenizer.model").write_bytes(train_tokenizer(4000))
    tok = Tokenizer(ckpt)
    assert tok.vocab_size == 4000
    prompt = tok.encode(PROMPTS[1])
    first = int(next_token_logits(load_model(ckpt), [prompt])[0].argmax())
    shard = ckpt / "pytorch_model-00001-of-00001.bin"
    state = torch.load(shard, weights_only=True)
    head = state["lm_head.weight"]
    head[[first, 4001]] = head[[4001, first]]
    torch.save(state, shard)
    run = tmp_path / "run"
    proc = torchrun(2, "task=inference", f"model.path={ckpt}", f"hydra.run.dir={run}", "task.batch_size=1",
                    "task.prompts=" + json.dumps([PROMPTS[1]] * 2, ensure_ascii=False), "task.max_new_tokens=100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run / "inference.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2
    for row in rows:
        ids = row["output_ids"]
        assert ids[0] == 4001 and 0 < len(ids) <= 100
        assert row["output"] == tok.decode([i for i in ids if i < 4000])
    log = (run / "run.log").read_text(encoding="utf-8")
    assert log.count("outside the tokenizer's 4000 pieces") == 1, "logged once, by rank 0"
