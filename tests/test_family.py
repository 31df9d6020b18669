"""The InternLM family and LLaMA-layout checkpoints (SPEC §1b), against transformers' LlamaForCausalLM:
grouped-query attention split and replicated over ranks, InternLM2's packed wqkv, tied embeddings,
a tokenizer.json, several EOS ids; from the checkpoint and from a cut; and the refusals."""
import json
import shutil

import pytest
import torch

from conftest import PROMPTS, SUBJECTS, torchrun
from cut_weights import CutOptions, cut
from cut_weights.cut import CutError
from reference import reference_model
from tp.checkpoint import CheckpointError, CheckpointReader
from tp.config import ConfigError, ModelConfig
from tp.load import load_model
from tp.tiny import write_internlm2_checkpoint, write_llama_checkpoint
from tp.tokenizer import Tokenizer
from tp_worker import spawn

MAX_NEW = 12


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {"internlm2": write_internlm2_checkpoint(root / "internlm2", kv_heads=4),
            "internlm2-kv2": write_internlm2_checkpoint(root / "internlm2-kv2", kv_heads=2, seed=1),
            "llama": write_llama_checkpoint(root / "llama", kv_heads=2, tie=True)}


def full_state(ckpt):
    with CheckpointReader(ckpt) as r:
        return {n: r.read(n) for n in r.names()}


@torch.inference_mode()
def reference_tokens(ckpt, prompts, stops):
    model = reference_model(ckpt, full_state(ckpt))
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        gen = model.generate(x, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(stops), pad_token_id=0)
        out.append((gen[0, len(ids):].tolist(), model(x).logits[0, -1]))
    return [t for t, _ in out], torch.stack([lg for _, lg in out])


@pytest.fixture(scope="module")
def references(family):
    refs = {}
    for name, ckpt in family.items():
        tok = Tokenizer(ckpt)
        prompts = [tok.encode(p) for p in PROMPTS]
        tokens, logits = reference_tokens(ckpt, prompts, ModelConfig.load(ckpt).stop_ids)
        assert len({tuple(t) for t in tokens}) == len(tokens), "the fixture answers prompts differently"
        refs[name] = (prompts, tokens, logits)
    return refs


@pytest.mark.parametrize("name,world_size", [("internlm2", 1), ("internlm2", 2), ("internlm2", 4),
                                             ("internlm2-kv2", 4), ("llama", 1), ("llama", 2), ("llama", 4)])
def test_greedy_tokens_equal_transformers(name, world_size, family, references, tmp_path):
    """kv heads split (kv 4 over 2 or 4 ranks) and replicated (kv 2 over 4 ranks)."""
    prompts, tokens, logits = references[name]
    for r, result in enumerate(spawn(world_size, family[name], prompts, MAX_NEW, tmp_path)):
        assert result["alone"] == tokens, f"rank {r}"
        assert result["batched"] == tokens, f"rank {r}: left-padded batch"
        torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,world_size", [("internlm2", 2), ("internlm2-kv2", 4), ("llama", 4)])
def test_a_cut_gives_the_checkpoints_tokens(name, world_size, family, references, tmp_path):
    out = cut(CutOptions(str(family[name]), str(tmp_path / "cut"), world_size, progress=False))
    prompts, tokens, _ = references[name]
    (tmp_path / "run").mkdir()
    assert all(r["batched"] == tokens for r in spawn(world_size, out, prompts, MAX_NEW, tmp_path / "run"))
    manifest = json.loads((out / "manifest.json").read_text())
    if name.startswith("internlm2"):
        kv = 4 if name == "internlm2" else 2
        rows = 12 // kv + 2  # per kv group: its query heads, one key, one value head (of 16 rows)
        with CheckpointReader(out / "rank_0") as r:
            assert r.shape("model.layers.0.attention.wqkv.weight") == (max(1, kv // world_size) * rows * 16, 192), \
                "wqkv keeps its name and packed layout, cut by whole kv groups"
    else:
        assert "lm_head.weight" not in manifest["tensors"], "tied embeddings are cut once"


def test_kv_cache_holds_only_a_ranks_kv_heads(family):
    model = load_model(family["internlm2-kv2"], 0, 4)
    model.setup_cache(1, 10)
    assert model.model.layers[0].self_attn.cache.k.shape == (1, 1, 10, 16)
    model = load_model(family["internlm2"], 0, 2)
    model.setup_cache(3, 10)
    assert model.model.layers[0].self_attn.cache.k.shape == (3, 2, 10, 16)


def test_generation_stops_at_either_eos(family, tmp_path):
    """A chat model's generation_config lists two EOS ids; the second one ends a sequence too."""
    ckpt = tmp_path / "chat"
    shutil.copytree(family["internlm2"], ckpt)
    model, tok = load_model(ckpt), Tokenizer(ckpt)
    prompt = [tok.encode(PROMPTS[0])]
    from tp.generate import generate
    free = generate(model, prompt, MAX_NEW, eos_id=-1).tokens[0]
    second = free[3]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, second]}))
    stops = ModelConfig.load(ckpt).stop_ids
    assert stops == (2, second)
    assert generate(load_model(ckpt), prompt, MAX_NEW, eos_id=stops).tokens[0] == free[:free.index(second) + 1]


