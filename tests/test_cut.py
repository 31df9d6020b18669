"""python -m cut_weights: exact partitions, the runtime loading them, refusals, interruption."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from conftest import PROMPTS, ROOT, FileCreatingPayload, copy_with_index_entry, read_full_state
from cut_weights import CutError, CutOptions, cut
from cut_weights.__main__ import main as cli
from tp.checkpoint import CheckpointError, CheckpointReader
from tp.config import ConfigError, ModelConfig
from tp.load import load_model
from tp.split import split_of
from tp.tiny import write_tiny_checkpoint
from tp.tokenizer import Tokenizer
from tp_worker import spawn


def rank_tensors(cut_dir, rank):
    with CheckpointReader(cut_dir / f"rank_{rank}") as reader:
        return {n: reader.read(n) for n in reader.names()}


@pytest.fixture(scope="module")
def cuts(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("cuts")
    return {n: cut(CutOptions(str(tiny_ckpt), str(root / f"tp{n}"), n, progress=False)) for n in (1, 2, 3, 4)}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_slices_reassemble_every_source_tensor_bit_for_bit(cuts, tiny_ckpt, world_size):
    source = {k: v for k, v in read_full_state(tiny_ckpt).items() if "inv_freq" not in k}
    ranks = [rank_tensors(cuts[world_size], r) for r in range(world_size)]
    cfg = ModelConfig.load(tiny_ckpt)
    for name, tensor in source.items():
        split = split_of(name)
        parts = [r[name] for r in ranks]
        if split.dim is None:
            assert all(torch.equal(p, tensor) for p in parts), name
            continue
        whole = torch.cat(parts, dim=split.dim)
        if split.kind == "vocab":
            assert whole.shape[0] == cfg.padded_vocab_size(world_size)
            assert torch.count_nonzero(whole[cfg.vocab_size:]) == 0, f"{name}: padding rows not zero"
            whole = whole[: cfg.vocab_size]
        assert torch.equal(whole, tensor), name
    assert all(set(r) == set(source) for r in ranks), "no inv_freq, nothing extra, nothing missing"


def test_manifest_and_rank_files(cuts, tiny_ckpt):
    out = cuts[2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["vocab_size"] == 4999 and manifest["padded_vocab_size"] == 5000
    assert manifest["source"]["files"] == {p.name: p.stat().st_size for p in tiny_ckpt.glob("*.bin")}
    emb = manifest["tensors"]["model.embed_tokens.weight"]
    assert emb == {"shape": [4999, 192], "split": "vocab", "split_dim": 0, "source_dtype": "float32",
                   "dtype": "float32"}
    assert manifest["tensors"]["model.layers.0.self_attn.o_proj.weight"]["split_dim"] == 1
    assert manifest["tensors"]["model.layers.0.self_attn.o_proj.bias"]["split_dim"] is None
    for r in range(2):
        rank = out / f"rank_{r}"
        config = json.loads((rank / "config.json").read_text())
        assert config["tensor_parallel"] == {"world_size": 2, "rank": r}
        assert config["num_attention_heads"] == 12, "source config otherwise unchanged"
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            assert (rank / f).read_bytes() == (tiny_ckpt / f).read_bytes()
        assert manifest["ranks"][str(r)]["files"] == {"model.safetensors": (rank / "model.safetensors").stat().st_size}
    assert not list(out.parent.glob(".tp2.*")), "no temporary directory left behind"


@pytest.mark.parametrize("world_size", [2, 3])
def test_inference_from_a_cut_equals_inference_from_the_checkpoint(cuts, tiny_ckpt, world_size, tmp_path):
    tok = Tokenizer(tiny_ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    (tmp_path / "cut").mkdir()
    (tmp_path / "uncut").mkdir()
    from_cut = spawn(world_size, cuts[world_size], prompts, 12, tmp_path / "cut")[0]
    uncut = spawn(world_size, tiny_ckpt, prompts, 12, tmp_path / "uncut")[0]
    assert from_cut["batched"] == uncut["batched"] and from_cut["alone"] == uncut["alone"]
    assert torch.equal(from_cut["logits"], uncut["logits"])


def test_sharded_partitions_and_dtype_conversion(tiny_ckpt, tmp_path):
    out = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "bf16"), 2, dtype="bfloat16",
                         max_shard_size="1MB", progress=False))
    files = sorted(p.name for p in (out / "rank_0").glob("*.safetensors"))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    index = json.loads((out / "rank_0" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    source = read_full_state(tiny_ckpt)
    parts = [rank_tensors(out, r) for r in range(2)]
    q = torch.cat([p["model.layers.2.self_attn.q_proj.weight"] for p in parts])
    assert q.dtype == torch.bfloat16 and torch.equal(q, source["model.layers.2.self_attn.q_proj.weight"].bfloat16())
    assert json.loads((out / "rank_1" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_model(out, 1, 2)
    assert model.dtype == torch.bfloat16


def test_files_open_cleanly_with_safetensors(cuts):
    with safe_open(str(cuts[3] / "rank_2" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").shape == (1667, 192)  # 5001 / 3


# -- refusals ---------------------------------------------------------------------------------
def test_indivisible_heads_or_mlp_refused_before_writing(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="size 5 does not divide num_attention_heads=12"):
        cut(CutOptions(str(tiny_ckpt), str(tmp_path / "out"), 5, progress=False))
    odd = tmp_path / "odd"
    shutil.copytree(tiny_ckpt, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "intermediate_size": 481}))
    with pytest.raises(ConfigError, match="does not divide intermediate_size=481"):
        cut(CutOptions(str(odd), str(tmp_path / "out"), 2, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"], "nothing written"


def test_missing_shard_named(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00003-of-00003.bin: shard named in the index is missing"):
        cut(CutOptions(str(broken), str(tmp_path / "out"), 2, progress=False))
    assert not (tmp_path / "out").exists()


def test_index_naming_an_absent_tensor_named(tiny_ckpt, tmp_path):
    broken = copy_with_index_entry(tiny_ckpt, tmp_path / "broken", "model.layers.9.mlp.up_proj.weight",
                                   "pytorch_model-00002-of-00003.bin")
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight.*not in the file"):
        cut(CutOptions(str(broken), str(tmp_path / "out"), 2, progress=False))
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(cuts, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(CutError, match="already exists: pass overwrite=true"):
        cut(CutOptions(str(tiny_ckpt), str(out), 2, progress=False))
    with pytest.raises(CutError, match="is not a cut"):
        cut(CutOptions(str(tiny_ckpt), str(out), 2, overwrite=True, progress=False))
    assert (out / "precious.txt").read_text() == "mine"
    shutil.copytree(cuts[2], tmp_path / "again")
    cut(CutOptions(str(tiny_ckpt), str(tmp_path / "again"), 3, overwrite=True, progress=False))
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["world_size"] == 3


def test_unwritable_output_refused(tiny_ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CutError, match="cannot write the cut under"):
        cut(CutOptions(str(tiny_ckpt), str(blocker / "out"), 2, progress=False))


def test_executable_pickle_refused_and_not_executed(tiny_ckpt, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    shard = "pytorch_model-00002-of-00003.bin"
    state = torch.load(bad / shard, weights_only=True)
    torch.save({**state, "model.layers.1.mlp.payload": FileCreatingPayload(marker)}, bad / shard)
    with pytest.raises(CheckpointError, match="refused: loading it needs arbitrary unpickling"):
        cut(CutOptions(str(bad), str(tmp_path / "out"), 2, progress=False))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_reports_errors_without_traceback(tiny_ckpt, tmp_path, capsys):
    assert cli([f"input_dir={tiny_ckpt}", f"output_dir={tmp_path / 'o'}", "world_size=two"]) == 2
    assert "world_size='two': expected a positive integer" in capsys.readouterr().err
    assert cli([f"input_dir={tiny_ckpt}", "output_dir=x", "world_size=2", "colour=blue"]) == 2
    assert "unexpected argument 'colour=blue'" in capsys.readouterr().err
    assert cli([f"input_dir={tiny_ckpt}", f"output_dir={tmp_path / 'o'}", "world_size=2", "progress=false"]) == 0
    assert (tmp_path / "o" / "manifest.json").is_file()


# -- loading a cut ----------------------------------------------------------------------------
def test_cut_for_another_world_size_refused(cuts):
    with pytest.raises(CheckpointError, match="cut for 2 ranks, launched with 4"):
        load_model(cuts[2], rank=0, world_size=4)


def test_truncated_or_missing_partition_named(cuts, tmp_path):
    broken = shutil.copytree(cuts[2], tmp_path / "broken")
    data = broken / "rank_1" / "model.safetensors"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="rank_1/model.safetensors: .* bytes, the manifest says"):
        load_model(broken, rank=1, world_size=2)
    data.unlink()
    with pytest.raises(CheckpointError, match="rank_1/model.safetensors: missing from the cut"):
        load_model(broken, rank=1, world_size=2)
    (broken / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete cut"):
        load_model(broken, rank=0, world_size=2)


def test_ctrl_c_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    cutmod = sys.modules["cut_weights.cut"]
    calls = []

    def interrupted(*args):
        calls.append(args[1])
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(cutmod, "_stream_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cut(CutOptions(str(tiny_ckpt), str(tmp_path / "out"), 2, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_killed_cut_leaves_nothing_that_loads_and_rerun_succeeds(tmp_path):
    big = write_tiny_checkpoint(tmp_path / "big", shards=4, hidden_size=1024,
                                intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cut_weights", f"input_dir={big}", f"output_dir={out}", "world_size=2",
           "progress=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.time() + 60
    partial = None
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in tmp_path.glob(".out.partial-*/rank_1/*.safetensors") if p.stat().st_size > 1 << 20]
        if found:
            partial = found[0].parents[1]
            break
        time.sleep(0.005)
    assert partial is not None, "the cut finished before it could be killed; make the checkpoint bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises((CheckpointError, ConfigError)):
        load_model(partial, 0, 2)
    assert subprocess.run(cmd, cwd=ROOT).returncode == 0
    assert not partial.exists(), "the stale partial directory is cleaned up"
    full = read_full_state(big)
    assert torch.equal(torch.cat([rank_tensors(out, r)["model.layers.3.mlp.down_proj.weight"] for r in range(2)], 1),
                       full["model.layers.3.mlp.down_proj.weight"])
