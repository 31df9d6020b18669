"""The device decisions of tp/routing.py, checked here for npu and cuda too (no such device is present):
each of the four calls that would fail on an Ascend card, and the decode loop's host reads."""
import logging
import sys
import types

import pytest
import torch
import torch.distributed as dist

import tp.generate as generation
from tp import routing
from tp.generate import generate
from conftest import ScriptedModel
from tp.quant import int8_linear, quantize_rows


def test_timings_are_reduced_in_a_dtype_hccl_all_reduces(monkeypatch):
    """Failure 1: a float64 all-reduce stops every task=performance at TP > 1 on an NPU."""
    from launch.performance import _max_over_ranks
    for kind in ("npu", "cuda", "cpu"):
        assert routing.reduction_dtype(kind) == torch.float32
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append(t.dtype))
    assert _max_over_ranks([1.5, 2.25], torch.device("cpu")) == [1.5, 2.25]
    assert seen == [torch.float32]


@pytest.mark.parametrize("x_dtype,n,k,route", [
    (torch.bfloat16, 4096, 4096, "npu_weight_quant"),
    (torch.float16, 12288, 4096, "npu_weight_quant"),
    (torch.float32, 4096, 4096, "dequant"),        # failure 2: float32 activations
    (torch.bfloat16, 103168, 4096, "dequant"),     # failure 3: InternLM-7B's LM head at TP=1
    (torch.bfloat16, 4096, 65536, "dequant"),
])
def test_int8_on_npu_only_within_the_ops_documented_limits(x_dtype, n, k, route):
    got, why = routing.int8_route("npu", x_dtype, n, k)
    assert got == route and (why == "") == (route == "npu_weight_quant")
    assert routing.int8_route("cuda", x_dtype, n, k)[0] == "dequant"


def test_int8_linear_calls_the_npu_op_as_documented_and_falls_back_once_with_a_reason(monkeypatch, caplog):
    import tp.quant as quant
    calls = []
    fake = types.ModuleType("torch_npu")
    fake.npu_weight_quant_batchmatmul = lambda x, w, s: calls.append((x.shape, w.shape, s.dtype)) or x @ (w.float() * s).to(x.dtype)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    q, scale = quantize_rows(torch.randn(6, 32))
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "int8_route", lambda *a: ("npu_weight_quant", ""))
    assert int8_linear(x, q, scale).shape == (2, 3, 6)
    assert calls == [((6, 32), (32, 6), torch.bfloat16)], "2-D activations, q transposed, scale in x's dtype"
    monkeypatch.setattr(quant, "int8_route", lambda *a: ("dequant", "a reason"))
    monkeypatch.setattr(quant, "_told", set())
    with caplog.at_level(logging.INFO, logger="internlm_tp"):
        int8_linear(x, q, scale)
        int8_linear(x, q, scale)
    assert caplog.text.count("a reason; dequantizing instead") == 1 and len(calls) == 1


def test_single_rows_never_reach_torch_mv_off_the_cpu():
    """Failure 4: aclnnMv takes fp16/fp32 only, so a bfloat16 batch-1 step through torch.mv fails."""
    for kind in ("npu", "cuda"):
        assert routing.matmul_route(kind, 1, 16) == "linear"
    assert routing.matmul_route("cpu", 1, 16) == "decode" and routing.matmul_route("cpu", 17, 16) == "linear"


def test_hccl_timeouts_follow_dist_timeout_unless_the_user_set_them():
    assert routing.hccl_environment(1200, {}) == {"HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1200"}
    assert routing.hccl_environment(30, {"HCCL_CONNECT_TIMEOUT": "600"}) == {"HCCL_EXEC_TIMEOUT": "120"}


def test_decode_loop_reads_the_device_only_every_few_steps_and_never_without_eos(monkeypatch):
    reads = []
    real = generation.all_finished
    monkeypatch.setattr(generation, "all_finished", lambda f: reads.append(1) or real(f))
    script = [[5, 2, 6, 6], [4, 4, 4, 4, 4, 4, 4, 2]]
    cpu = generate(ScriptedModel(script), [[1, 3], [1]], 20, eos_id=2)
    cpu_reads = len(reads)
    reads.clear()
    monkeypatch.setattr(generation, "eos_check_interval", lambda kind: routing.eos_check_interval("npu"))
    accel = generate(ScriptedModel(script), [[1, 3], [1]], 20, eos_id=2)
    assert accel.tokens == cpu.tokens == [[5, 2], [4, 4, 4, 4, 4, 4, 4, 2]], "the same tokens and stop points"
    # CPU: a look before each of steps 1..8 (the 8th finds every row ended). Every 8 steps: before
    # steps 1 and 9; steps 1..8 ran, the last one emitting masked EOS only.
    assert cpu_reads == 8 and cpu.decode_steps == 7
    assert len(reads) == 2 and accel.decode_steps == 8
    reads.clear()
    generate(ScriptedModel(script), [[1, 3], [1]], 20, eos_id=-1)
    assert reads == [], "eos_id=-1 (benchmarks): no read inside the loop"


def test_profiled_and_unprofiled_next_token_times_agree_on_the_cpu(tiny_ckpt):
    """On the CPU a sync is free, so the profiled pass (whose split fills the CSV's pre / forward /
    post columns) must time a step like the unprofiled one, within noise."""
    from tp.load import load_model
    model = load_model(tiny_ckpt)
    prompt = [[1] + list(range(5, 40))]
    generate(model, prompt, 8, eos_id=-1)
    plain, runs = [], []
    for _ in range(5):  # alternated, so a slow spell of the shared host falls on both alike
        plain.append(generate(model, prompt, 48, eos_id=-1).next_token_ms)
        runs.append(generate(model, prompt, 48, eos_id=-1, profile=True))
    profiled = min(r.next_token_ms for r in runs)
    assert 0.67 < profiled / min(plain) < 1.5
    best = min(runs, key=lambda r: r.next_token_ms)
    assert best.pre_ms + best.forward_ms + best.post_ms == pytest.approx(best.next_token_ms, rel=0.25)
