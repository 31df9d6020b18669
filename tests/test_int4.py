"""Weight-only int4 (tp/int4.py) and its CPU kernel (tp/csrc/gemv.cpp's gemv_int4): the packing on
hand-computed bytes, quantization's levels, dequantization exact in float32, and the kernel within
float32 summation rounding of the exact product of the dequantized weight."""
import pytest
import torch

import tp.cpu_kernels as kernels
from conftest import RUNNABLE_ISAS, cpu_flags
from tp import int4


def test_packing_puts_channel_i_low_and_channel_16_plus_i_high_in_byte_i_of_each_block():
    q = torch.arange(64).remainder(16).reshape(1, 64)  # channel c holds c % 16
    packed = int4.pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 32)
    # block 0: byte i = channel i (i) low, channel 16 + i ((16 + i) % 16 = i) high -> i * 17
    assert packed[0, :16].tolist() == [i * 17 for i in range(16)]
    assert packed[0, 16:].tolist() == [i * 17 for i in range(16)]
    q2 = torch.tensor([[3] * 16 + [10] * 16])
    assert int4.pack(q2)[0].tolist() == [0xA3] * 16
    assert torch.equal(int4.unpack(int4.pack(q2)), q2.to(torch.uint8))


def test_quantize_round_trips_its_levels_and_keeps_zero_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g)
    w[0, :128] = 0  # an all-zero group
    w[1, 128:] = torch.linspace(-1.5, 3.0, 128)
    packed, scale, zero = int4.quantize_groups(w, 128)
    assert packed.shape == (6, 128) and scale.shape == zero.shape == (6, 2)
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8 and int(zero.max()) <= 15
    deq = int4.dequantize(packed, scale, zero)
    assert torch.equal(deq[0, :128], torch.zeros(128))
    # every weight within half a level of its group's scale
    step = scale.float().repeat_interleave(128, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # the range end points land on levels 0 and 15 of the linspace group
    q = int4.unpack(packed)[1, 128:]
    assert int(q.min()) == 0 and int(q.max()) == 15
    # the dequantized weight quantizes to itself (its values are levels)
    again = int4.dequantize(*int4.quantize_groups(deq, 128))
    assert torch.equal(again, deq)


def test_kernel_terms_give_the_dequantized_weight_to_the_bit():
    g = torch.Generator().manual_seed(1)
    packed, scale, zero = int4.quantize_groups(torch.randn(16, 512, generator=g) * 3, 128)
    s, o = int4.kernel_terms(scale, zero)
    q = int4.unpack(packed).float().reshape(16, 4, 128)
    assert torch.equal((q * s[..., None] + o[..., None]).reshape(16, 512), int4.dequantize(packed, scale, zero))


def test_groups_must_be_whole_blocks_and_row_splits_whole_groups():
    with pytest.raises(ValueError, match="multiple of 32"):
        int4.quantize_groups(torch.zeros(2, 96), 48)
    with pytest.raises(ValueError, match="whole number of groups"):
        int4.quantize_groups(torch.zeros(2, 96), 64)
    with pytest.raises(ValueError, match=r"11008 input channels are 86 groups of 128.*over 4 ranks"):
        int4.check_row_split(11008, 128, 4, "model.layers.0.mlp.down_proj.weight")
    int4.check_row_split(14336, 128, 4, "w2")  # 112 groups


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,group", [(1, 2048, 128), (2, 256, 32), (3, 512, 128), (5, 128, 64), (16, 1024, 128),
                                          (2, 1536, 384),  # 384: runs of 256 + 128 (no unrolled span count)
                                          (3, 224, 32)])  # 7 groups of 32: AVX2's pairs of groups, then a last one alone
