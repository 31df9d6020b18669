"""Config parsing, TP divisibility, and device/backend selection."""
import pytest


from tp.config import ConfigError, ModelConfig
from tp.device import BACKENDS, DeviceError, init_distributed, resolve_device
from tp.tiny import TINY_CONFIG


def test_published_internlm_config_parses():
    cfg = ModelConfig.from_dict({**TINY_CONFIG, "rotary": {"base": 500000, "type": "dynamic"}})
    assert cfg.rope_theta == 500000 and cfg.rope_dynamic and cfg.bias and cfg.head_dim == 16


@pytest.mark.parametrize("world_size,named", [(5, "num_attention_heads=12"), (7, "num_attention_heads=12 and intermediate_size=480"),
                                              (8, "num_attention_heads=12")])
def test_indivisible_tp_size_refused_with_numbers(world_size, named):
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    with pytest.raises(ConfigError, match=f"size {world_size} does not divide {named}"):
        cfg.check_divisible(world_size)


def test_intermediate_alone_indivisible():
    cfg = ModelConfig.from_dict({**TINY_CONFIG, "intermediate_size": 481})
    with pytest.raises(ConfigError, match="does not divide intermediate_size=481;"):
        cfg.check_divisible(2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_vocab_padded_to_a_multiple(world_size):
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    padded = cfg.padded_vocab_size(world_size)
    assert padded % world_size == 0 and 0 <= padded - cfg.vocab_size < world_size


@pytest.mark.parametrize("raw,message", [
    ({k: v for k, v in TINY_CONFIG.items() if k != "hidden_size"}, "missing key.*hidden_size"),
    ({**TINY_CONFIG, "num_hidden_layers": "32"}, "num_hidden_layers must be a positive integer"),
    ({**TINY_CONFIG, "bias": "yes"}, "bias must be true or false"),
    ({**TINY_CONFIG, "rotary": 3}, "rotary must be an object"),
    ({**TINY_CONFIG, "hidden_size": 190}, "not a multiple of num_attention_heads"),
])
def test_bad_config_is_a_clear_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("text", ['{"hidden_size": ' + "9" * 5000 + "}",  # past Python's int digit limit
                                  "[" * 100_000 + "]" * 100_000,  # nesting past the recursion limit
                                  "{not json", b"\xff\xfe".decode("latin-1")])
def test_unreadable_config_and_manifest_files_are_named(tmp_path, text):
    from tp.checkpoint import CheckpointError
    from tp.partition import read_manifest
    (tmp_path / "config.json").write_text(text, encoding="latin-1" if text.startswith("\xff") else "utf-8")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").rename(tmp_path / "manifest.json")
    with pytest.raises(CheckpointError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)


def _counts(npu=0, cuda=0):
    return {"npu": lambda: npu, "cuda": lambda: cuda, "cpu": lambda: 1}


@pytest.mark.parametrize("npu,cuda,picked", [(8, 8, "npu"), (0, 2, "cuda"), (0, 0, "cpu"), (1, 0, "npu")])
def test_auto_picks_npu_then_cuda_then_cpu(npu, cuda, picked):
    assert resolve_device("auto", _counts(npu, cuda)) == picked


def test_backend_for_each_device():
    assert BACKENDS == {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@pytest.mark.parametrize("kind", ["npu", "cuda"])
def test_absent_device_refused(kind):
    with pytest.raises(DeviceError, match=f"device={kind} requested but no {kind} device"):
        resolve_device(kind, _counts())


def test_unknown_device_refused():
    with pytest.raises(DeviceError, match="expected one of auto, npu, cuda, cpu"):
        resolve_device("tpu", _counts())


def test_more_processes_than_devices_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DeviceError, match="4 processes per node but only 2 cuda"):
        init_distributed("cuda", counts=_counts(cuda=2))


def test_torch_npu_imported_only_when_npu_is_asked_or_probed(monkeypatch):
    import sys

    from tp import device
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    resolve_device("cpu")
    assert "torch_npu" not in sys.modules
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail: not installed
    assert device._npu_count() == 0
    with pytest.raises(DeviceError, match="is torch_npu installed"):
        resolve_device("npu")


def test_cpu_threads_auto_shares_the_cores_among_the_ranks_of_a_host():
    from tp.device import cpu_threads
    assert cpu_threads("auto", 1, cores=16) == 16
    assert cpu_threads("auto", 2, cores=16) == 8, "torchrun's OMP_NUM_THREADS=1 is not the user's choice"
    assert cpu_threads("auto", 3, cores=2) == 1
    assert cpu_threads(3, 2, cores=16) == 3 and cpu_threads("4", 2, cores=16) == 4
    for bad in (0, -1, "many", True):
        with pytest.raises(ValueError, match="threads=.*expected auto or an integer >= 1"):
            cpu_threads(bad, 1, cores=2)
