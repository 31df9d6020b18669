"""Device decisions as pure functions of (device type, dtype, shape), so the CPU test suite checks them
for `npu` and `cuda` too, where no such device is present. Each encodes a documented limit:

- HCCL all-reduce takes int8/16/32/64, fp16, fp32 and bf16 (fp64 only on the newest chips):
  Ascend/pytorch ProcessGroupHCCL, "Unsupported data type" otherwise.
- torch_npu.npu_weight_quant_batchmatmul (CANN aclnnWeightQuantBatchMatmulV2): activations fp16 or
  bf16 (fp16 only on Atlas inference cards), antiquant_scale in the activations' dtype, k and n in
  [1, 65535].
- torch.mv on NPU (aclnnMv) takes fp16/fp32 only; on every accelerator F.linear is the GEMV anyway.
- A device-to-host read (bool(t), t.item(), t.tolist()) waits for every queued kernel: on an
  accelerator the host then cannot queue step n+1 while the device runs step n.
- int4 (tp/int4.py): on CUDA, torch.ops.aten._weight_int4pack_mm (tinygemm, as gpt-fast uses it):
  bfloat16 activations, compute capability >= 8.0, weight packed by _convert_weight_to_int4pack with
  8 inner k-tiles (K a multiple of 128, N of 8), groups of 32, 64, 128 or 256. On the NPU,
  npu_weight_quant_batchmatmul with int4 weights packed into int32 by npu_convert_weight_to_int4pack
  (Atlas A2 / A3 only; antiquant_group_size a multiple of 32 below K; K and N <= 65535).
- Graph capture (torch.cuda.CUDAGraph; torch_npu's torch.npu.NPUGraph, Ascend/pytorch
  docs/zh/developer_notes/npugraph.md): fixed shapes, no host synchronisation, inputs written in
  place (what tp.model.DecodeStep gives); on the NPU only aclnn operators can be captured (our NPU
  int8 matmul, npu_weight_quant_batchmatmul, is one) and each captured graph holds device streams
  from a budget (vllm-ascend's ACL graph notes: ~1800 a device, fewer with collectives): we keep
  one at a time (tp.graphs). Where torch_npu has no NPUGraph, the step runs eagerly.
"""
from __future__ import annotations

import torch

NPU_WEIGHT_QUANT_MAX_DIM = 65535
NPU_WEIGHT_QUANT_DTYPES = (torch.float16, torch.bfloat16)
EOS_CHECK_EVERY = 8  # decode steps between looks at "has every sequence ended?" on an accelerator
GRAPH_SETTINGS = ("auto", "off")
TRITON_INT8_MAX_ROWS = 16  # decode rows; more (prefill) are a GEMM's, through the dequantizing path


def reduction_dtype(device_type: str) -> torch.dtype:
    """dtype for all-reducing host figures (timings) over ranks: float32 everywhere, since HCCL has no
    float64 all-reduce on most chips (and a millisecond needs no more than float32's 7 digits)."""
    return torch.float32


def matmul_route(device_type: str, rows: int, max_rows: int) -> str:
    """'decode' (the CPU's measured GEMV paths, tp.decode_matmul) for up to max_rows rows of
    activations on the CPU; 'linear' (F.linear, never torch.mv) everywhere else."""
    return "decode" if device_type == "cpu" and 0 < rows <= max_rows else "linear"


def int8_route(device_type: str, x_dtype: torch.dtype, n: int, k: int, rows: int = 0,
               triton: bool = False) -> tuple[str, str]:
    """(route, why) for an int8 weight [n, k] times `rows` rows of `x_dtype` activations off the CPU's
    decode path: 'npu_weight_quant' (the fused NPU op) where its documented limits allow; on CUDA
    'triton' (tp.triton_int8: the weight widened inside the matmul) for decode rows (1 to
    TRITON_INT8_MAX_ROWS) of float16/bfloat16 where Triton is installed; else 'dequant' (the weight
    converted block by block, then the float GEMM, which prefill's many rows want anyway)."""
    if device_type == "cuda":
        if not 0 < rows <= TRITON_INT8_MAX_ROWS:
            return "dequant", ""
        if x_dtype not in (torch.float16, torch.bfloat16):
            return "dequant", f"the fused int8 kernel takes float16/bfloat16 activations, not {x_dtype}"
        return ("triton", "") if triton else ("dequant", "Triton is not installed")
    if device_type != "npu":
        return "dequant", ""
    if x_dtype not in NPU_WEIGHT_QUANT_DTYPES:
        return "dequant", f"npu_weight_quant_batchmatmul takes float16/bfloat16 activations, not {x_dtype}"
    if not (1 <= n <= NPU_WEIGHT_QUANT_MAX_DIM and 1 <= k <= NPU_WEIGHT_QUANT_MAX_DIM):
        return "dequant", f"npu_weight_quant_batchmatmul takes n, k in [1, {NPU_WEIGHT_QUANT_MAX_DIM}], not {n} x {k}"
    return "npu_weight_quant", ""


