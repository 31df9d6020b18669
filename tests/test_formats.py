"""AWQ and GPTQ 4-bit checkpoints (tp/formats.py), written here by packers that follow their writers'
sources (AutoAWQ's WQLinear_GEMM.pack, AutoGPTQ's QuantLinear.pack), checked first on hand-computed
words: loaded directly and through the cutter, at TP=1, 2 and 4, to the format's own dequantized
weights to the bit; greedy tokens at TP=2 equal TP=1's; the variants we do not read refused by name."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import PROMPTS
from cut_weights import CutError, CutOptions, cut
from tp import int4
from tp.checkpoint import CheckpointError, CheckpointReader
from tp.formats import detect, open_checkpoint
from tp.load import load_model
from tp.quant import is_quantized
from tp.tiny import write_tiny_checkpoint
from tp.tokenizer import Tokenizer
from tp_worker import spawn

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ pack: nibble i of a word holds channel 8 * col + order_map[i]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] of integers [rows, cols] in [0, 15], as AutoAWQ's pack loops."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int32)
    for col in range(values.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + AWQ_ORDER_MAP[i]].to(torch.int32) << (i * 4)
    return packed


def gptq_pack_rows(values: torch.Tensor) -> torch.Tensor:
    """int32 [rows / 8, cols]: AutoGPTQ's qweight, 8 consecutive input rows a word, in order."""
    packed = torch.zeros(values.shape[0] // 8, values.shape[1], dtype=torch.int32)
    for row in range(values.shape[0] // 8):
        for j in range(8):
            packed[row] |= values[row * 8 + j].to(torch.int32) << (4 * j)
    return packed


def gptq_pack_cols(values: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8]: AutoGPTQ's qzeros, 8 consecutive columns a word, in order."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int32)
    for col in range(values.shape[1] // 8):
        for j in range(8):
            packed[:, col] |= values[:, col * 8 + j].to(torch.int32) << (4 * j)
    return packed


def _word(packed: torch.Tensor) -> int:
    return int(packed.reshape(-1)[0]) & 0xFFFFFFFF


def test_packers_on_hand_computed_words():
    channels = torch.arange(8).reshape(1, 8)  # channel c holds c
    # AWQ: nibbles (low to high) hold channels 0, 2, 4, 6, 1, 3, 5, 7
    assert _word(awq_pack(channels)) == 0x75316420
    assert _word(gptq_pack_cols(channels)) == 0x76543210
    assert _word(gptq_pack_rows(channels.t())) == 0x76543210
    assert _word(awq_pack(torch.full((1, 8), 15))) == 0xFFFFFFFF  # a negative int32, as the writers store it


def shuffled_groups(k: int, group: int) -> torch.Tensor:
    """An act-order g_idx: every group `group` channels, scattered (one per input size, as GPTQ gives
    layers that read the same input the same one)."""
    return torch.randperm(k, generator=torch.Generator().manual_seed(k)) // group


def _quantized_linears(state: dict[str, torch.Tensor], group: int, g_idx: str):
    """{prefix: (q [out, in], zero [out, groups] in 1..15, scale float16 [out, groups], group of each
    input channel)} for every linear weight: our rounding over each group's channels, zeros kept off 0
    (GPTQ v1 cannot store a zero of 0: `zeros -= 1` wraps)."""
    out = {}
    for name, w in state.items():
        if not is_quantized(name, "int4", lm_head=False, embedding=False):
            continue
        k = w.shape[1]
        groups = torch.arange(k) // group if g_idx == "ordered" else shuffled_groups(k, group)
        order = torch.sort(groups, stable=True).indices  # each group's channels together
        packed, scale, zero = int4.quantize_groups(w[:, order], group)
        q = torch.empty(w.shape, dtype=torch.long)
        q[:, order] = int4.unpack(packed).long()
        out[name.removesuffix(".weight")] = (q, zero.clamp(min=1).long(), scale, groups)
    return out


def write_published(src, dst, method: str, group: int = 32, fmt: str = "safetensors", g_idx: str = "ordered",
                    **extra):
    """A copy of the float checkpoint `src` in `method`'s layout; returns (dir, {prefix: dequantized
    float32 weight [out, in] by the format's own formula})."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.bin", "*.json", "*.safetensors"))
    with CheckpointReader(src) as r:
        state = {n: r.read(n) for n in r.names()}
    linears = _quantized_linears(state, group, g_idx)
    tensors, expected = {}, {}
    for name, t in state.items():
        prefix = name.removesuffix(".weight")
        if prefix not in linears:
            tensors[name] = t.to(torch.float16)
            continue
        q, zero, scale, group_of = linears[prefix]
        if method == "awq":
            tensors[prefix + ".qweight"] = awq_pack(q.t())
            tensors[prefix + ".qzeros"] = awq_pack(zero.t())
            tensors[prefix + ".scales"] = scale.t().contiguous()
            # AutoAWQ's dequantization: (q - z) * s, per input row's group
            expected[prefix] = ((q - zero[:, group_of]).float() * scale.float()[:, group_of])
        else:
            tensors[prefix + ".qweight"] = gptq_pack_rows(q.t())
            tensors[prefix + ".qzeros"] = gptq_pack_cols(zero.t() - 1)  # v1: zeros minus one
            tensors[prefix + ".scales"] = scale.t().contiguous()
            tensors[prefix + ".g_idx"] = group_of.to(torch.int32)
            # AutoGPTQ's: scales[g_idx] * (q - (qzeros + 1)[g_idx]); our columns in the sorted order
            w = (q - zero[:, group_of]).float() * scale.float()[:, group_of]
            expected[prefix] = w[:, torch.sort(group_of, stable=True).indices]
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    else:
        torch.save(tensors, dst / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "float16"
    if method == "awq":
        quant = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    else:
        quant = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": g_idx != "ordered",
                 "sym": False, "checkpoint_format": "gptq"}
    config["quantization_config"] = {**quant, **extra}
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.glob("*.json"):
        if f.name not in ("config.json", "pytorch_model.bin.index.json"):
            shutil.copyfile(f, dst / f.name)
    return dst, expected


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fmt") / "tiny", hidden_size=256, intermediate_size=512,
                                 num_attention_heads=16)


@pytest.fixture(scope="module", params=[("awq", "safetensors", "ordered"), ("gptq", "safetensors", "ordered"),
                                        ("gptq", "bin", "ordered"), ("gptq", "safetensors", "shuffled")],
                ids=["awq", "gptq", "gptq-bin", "gptq-act-order"])
def published(request, float_ckpt, tmp_path_factory):
    method, fmt, g_idx = request.param
    return write_published(float_ckpt, tmp_path_factory.mktemp(method) / "ckpt", method, fmt=fmt, g_idx=g_idx)


def _dequantized(model, prefix_param: str) -> torch.Tensor:
    params = dict(model.named_parameters())
    return int4.dequantize(params[prefix_param + ".weight"], params[prefix_param + ".weight_group_scale"],
                           params[prefix_param + ".weight_group_zero"])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_published_int4_loads_to_the_formats_dequantized_weights(published, tmp_path, world_size):
    path, expected = published
    layer = "model.layers.1"
    q, k, v = (expected[f"{layer}.self_attn.{p}_proj"] for p in "qkv")
    o, down = expected[f"{layer}.self_attn.o_proj"], expected[f"{layer}.mlp.down_proj"]
    gate, up = expected[f"{layer}.mlp.gate_proj"], expected[f"{layer}.mlp.up_proj"]
    out = cut(CutOptions(str(path), str(tmp_path / "cut"), world_size, progress=False))
    assert json.loads((out / "manifest.json").read_text())["quantize"] == "int4"
    for rank in range(world_size):
        direct = load_model(path, rank, world_size, dtype="float32")
        from_cut = load_model(out, rank, world_size, dtype="float32")
        assert direct.quantize == from_cut.quantize == "int4"
        a, b = dict(direct.named_parameters()), dict(from_cut.named_parameters())
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), "cut == direct, to the bit"
        rows = lambda t: t.chunk(world_size)[rank]  # noqa: E731
        cols = lambda t: t.chunk(world_size, dim=1)[rank]  # noqa: E731
        assert torch.equal(_dequantized(direct, f"{layer}.self_attn.qkv_proj"), torch.cat([rows(q), rows(k), rows(v)]))
        assert torch.equal(_dequantized(direct, f"{layer}.mlp.gate_up_proj"), torch.cat([rows(gate), rows(up)]))
        assert torch.equal(_dequantized(direct, f"{layer}.self_attn.o_proj"), cols(o))
        assert torch.equal(_dequantized(direct, f"{layer}.mlp.down_proj"), cols(down))
        assert a["lm_head.weight"].dtype == torch.float32, "embedding and LM head stay float"


def test_published_int4_greedy_tokens_do_not_depend_on_tp_size(published, tmp_path):
    path, _ = published
    tok = Tokenizer(path)
    prompts = [tok.encode(p) for p in PROMPTS]
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    one = spawn(1, path, prompts, 10, tmp_path / "1", dtype="float32")[0]
    two = spawn(2, path, prompts, 10, tmp_path / "2", dtype="float32")
    assert all(r["batched"] == one["batched"] and r["alone"] == one["alone"] for r in two)


@pytest.mark.parametrize("extra,message", [
    ({"bits": 8}, "gptq with 8 bits; only 4-bit"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"group_size": -1}, "group_size -1"),
    ({"modules_to_not_convert": ["model.layers.0.mlp"]}, "modules_to_not_convert"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
])
def test_gptq_variants_we_do_not_read_are_refused_by_name(float_ckpt, tmp_path, extra, message):
    path, _ = write_published(float_ckpt, tmp_path / "ckpt", "gptq", **extra)
    with pytest.raises(CheckpointError, match=message):
        detect(path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, 0, 1)


def test_awq_variants_and_act_order_are_refused_by_name(float_ckpt, tmp_path):
    for i, (extra, message) in enumerate([({"version": "exllama"}, "AWQ version 'exllama'"),
                                          ({"zero_point": False}, "zero_point false")]):
        path, _ = write_published(float_ckpt, tmp_path / f"awq{i}", "awq", **extra)
        with pytest.raises(CheckpointError, match=message):
            load_model(path, 0, 1)
    path, _ = write_published(float_ckpt, tmp_path / "act", "gptq", g_idx="shuffled")
    assert "model.layers.0.mlp.down_proj.weight_input_perm" in open_checkpoint(path).names()  # ours, act-order
    raw = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path / "model.safetensors"))
    raw["model.layers.0.mlp.down_proj.g_idx"][:64] = 0  # group 0 now has more than 32 channels
    save_file(raw, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="g_idx does not give every group 32 input channels"):
        load_model(path, 0, 1)


def test_published_int4_refuses_requantization_and_tp_that_splits_groups(published, tmp_path):
    path, _ = published
    with pytest.raises(CheckpointError, match="4-bit: launch with model.quantize=auto"):
        load_model(path, 0, 1, quantize="int8")
    with pytest.raises(CutError, match="4-bit already"):
        cut(CutOptions(str(path), str(tmp_path / "c"), 1, quantize="int8", progress=False))
    # groups of 32: o_proj's 256 inputs are 8 groups, down_proj's 512 are 16: 16 ranks would cut o_proj's
    with pytest.raises(CheckpointError, match="8 groups of 32"):
        load_model(path, 0, 16)
