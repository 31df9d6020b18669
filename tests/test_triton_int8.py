"""tp/triton_int8.py, the fused int8 matmul for decode rows on a GPU, run here in Triton's interpreter
(TRITON_INTERPRET=1, in a fresh process: the variable is read when Triton is first imported) against
float64; and tp.quant.int8_linear sending CUDA decode rows to it (tp.routing.int8_route)."""
import subprocess
import sys
import textwrap

import torch

from conftest import ROOT
from tp import routing


def test_route_takes_cuda_decode_rows_of_half_precision_where_triton_is():
    assert routing.int8_route("cuda", torch.bfloat16, 4096, 4096, rows=1, triton=True) == ("triton", "")
    assert routing.int8_route("cuda", torch.float16, 4096, 4096, rows=16, triton=True) == ("triton", "")
    assert routing.int8_route("cuda", torch.bfloat16, 4096, 4096, rows=17, triton=True) == ("dequant", ""), \
        "prefill rows: a GEMM's"
    assert routing.int8_route("cuda", torch.float32, 4096, 4096, rows=1, triton=True) == \
        ("dequant", "the fused int8 kernel takes float16/bfloat16 activations, not torch.float32")
    assert routing.int8_route("cuda", torch.bfloat16, 4096, 4096, rows=1, triton=False) == \
        ("dequant", "Triton is not installed")
    assert routing.int8_route("cpu", torch.bfloat16, 4096, 4096, rows=1, triton=True)[0] == "dequant"


INTERPRETED = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {root!r})
    import torch
    import tp.quant as quant
    from tp.triton_int8 import int8_rows_linear
    g = torch.Generator().manual_seed(0)
    for dtype, step in ((torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)):
        for rows, n, k in ((1, 200, 300), (3, 64, 128), (16, 130, 257), (2, 1, 5)):
            x = torch.randn(rows, k, generator=g).to(dtype)
            q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, generator=g) * 0.01 + 1e-3
            y = int8_rows_linear(x.view(1, rows, k), q, scale)
            assert y.shape == (1, rows, n) and y.dtype == dtype, (y.shape, y.dtype)
            exact = (x.double() @ q.double().t()) * scale.double()
            # one rounding of the result to x's dtype (an ulp: the interpreter may truncate), float32 sums
            bound = exact.abs() * step + 1e-5 * (x.double().abs() @ q.double().abs().t()) * scale.double()
            assert ((y[0].double() - exact).abs() <= bound).all(), (dtype, rows, n, k)
    # int8_linear routes CUDA decode rows to it: the same values as the kernel called directly
    quant.int8_route = lambda *a: ("triton", "")
    x = torch.randn(2, 64, generator=g).bfloat16()
    q, scale = quant.quantize_rows(torch.randn(48, 64, generator=g))
    assert torch.equal(quant.int8_linear(x, q, scale), int8_rows_linear(x, q, scale))
    try:
        int8_rows_linear(torch.randn(17, 64).bfloat16(), q, scale)
    except ValueError as err:
        assert "up to 16 float16/bfloat16 rows" in str(err)
    else:
        raise AssertionError("17 rows accepted")
    print("ok")
""")


def test_kernel_in_the_interpreter_matches_float64():
    proc = subprocess.run([sys.executable, "-c", INTERPRETED.format(root=str(ROOT))], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