def npu_soc_has_int4(device_name: str) -> bool:
    """Whether an NPU (torch_npu.npu.get_device_name) is an Atlas A2 (Ascend910B*) or A3 (Ascend910_93*),
    the products npu_convert_weight_to_int4pack documents; not the 910 (A1) nor the 310P cards."""
    return device_name.startswith("Ascend910B") or device_name.startswith("Ascend910_93")


AT_INT4PACK_GROUPS = (32, 64, 128, 256)
INT4_INNER_K_TILES = 8


def int4_route(device_type: str, x_dtype: torch.dtype, n: int, k: int, group_size: int, rows: int,
               cuda_capability: tuple[int, int] = (0, 0), npu_int4: bool = False) -> tuple[str, str]:
    """(route, why not fused) for an int4 weight [n, k] off the CPU's kernel: 'aten_int4pack' (CUDA),
    'npu_weight_quant' (NPU, `npu_int4`: an Atlas A2/A3 whose torch_npu packs int4), else 'dequant'
    (blocks of the weight into the float GEMM, which prefill's many rows want anyway)."""
    if device_type == "cuda":
        if not 0 < rows <= TRITON_INT8_MAX_ROWS:
            return "dequant", ""
        if cuda_capability < (8, 0):
            return "dequant", f"_weight_int4pack_mm needs compute capability 8.0, this GPU has {cuda_capability}"
        if x_dtype != torch.bfloat16:
            return "dequant", f"_weight_int4pack_mm takes bfloat16 activations, not {x_dtype}"
        if group_size not in AT_INT4PACK_GROUPS or k % (INT4_INNER_K_TILES * 16) or n % 8:
            return "dequant", (f"_weight_int4pack_mm takes groups of {AT_INT4PACK_GROUPS}, K a multiple of "
                               f"{INT4_INNER_K_TILES * 16} and N of 8, not {group_size}, {k}, {n}")
        return "aten_int4pack", ""
    if device_type != "npu":
        return "dequant", ""
    if not npu_int4:
        return "dequant", "int4 npu_weight_quant_batchmatmul runs on Atlas A2/A3 with npu_convert_weight_to_int4pack"
    if x_dtype not in NPU_WEIGHT_QUANT_DTYPES:
        return "dequant", f"npu_weight_quant_batchmatmul takes float16/bfloat16 activations, not {x_dtype}"
    if not (1 <= n <= NPU_WEIGHT_QUANT_MAX_DIM and 1 <= k <= NPU_WEIGHT_QUANT_MAX_DIM):
        return "dequant", f"npu_weight_quant_batchmatmul takes n, k in [1, {NPU_WEIGHT_QUANT_MAX_DIM}], not {n} x {k}"
    if group_size % 32 or not 32 <= group_size < k:
        return "dequant", f"antiquant_group_size must be a multiple of 32 in [32, K), not {group_size} (K {k})"
    return "npu_weight_quant", ""


def eos_check_interval(device_type: str) -> int:
    """Decode steps between host reads of the end-of-sequence flags: every step on the CPU (a read
    costs nothing there), every EOS_CHECK_EVERY steps on an accelerator (the extra steps after every
    sequence has ended emit masked EOS, cut off before returning)."""
    return 1 if device_type == "cpu" else EOS_CHECK_EVERY


def hccl_environment(timeout_s: float, environ: dict[str, str]) -> dict[str, str]:
    """HCCL variables to set before the process group starts, unless the user set them.
    HCCL_CONNECT_TIMEOUT defaults to 120 s and is spent at the first collective, after the model loads,
    so ranks whose loads differ by minutes fail there; Ascend's launch scripts export 1200."""
    seconds = str(max(120, int(timeout_s)))
    return {k: seconds for k in ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT") if k not in environ}


def graphs_route(setting: str, device_type: str, npu_has_graphs: bool = False) -> tuple[bool, str]:
    """(capture the decode step as a graph?, why not) for `graphs=auto|off`: auto captures on CUDA,
    and on an NPU whose torch_npu has NPUGraph; the CPU runs eagerly (a launch costs nothing there,
    and its kernels already read each row only to its length)."""
    if setting not in GRAPH_SETTINGS:
        raise ValueError(f"graphs={setting!r}: expected one of {', '.join(GRAPH_SETTINGS)}")
    if setting == "off":
        return False, "graphs=off"
    if device_type == "cuda":
        return True, ""
    if device_type == "npu":
        return (True, "") if npu_has_graphs else (False, "this torch_npu has no torch.npu.NPUGraph")
    return False, f"no graphs on {device_type}: the step runs eagerly"
