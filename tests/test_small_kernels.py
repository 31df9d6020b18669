"""The decode rows' small kernels against torch's paths: tp/csrc/rms_norm.cpp (transformers'
LlamaRMSNorm order of roundings) and tp/csrc/swiglu.cpp (silu(gate) * up), each within a float32 ulp
before the dtype's rounding, so at most one rounding step of the dtype apart."""
import pytest
import torch
import torch.nn.functional as F

import tp.cpu_kernels as kernels
from conftest import RUNNABLE_ISAS
from tp.model import RMSNorm


def _torch_path(x, weight, eps):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(1, 2048), (3, 20), (16, 4096), (300, 2048)])  # 300: a prefill
def test_kernel_matches_torchs_rms_norm(isa, dtype, rows, dim):
    op = kernels.build(isa).rms_norm
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    weight = torch.randn(dim, generator=g).to(dtype)
    y, expected = op(x, weight, 1e-6), _torch_path(x, weight, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    else:  # the normalised value may round to the neighbouring bfloat16 (up to 2^-7 of it), and the
        # product with the weight then to a neighbour of torch's: up to two steps of the result (2^-6 of
        # it; at 300 rows, a few of 600 K elements go past one)
        step = (expected.float().abs() * 2 ** -6).clamp_min(1e-30)
        assert ((y.float() - expected.float()).abs() <= step).all()
        assert (y == expected).float().mean() > 0.99, "nearly every element rounds alike"


def test_module_takes_the_kernel_on_the_cpu_for_any_number_of_rows(monkeypatch):
    norm = RMSNorm(64, 1e-5, torch.float32)
    norm.weight.data.normal_()
    calls = []
    real = kernels.op("rms_norm")
    monkeypatch.setattr(kernels, "op", lambda name: lambda x, w, eps: calls.append((name, x.shape)) or real(x, w, eps))
    for x in (torch.randn(2, 1, 64), torch.randn(1, 40, 64)):  # decode; a prefill, past cpu_kernels.MAX_ROWS
        torch.testing.assert_close(norm(x), _torch_path(x, norm.weight, 1e-5), rtol=1e-6, atol=1e-6)
    assert calls == [("rms_norm", (2, 64)), ("rms_norm", (40, 64))]
    half = RMSNorm(64, 1e-5, torch.float16)
    half.weight.data.normal_()
    x = torch.randn(1, 3, 64).half()  # a dtype the kernel has no path for: torch's
    torch.testing.assert_close(half(x), _torch_path(x, half.weight, 1e-5))
    assert len(calls) == 2


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_torchs_add_then_the_norm_kernel(isa, dtype):
    ops = kernels.build(isa)
    g = torch.Generator().manual_seed(7)
    x, residual = (torch.randn(3, 2048, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(2048, generator=g).to(dtype)
    stream = residual.clone()
    y = ops.add_rms_norm(x, stream, weight, 1e-6)
    assert torch.equal(stream, x + residual), "the residual becomes the sum, rounded as torch adds"
    assert torch.equal(y, ops.rms_norm(x + residual, weight, 1e-6)), "then the same norm, bit for bit"
    with pytest.raises(RuntimeError, match="residual: contiguous, x's shape and dtype"):
        ops.add_rms_norm(x, torch.zeros(3, 2048, dtype=torch.float64), weight, 1e-6)


def test_module_adds_and_norms_in_one_call(monkeypatch):
    norm = RMSNorm(64, 1e-5, torch.float32)
    norm.weight.data.normal_()
    calls = []
    real = kernels.op

    def counted(name):  # records each call of an op (not its lookup)
        op = real(name)
        return lambda *args: calls.append(name) or op(*args)
    monkeypatch.setattr(kernels, "op", counted)
    # decode rows, prefill rows: one call each; a residual that is a strided view: torch's add, then the norm
    for shape, strided, expected_calls in (((2, 1, 64), False, ["add_rms_norm"]), ((1, 40, 64), False, ["add_rms_norm"]),
                                           ((3, 1, 64), True, ["rms_norm"])):
        x = torch.randn(shape)
        residual = torch.randn(shape[0], 2, 64)[:, -1:] if strided else torch.randn(shape)
        expected_sum = x + residual
        y, stream = norm.add_and_norm(x, residual.clone() if not strided else residual)
        assert torch.equal(stream, expected_sum)
        torch.testing.assert_close(y, _torch_path(expected_sum, norm.weight, 1e-5), rtol=1e-6, atol=1e-6)
        assert calls == expected_calls
        calls.clear()


def test_kernel_refuses_bad_input_with_a_message():
    op = kernels.op("rms_norm")
    with pytest.raises(RuntimeError, match="weight: \\[D\\] in x's dtype"):
        op(torch.randn(2, 8), torch.randn(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="x: contiguous \\[M, D\\]"):
        op(torch.randn(8), torch.randn(8), 1e-6)


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_matches_torchs_silu_times_up(isa, dtype):
    op = kernels.build(isa).swiglu
    gate_up = (torch.randn(300, 2 * 5504, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)  # a prefill's
    gate, up = gate_up.chunk(2, dim=-1)
    y, expected = op(gate_up), F.silu(gate) * up
    assert y.dtype == dtype and y.shape == (300, 5504)
    if dtype == torch.float32:  # exp may differ from torch's in the last bit
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    else:  # silu may round to the neighbouring bfloat16 (one step, 2^-7 of it), then the product's rounding
        bound = 2 ** -7 * (F.silu(gate).float() * up.float()).abs() + 2 ** -8 * expected.float().abs()
        assert ((y.float() - expected.float()).abs() <= bound).all()
        assert (y == expected).float().mean() > 0.99, "nearly every element rounds alike"


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_matches_torch_at_the_edges_of_exp(isa, dtype):
    """The kernel's own e^x (tp/csrc/swiglu.cpp) where it clamps, overflows and underflows, and on
    infinities and NaN: what torch's silu gives."""
    op = kernels.build(isa).swiglu
    gate = torch.tensor([float("-inf"), -100.0, -88.8, -88.5, -87.5, -87.2, -20.0, -1e-3, 0.0, 1e-3, 5.0, 80.0,
                         88.8, 100.0, float("inf"), float("nan")])
    gate_up = torch.cat([gate, torch.full_like(gate, 1.5)]).to(dtype)[None]
    expected = F.silu(gate_up[:, :16]) * gate_up[:, 16:]
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(op(gate_up), expected, rtol=tol, atol=0, equal_nan=True)


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_is_torch_max_index(isa, dtype):
    """Greedy choice: the first largest value's index, NaN the largest, as torch.max(x, -1).indices,
    over rows of many lengths (a chunk's edge, the bench's vocabulary), ties, infinities and NaN."""
    op = kernels.build(isa).argmax_rows
    g = torch.Generator().manual_seed(11)
    for v in (1, 7, 255, 256, 257, 103168):
        x = torch.randn(3, v, generator=g).to(dtype)
        assert torch.equal(op(x), torch.max(x, dim=-1).indices), v
    x = torch.zeros(6, 600, dtype=dtype)
    x[0, [5, 300, 599]] = 2.0                       # ties: the first
    x[1, 400], x[1, 10] = float("inf"), 3.0         # inf is a value like any other
    x[2, 500], x[2, 20] = float("nan"), 9.0         # NaN wins wherever it is
    x[3, [260, 450]] = float("nan")                 # the first NaN
    x[4] = float("-inf")                            # all -inf: index 0
    x[5, 0], x[5, 1] = -0.0, 0.0                    # -0 == 0: the first
    assert torch.equal(op(x), torch.max(x, dim=-1).indices)
    assert op(x).tolist() == [5, 400, 500, 260, 0, 0]


def test_greedy_choice_takes_the_kernel_for_cpu_logits(monkeypatch):
    from tp.generate import Sampling, choose
    calls = []
    real = kernels.op("argmax_rows")
    monkeypatch.setattr(kernels, "op", lambda name: lambda x: calls.append((name, x.dtype)) or real(x))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(2, 1000).to(dtype)
        assert torch.equal(choose(logits, Sampling(), None), torch.max(logits, dim=-1).indices)
    assert calls == [("argmax_rows", torch.float32), ("argmax_rows", torch.bfloat16)], "float16: torch's path"