def test_int8_packed_wqkv_cut_equals_load_time_quantization(family, tmp_path):
    out = cut(CutOptions(str(family["internlm2"]), str(tmp_path / "q"), 2, quantize="int8", progress=False))
    for rank in range(2):
        from_cut = dict(load_model(out, rank, 2).named_parameters())
        at_load = dict(load_model(family["internlm2"], rank, 2, quantize="int8").named_parameters())
        assert from_cut.keys() == at_load.keys()
        assert all(torch.equal(p, from_cut[n]) for n, p in at_load.items())
        assert from_cut["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.int8


def test_int8_tokens_do_not_depend_on_tp_size_on_every_layout(family, references, tmp_path):
    for name in ("internlm2-kv2", "llama"):
        prompts = references[name][0]
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "n").mkdir()
        one = spawn(1, family[name], prompts, MAX_NEW, tmp_path / name / "1", quantize="int8")[0]
        many = spawn(4, family[name], prompts, MAX_NEW, tmp_path / name / "n", quantize="int8")
        assert all(r["batched"] == one["batched"] for r in many), name


def test_tokenizer_json_and_bos_from_its_post_processor(family):
    tok = Tokenizer(family["llama"])
    ids = tok.encode("以下是中国关于算术考试的单项选择题")
    assert ids[0] == tok.bos_id == 1 and ids.count(1) == 1
    assert tok.encode("你好", bos=False)[0] != 1
    assert tok.decode(ids) == "以下是中国关于算术考试的单项选择题"


def test_answer_letters_are_the_tokens_the_prompt_ends_in():
    from launch.precision import answer_ids

    class InContext:  # a vocabulary whose letter after the prompt is not the bare piece's id
        def encode(self, text, bos=True):
            return [1] + [ord(c) + (1000 if c in "ABCD" else 0) for c in text]

        def piece_id(self, piece):
            return ord(piece)
    assert answer_ids(InContext(), "答案：") == [1065, 1066, 1067, 1068], "the token prompt + letter ends in"

    class Merging(InContext):  # "：A" merges across the boundary: the bare piece is the best there is
        def encode(self, text, bos=True):
            return super().encode(text.replace("：A", "\x01"), bos)
    assert answer_ids(Merging(), "答案：") == [ord("A"), 1066, 1067, 1068]


@pytest.mark.parametrize("name", ["internlm2", "llama"])
def test_every_task_runs_through_torchrun(name, family, ceval_dir, tmp_path):
    for task, extra in (("inference", ["task.max_new_tokens=8"]),
                        ("precision", [f"task.data_dir={ceval_dir}", f"task.subjects=[{SUBJECTS[0]}]", "task.batch_size=6"]),
                        ("performance", ["task.input_len=8", "task.output_len=4"])):
        run_dir = tmp_path / task
        proc = torchrun(2, f"task={task}", f"model.path={family[name]}", *extra, f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "inference" / "inference.jsonl").read_text().splitlines()[0])["output_ids"]
    assert (tmp_path / "precision" / "test_result" / "result_0_classes_acc.json").is_file()
    assert (tmp_path / "performance" / f"performance_test_cpu_{name}.csv").is_file()


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_input_for_the_new_keys_gets_one_clear_line(family, tmp_path):
    with pytest.raises(ConfigError, match="num_key_value_heads 5 does not divide num_attention_heads 12"):
        ModelConfig.load(_edited(family["internlm2"], tmp_path / "a", num_key_value_heads=5))
    with pytest.raises(ConfigError, match="tensor parallel size 3 can not place num_key_value_heads=4"):
        load_model(family["internlm2"], 0, 3)
    with pytest.raises(ConfigError, match=r"architectures \['MistralForCausalLM'\], model_type 'mistral' is not a supported"):
        ModelConfig.load(_edited(family["llama"], tmp_path / "b", architectures=["MistralForCausalLM"], model_type="mistral"))
    untied = _edited(family["llama"], tmp_path / "c", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="missing tensor.*lm_head.weight"):
        load_model(untied)
    both = tmp_path / "d"
    shutil.copytree(family["internlm2"], both)
    cfg = json.loads((both / "config.json").read_text())
    (both / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="ties the LM head to the embedding .* also holds output.weight"):
        load_model(both)
    with pytest.raises(CutError, match="ties the LM head to the embedding"):
        cut(CutOptions(str(both), str(tmp_path / "never"), 2, progress=False))
    assert not (tmp_path / "never").exists()


def test_a_missing_tokenizer_is_refused_before_any_weight_is_read(family, tmp_path, monkeypatch):
    import launch.session as session_module
    from launch.session import Session, UserError
    ckpt = tmp_path / "no-tokenizer"
    shutil.copytree(family["llama"], ckpt)
    (ckpt / "tokenizer.json").unlink()
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("weights read first"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(Session, "_current", None)
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["device=cpu", f"model.path={ckpt}"])
    with pytest.raises(UserError, match="no tokenizer"):
        Session.get(cfg).model_for(cfg)
    with pytest.raises(CutError, match="no tokenizer"):
        cut(CutOptions(str(ckpt), str(tmp_path / "never"), 2, progress=False))