def test_int4_kernel_is_float32_exact_up_to_summation_rounding(isa, x_dtype, rows, k, group):
    op = kernels.build(isa).gemv_int4
    g = torch.Generator().manual_seed(rows * 100 + k)
    n = 389
    packed, scale, zero = int4.quantize_groups(torch.randn(n, k, generator=g), group)
    w = int4.dequantize(packed, scale, zero).double()
    x = torch.randn(rows, k, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g).to(x_dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = op(x, packed, scale, zero, bias)
    finally:
        torch.set_num_threads(threads)
    assert y.dtype == x_dtype and y.shape == (rows, n)
    exact = x.double() @ w.t() + bias.double()
    # terms: q * x and offset * (group sums of x), each summed in float32; the group sums' own rounding
    q = int4.unpack(packed).double()
    s, o = (t.double() for t in int4.kernel_terms(scale, zero))
    xs = x.double().reshape(rows, k // group, group)
    magnitude = (x.double().abs() @ (q * s.repeat_interleave(group, 1)).t()
                 + xs.abs().sum(-1) @ o.abs().t() + bias.double().abs())
    bound = (k + 3) * 2 ** -24 * magnitude
    if x_dtype == torch.bfloat16:
        # x as int16 per group (gemv.cpp's BlockedX): each element off by at most 2^-15 of its group's
        # largest |x|, met by q * scale (the offset term takes x's exact group sums); then the output's
        # bfloat16 rounding. Or x as int8 per group, off by at most 2^-6 of the largest: AVX2 for groups
        # of 32 or a multiple of 64, AVX-512 with VNNI for a multiple of 128.
        int8_x = kernels.build(isa).int4_int8_x(group)
        assert int8_x == (group == 32 or group % 64 == 0 if isa == "avx2" else group % 128 == 0 and "avx512_vnni" in cpu_flags())
        largest = xs.abs().amax(-1).repeat_interleave(group, dim=1)
        bound = bound + (largest * 2 ** (-6 if int8_x else -15)) @ (q * s.repeat_interleave(group, 1)).abs().t()
        bound = bound + exact.abs() * 2 ** -8
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,group", [(96, 32), (128, 64), (256, 128)])
def test_int4_kernel_carries_nan_and_inf(isa, x_dtype, k, group):
    """A NaN or an infinity in x leaves its row of y not finite, whichever path rounds x (a group of
    int8 or int16 x gets no finite scale there), and the other rows as they were."""
    op = kernels.build(isa).gemv_int4
    packed, scale, zero = int4.quantize_groups(torch.ones(5, k), group)
    x = torch.ones(3, k, dtype=x_dtype)
    x[1, k - 5], x[2, 3] = float("nan"), float("inf")
    y = op(x, packed, scale, zero, None)
    expected = int4.dequantize(packed, scale, zero).sum(1)
    assert torch.allclose(y[0].float(), expected, rtol=1e-2)
    assert not y[1:].isfinite().any()


@pytest.mark.parametrize("rows,cols,group", [(7, 5504, 128), (3, 96, 32), (4, 2048, 64)])
def test_fused_rows_put_each_rows_scales_and_zeros_ahead_of_its_packed_bytes(rows, cols, group):
    """Three views into one buffer: a row is [scales | zeros | padding | packed], the packed bytes of
    every row on a cache line of their own start, and writing one view leaves the others as written."""
    packed, scale, zero = int4.fused_rows(rows, cols, group)
    head, row = int4.fused_row_layout(cols, group)
    groups = cols // group
    assert head % 64 == 0 and row % 64 == 0 and head >= 3 * groups and row >= head + cols // 2
    assert packed.shape == (rows, cols // 2) and scale.shape == zero.shape == (rows, groups)
    assert packed.stride() == (row, 1) and scale.stride() == (row // 2, 1) and zero.stride() == (row, 1)
    base = packed.untyped_storage().data_ptr()
    assert scale.untyped_storage().data_ptr() == zero.untyped_storage().data_ptr() == base
    assert packed.untyped_storage().nbytes() == rows * row
    assert all((packed[r].data_ptr() - base) == r * row + head and packed[r].data_ptr() % 64 == 0 for r in range(rows))
    assert all(zero[r].data_ptr() - scale[r].data_ptr() == 2 * groups for r in range(rows))
    want = int4.quantize_groups(torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols)), group)
    for view, value in zip((packed, scale, zero), want):
        view.copy_(value)
    assert all(torch.equal(view, value) for view, value in zip((packed, scale, zero), want))


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,group", [(1, 5504, 128), (2, 224, 32), (3, 512, 64), (1, 1536, 384)])
def test_int4_kernel_reads_fused_rows_as_it_reads_three_tensors(isa, x_dtype, rows, k, group):
    """The kernel walks each operand by its own row stride: on fused rows, bit for bit what it gives on
    three contiguous tensors (every path: float, int16 and int8 x, groups of 32, unrolled and not)."""
    op = kernels.build(isa).gemv_int4
    g = torch.Generator().manual_seed(k)
    n = 389
    want = int4.quantize_groups(torch.randn(n, k, generator=g), group)
    fused = int4.fused_rows(n, k, group)
    for view, value in zip(fused, want):
        view.copy_(value)
    assert not fused[0].is_contiguous()
    x = torch.randn(rows, k, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g).to(x_dtype)
    assert torch.equal(op(x, *fused, bias), op(x, *want, bias))


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("n,k,group", [(389, 224, 32), (100, 5504, 128), (7, 1536, 384), (33, 512, 64)])
def test_dequantize_kernel_gives_torchs_dequantized_weight_to_the_bit(isa, n, k, group):
    """Prefill's dequantization in C++ (one fma where torch multiplies then adds: the product is exact),
    from three tensors and from fused rows, into the caller's buffer."""
    op = kernels.build(isa).dequantize_int4
    want = int4.quantize_groups(torch.randn(n, k, generator=torch.Generator().manual_seed(k)), group)
    fused = int4.fused_rows(n, k, group)
    for view, value in zip(fused, want):
        view.copy_(value)
    exact = int4.dequantize(*want)
    out = torch.full((n, k), float("nan"))
    assert op(*want, out) is not None and torch.equal(out, exact)
    assert torch.equal(op(*fused, torch.empty(n, k)), exact)
    with pytest.raises(RuntimeError, match=r"out: contiguous float32 \[N, K\]"):
        op(*want, torch.empty(n, k + 32))


def test_int4_linear_in_blocks_through_the_kernel_equals_torchs_dequantization(monkeypatch):
    """Prefill: blocks of rows dequantized by the kernel into reused scratch give, bit for bit, the
    product torch's own dequantization gives (float32 and bfloat16 GEMMs; a smaller weight after a larger)."""
    from tp import malloc
    monkeypatch.setattr(malloc, "SCRATCH_BYTES", 256 * 4 * 100)  # blocks of 100 rows of K = 256
    g = torch.Generator().manual_seed(3)
    real_op = kernels.op
    for n, k in ((350, 256), (40, 128)):
        want = int4.quantize_groups(torch.randn(n, k, generator=g), 32)
        x = torch.randn(9, k, generator=g)
        for compute in (torch.float32, torch.bfloat16):
            monkeypatch.setattr(kernels, "op", real_op)
            ours = int4.int4_linear(x, *want, compute)
            monkeypatch.setattr(kernels, "op", lambda name: None)
            assert torch.equal(ours, int4.int4_linear(x, *want, compute)), (n, k, compute)
            tolerance = 1e-4 if compute == torch.float32 else 0.1
            assert torch.allclose(ours, x @ int4.dequantize(*want).t(), rtol=tolerance, atol=tolerance)
    monkeypatch.setattr(kernels, "op", real_op)
    assert kernels.op("dequantize_int4") is not None  # the first product above was the kernel's


def test_int4_kernel_refuses_bad_input_with_a_message():
    op = kernels.op("gemv_int4")
    x = torch.zeros(1, 64)
    packed, scale, zero = int4.quantize_groups(torch.zeros(4, 64), 32)
    with pytest.raises(RuntimeError, match=r"uint8 \[N, K / 2\]"):
        op(x, packed.view(torch.int8), scale, zero)
    with pytest.raises(RuntimeError, match="float16"):
        op(x, packed, scale.float(), zero)
    with pytest.raises(RuntimeError, match="whole blocks of 32"):
        op(x, packed, torch.zeros(4, 3, dtype=torch.float16), torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="rows contiguous"):  # rows may be strided, a row's bytes not
        op(x, torch.zeros(32, 4, dtype=torch.uint8).t(), scale, zero)
    with pytest.raises(RuntimeError, match="rows contiguous"):
        op(x, packed, torch.zeros(2, 4, dtype=torch.float16).t(), zero)


# ---- int4 in the model: cut == load, TP sizes, refusals, bytes ------------------------------------
import json  # noqa: E402

from conftest import PROMPTS  # noqa: E402
from cut_weights import CutError, CutOptions, cut  # noqa: E402
from tp.checkpoint import CheckpointError, CheckpointReader  # noqa: E402
from tp.load import load_model  # noqa: E402
from tp.tiny import write_tiny_checkpoint  # noqa: E402
from tp.tokenizer import Tokenizer  # noqa: E402
from tp_worker import spawn  # noqa: E402


@pytest.fixture(scope="module")
def int4_ckpt(tmp_path_factory):
    """The tiny model with K of 256 (hidden) and 512 (MLP): whole groups of 32 over 1, 2 and 4 ranks,
    of 128 over 1 and 2."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("int4") / "tiny", hidden_size=256, intermediate_size=512,
                                 num_attention_heads=16)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_int4_cut_equals_load_time_quantization_bit_for_bit(int4_ckpt, tmp_path, world_size):
    out = cut(CutOptions(str(int4_ckpt), str(tmp_path / "q"), world_size, quantize="int4", group_size=32,
                         progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantize"] == "int4" and manifest["group_size"] == 32
    quant = json.loads((out / "rank_0" / "config.json").read_text())["quantization"]
    assert quant["method"] == "weight_only_int4" and quant["group_size"] == 32
    with CheckpointReader(out / "rank_0") as r:
        assert r.dtype("model.layers.0.mlp.down_proj.weight") == torch.uint8
        assert r.shape("model.layers.0.mlp.down_proj.weight") == (256, 512 // world_size // 2)
        assert r.shape("model.layers.0.mlp.down_proj.weight_group_scale") == (256, 16 // world_size), "whole groups"
        assert r.shape("model.layers.0.mlp.gate_proj.weight_group_zero") == (512 // world_size, 8)
        assert r.dtype("model.layers.0.mlp.gate_proj.weight_group_scale") == torch.float16
    for rank in range(world_size):
        from_cut = dict(load_model(out, rank, world_size, dtype="float32").named_parameters())
        at_load = dict(load_model(int4_ckpt, rank, world_size, dtype="float32", quantize="int4",
                                  group_size=32).named_parameters())
        assert from_cut.keys() == at_load.keys()
        for name, p in at_load.items():
            assert p.dtype == from_cut[name].dtype and torch.equal(p, from_cut[name]), name
        assert from_cut["model.layers.1.self_attn.qkv_proj.weight"].dtype == torch.uint8


def test_int4_layers_hold_the_quantized_source_weights(int4_ckpt):
    """A column-parallel slice at TP=2 dequantizes to the rank's rows of the source quantized whole."""
    model = load_model(int4_ckpt, 1, 2, dtype="float32", quantize="int4", group_size=32)
    with CheckpointReader(int4_ckpt) as r:
        up = r.read("model.layers.2.mlp.up_proj.weight")
    whole = int4.dequantize(*int4.quantize_groups(up, 32))
    mlp = model.model.layers[2].mlp.gate_up_proj
    mine = int4.dequantize(mlp.weight, mlp.weight_group_scale, mlp.weight_group_zero)[256:]  # up rows after gate's
    assert torch.equal(mine, whole[256:512])
    # on the CPU each int4 layer's three tensors are fused rows, one buffer, counted once with its padding
    layers = [m for m in model.modules() if getattr(m, "format", None) is not None and m.format.kind == "int4"]
    assert len(layers) == 2 + 4 * model.cfg.num_hidden_layers  # qkv, o, gate_up, down; embedding, LM head
    for m in layers:
        storage = m.weight.untyped_storage()
        assert m.weight_group_scale.untyped_storage().data_ptr() == m.weight_group_zero.untyped_storage().data_ptr() == storage.data_ptr()
        assert storage.nbytes() == m.weight.shape[0] * int4.fused_row_layout(m.weight.shape[1] * 2, 32)[1]
    fused = {m.weight.untyped_storage().data_ptr(): m.weight.untyped_storage().nbytes() for m in layers}
    others = sum(p.numel() * p.element_size() for p in model.parameters() if p.untyped_storage().data_ptr() not in fused)
    assert model.weight_bytes() == sum(fused.values()) + others


def test_int4_greedy_tokens_do_not_depend_on_tp_size(int4_ckpt, tmp_path):
    """float32 activations, groups of 128: TP=2 gives TP=1's greedy tokens, batched and alone (decode
    through the int4 kernel, prefill through dequantized blocks)."""
    tok = Tokenizer(int4_ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    one = spawn(1, int4_ckpt, prompts, 12, tmp_path / "1", dtype="float32", quantize="int4")[0]
    two = spawn(2, int4_ckpt, prompts, 12, tmp_path / "2", dtype="float32", quantize="int4")
    assert all(r["batched"] == one["batched"] and r["alone"] == one["alone"] for r in two)
    assert one["batched"] == one["alone"]


def test_int4_refuses_a_tp_size_that_splits_groups_before_reading(int4_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"256 input channels are 2 groups of 128.*over 4 ranks"):
        load_model(int4_ckpt, 0, 4, quantize="int4")
    with pytest.raises(CutError, match=r"512 input channels are 4 groups of 128.*over 8 ranks|groups of 128"):
        cut(CutOptions(str(int4_ckpt), str(tmp_path / "q"), 4, quantize="int4", progress=False))
    assert not (tmp_path / "q").exists()
    out = cut(CutOptions(str(int4_ckpt), str(tmp_path / "q2"), 2, quantize="int4", progress=False))
    with pytest.raises(CheckpointError, match="made with quantize=int4, launched with model.quantize=int8"):
        load_model(out, 0, 2, quantize="int8")


def test_int4_partition_bytes_against_float32(int4_ckpt, tmp_path):
    f32 = cut(CutOptions(str(int4_ckpt), str(tmp_path / "f32"), 1, progress=False))
    q = cut(CutOptions(str(int4_ckpt), str(tmp_path / "q"), 1, quantize="int4", progress=False))
    size = lambda d: sum(p.stat().st_size for p in d.glob("rank_*/*.safetensors"))  # noqa: E731
    assert size(q) <= 0.16 * size(f32)


# ---- int4 off the CPU: the routes and the operands each fused op takes -----------------------------
from tp.routing import int4_route, npu_soc_has_int4  # noqa: E402


def test_int4_routes_follow_each_ops_documented_limits():
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert int4_route("cuda", bf16, 4096, 4096, 128, 1, (8, 0)) == ("aten_int4pack", "")
    assert int4_route("cuda", bf16, 4096, 4096, 128, 512, (9, 0)) == ("dequant", ""), "prefill: the float GEMM"
    assert int4_route("cuda", bf16, 4096, 4096, 128, 1, (7, 5))[1].startswith("_weight_int4pack_mm needs compute")
    assert "bfloat16" in int4_route("cuda", f16, 4096, 4096, 128, 1, (8, 0))[1]
    assert "groups of" in int4_route("cuda", bf16, 4096, 4096, 48, 1, (8, 0))[1]
    assert "K a multiple of 128" in int4_route("cuda", bf16, 4096, 4160, 64, 1, (8, 0))[1]
    assert int4_route("npu", f16, 4096, 4096, 128, 8, npu_int4=True) == ("npu_weight_quant", "")
    assert int4_route("npu", bf16, 4096, 4096, 128, 8, npu_int4=False)[0] == "dequant"
    assert "65535" in int4_route("npu", bf16, 103168 * 2, 4096, 128, 1, npu_int4=True)[1]
    assert "multiple of 32" in int4_route("npu", bf16, 4096, 4096, 48, 1, npu_int4=True)[1]
    assert int4_route("npu", f32, 4096, 4096, 128, 1, npu_int4=True)[0] == "dequant"
    assert int4_route("cpu", bf16, 4096, 4096, 128, 64) == ("dequant", "")
    assert npu_soc_has_int4("Ascend910B3") and npu_soc_has_int4("Ascend910_9391")
    assert not npu_soc_has_int4("Ascend910A") and not npu_soc_has_int4("Ascend310P3")


def test_aten_int4pack_operands_match_torchs_own_cpu_twin():
    """CUDA's _weight_int4pack_mm cannot run here; its CPU twin takes the same scales_and_zeros
    ((q - 8) * scale + zero) with the weight as int32, so the terms are checked through it, and the
    uint8 byte order (channel 2j high, 2j + 1 low) on hand-computed bytes."""
    q = torch.tensor([[1, 2, 3, 4] * 8])  # 32 channels
    pairs, _ = int4.aten_int4pack_operands(int4.pack(q), torch.ones(1, 1), torch.zeros(1, 1))
    assert pairs.dtype == torch.uint8 and pairs[0, :2].tolist() == [0x12, 0x34]
    g = torch.Generator().manual_seed(3)
    packed, scale, zero = int4.quantize_groups(torch.randn(64, 256, generator=g), 64)
    s, o = int4.kernel_terms(scale, zero)
    pairs, scales_and_zeros = int4.aten_int4pack_operands(packed, s, o)
    assert scales_and_zeros.shape == (4, 64, 2)
    unpacked = torch.stack([pairs >> 4, pairs & 0xF], dim=-1).reshape(64, 256).to(torch.int32)
    assert torch.equal(unpacked, int4.unpack(packed).to(torch.int32))
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked, 1)
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 64, scales_and_zeros.to(torch.bfloat16))
    exact = x.double() @ int4.dequantize(packed, scale, zero).double().t()
    # weights made in bfloat16 (2^-8 each) and a bfloat16 result (2^-8): within 2^-7 of the sum of |terms|, twice that here
    bound = 2 ** -6 * (x.double().abs() @ int4.dequantize(packed, scale, zero).double().abs().t())
    assert ((y.double() - exact).abs() <= bound).all()


def test_npu_operands_give_the_dequantized_weight_through_the_documented_formula():
    """npu_weight_quant_batchmatmul's reference (torch_npu's tests): x @ ((w + offset) * scale), w in
    [-8, 7] as npu_convert_weight_to_int4pack takes it, scale and offset per group of K rows."""
    g = torch.Generator().manual_seed(4)
    packed, scale, zero = int4.quantize_groups(torch.randn(48, 256, generator=g), 128)
    w, s, o = int4.npu_operands(packed, scale, zero)
    assert w.shape == (256, 48) and w.dtype == torch.int32 and int(w.min()) >= -8 and int(w.max()) <= 7
    assert s.shape == o.shape == (2, 48)
    rows = (w.double() + o.double().repeat_interleave(128, 0)) * s.double().repeat_interleave(128, 0)
    assert torch.equal(rows.t().float(), int4.dequantize(packed, scale, zero))
