"""Checkpoint layouts, the split table, and refusals."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import FileCreatingPayload, copy_with_index_entry, read_full_state
from tp.checkpoint import CheckpointError, CheckpointReader, read_shard
from tp.config import ModelConfig
from tp.load import expected_names, load_model
from tp.split import split_of


def _copy_meta(src, dst):
    dst.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def layouts(tiny_ckpt, tmp_path_factory):
    """The same weights as single .bin, single safetensors and sharded safetensors + index."""
    root = tmp_path_factory.mktemp("layouts")
    state = read_full_state(tiny_ckpt)
    single_bin = root / "single_bin"
    _copy_meta(tiny_ckpt, single_bin)
    torch.save(state, single_bin / "pytorch_model.bin")
    plain = {k: v for k, v in state.items() if "inv_freq" not in k}
    single_st = root / "single_st"
    _copy_meta(tiny_ckpt, single_st)
    save_file(plain, single_st / "model.safetensors")
    sharded_st = root / "sharded_st"
    _copy_meta(tiny_ckpt, sharded_st)
    names = list(plain)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: plain[n] for n in part}, sharded_st / file)
        weight_map.update({n: file for n in part})
    (sharded_st / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {"sharded_bin": tiny_ckpt, "single_bin": single_bin, "single_st": single_st, "sharded_st": sharded_st}


def test_every_layout_reads_the_same_tensors(layouts, tiny_ckpt):
    state = read_full_state(tiny_ckpt)
    cfg = ModelConfig.load(tiny_ckpt)
    for kind, path in layouts.items():
        with CheckpointReader(path) as reader:
            assert sorted(reader.names()) == sorted(expected_names(cfg)), kind  # inv_freq dropped
            for name in reader.names():
                assert torch.equal(reader.read(name), state[name]), (kind, name)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_slices_reassemble_every_tensor(tiny_ckpt, world_size):
    cfg = ModelConfig.load(tiny_ckpt)
    padded = cfg.padded_vocab_size(world_size)
    state = read_full_state(tiny_ckpt)
    with CheckpointReader(tiny_ckpt) as reader:
        for name in reader.names():
            parts = [read_shard(reader, name, r, world_size, padded) for r in range(world_size)]
            split = split_of(name)
            if split.dim is None:
                assert all(torch.equal(p, state[name]) for p in parts), name
                continue
            whole = torch.cat(parts, dim=split.dim)
            if split.kind == "vocab":
                assert whole.shape[0] == padded
                assert torch.count_nonzero(whole[cfg.vocab_size:]) == 0, "vocab padding rows must be zero"
                whole = whole[: cfg.vocab_size]
            assert torch.equal(whole, state[name]), name


def test_every_layout_loads_the_same_model(layouts):
    models = {k: load_model(p) for k, p in layouts.items()}
    reference = dict(models.pop("sharded_bin").named_parameters())
    for kind, model in models.items():
        for name, param in model.named_parameters():
            assert torch.equal(param, reference[name]), (kind, name)


def test_unsafe_pickle_is_refused_and_not_executed(tiny_ckpt, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil"
    _copy_meta(tiny_ckpt, bad)
    torch.save({"model.norm.weight": torch.ones(2), "x": FileCreatingPayload(marker)}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        CheckpointReader(bad)
    assert not marker.exists(), "the pickle's code ran"


def test_missing_shard_is_named(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00003.bin.*missing"):
        CheckpointReader(broken)


def test_index_naming_an_absent_tensor_is_named(tiny_ckpt, tmp_path):
    broken = copy_with_index_entry(tiny_ckpt, tmp_path / "broken", "model.layers.0.mlp.extra.weight",
                                   "pytorch_model-00001-of-00003.bin")
    with CheckpointReader(broken) as reader, pytest.raises(CheckpointError, match="mlp.extra.weight"):
        reader.read("model.layers.0.mlp.extra.weight")


def test_missing_tensor_refused_at_load(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    _copy_meta(tiny_ckpt, broken)
    state = {k: v for k, v in read_full_state(tiny_ckpt).items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file({k: v for k, v in state.items() if "inv_freq" not in k}, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(broken)


def test_truncated_bin_is_named(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    shard = broken / "pytorch_model-00001-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00003.bin"):
        load_model(broken)


def test_unknown_tensor_name_is_not_silently_split():
    with pytest.raises(KeyError, match="model.layers.0.mlp.extra.weight"):
        split_of("model.layers.0.mlp.extra.weight")


