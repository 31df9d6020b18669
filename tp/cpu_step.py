"""The decode step on the CPU as one flat loop of kernel calls, each bound to its weights once.

Eager (`InternLM.decode_eager`), a step walks the module tree: ~60 module calls, ~180 parameter
look-ups through nn.Module.__getattr__, a kernel look-up per op, views to and from [B, 1, hidden].
On the 827M bench model (8 layers, 2-core AMD EPYC, Zen 3) that is ~0.8 ms a step: its part outside
the matmuls (bench/decode.py) went from 1.6-1.7 to 0.8-1.0 ms, most of what is left the kernels
themselves (attention, norms, rope), and int4's whole step to 0.81x its time (bench/ab.py, 4
alternated rounds; int8 0.95x). What the CPU needs is what a captured graph gives an accelerator
(tp.graphs), without capture: the same calls, decided once.

So the step here calls exactly the kernels the eager step calls, with the same inputs in the same
order (its logits equal the eager step's bit for bit: tests/test_cpu_step.py), and only the binding
moves: each matmul is its layer's `decode_call` (the path tp.decode_matmul chose), each attention's
kernel path is read when the step is bound. The keys and values are looked up at every step, so
`InternLM.cache_rows` (a step over some rows of the cache) holds. A step is bound per cache
(`InternLM.setup_cache` drops it) and only where every kernel it needs is built for the model's
dtype; elsewhere, and for batches over MAX_ROWS rows, the eager step runs (`InternLM.decode`). A
layer the kernels do not serve as bound (GPTQ's act-order permutation) is called as its module.
"""
from __future__ import annotations

import math

import torch

from tp import comm, cpu_kernels, decode_attention
from tp.cpu_kernels import MAX_ROWS

_OPS = ("rms_norm", "add_rms_norm", "rope_into_cache", "swiglu", "decode_attention")


def _column(linear):
    """x [M, K] -> y [M, N] of a ColumnParallelLinear (its bias inside the kernel, as `matmul`)."""
    call = None if linear.format.act_order else linear.decode_call(linear.bias)
    return call if call is not None else linear


def _row(linear):
    """x [M, K/N] -> y [M, N'] of a RowParallelLinear: the partial product, its all-reduce, then the
    bias once, as its forward."""
    call = None if linear.format.act_order else linear.decode_call()
    if call is None:
        return linear
    all_reduce = comm.current().all_reduce if linear.world_size > 1 else None
    bias = linear.bias

    def row(x):
        y = call(x)
        if all_reduce is not None:
            all_reduce(y)
        return y if bias is None else y.add_(bias)
    return row


class _Layer:
    """One decoder layer's weights and calls, bound."""

    def __init__(self, layer, ops: dict, model_dtype: torch.dtype):
        attention, mlp = layer.self_attn, layer.mlp
        self.attention = attention  # its cache, looked up each step
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.qkv, self.o = _column(attention.qkv_proj), _row(attention.o_proj)
        self.gate_up, self.down = _column(mlp.gate_up_proj), _row(mlp.down_proj)
        self.heads = attention.local_heads
        self.scale = 1.0 / math.sqrt(attention.head_dim)
        path = attention.chosen_decode_path(model_dtype)
        if path == "ours":
            attend = ops["decode_attention"]
            self.attend = lambda q, k, v, step: attend(q, k, v, self.scale, step.valid, step.lengths)
        else:
            self.attend = lambda q, k, v, step: decode_attention.run(
                path, q, k, v, self.scale, step.valid[:, None, None, :], step.lengths)


class CpuDecodeStep:
    """`InternLM.decode_eager` for the CPU with its calls bound once (module docstring)."""

    def __init__(self, model, ops: dict):
        # Parts of the model, not the model: it holds this step, and a cycle would leave both to the
        # garbage collector, which may free the weights only at exit, after torch's teardown.
        self.ops, self.eps = ops, model.cfg.rms_norm_eps
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin  # setup_cache makes new ones, and unbinds
        self.embed = model.model.embed_tokens
        self.layers = [_Layer(layer, ops, model.dtype) for layer in model.model.layers]
        self.norm = model.model.norm.weight
        head = model.lm_head
        self.head = head.decode_call()
        self.gather = comm.current().all_gather if head.world_size > 1 else None
        self.vocab = head.vocab_size

    @classmethod
    def bind(cls, model) -> "CpuDecodeStep | None":
        """The bound step, or None where a kernel it needs is not built here (the eager step runs)."""
        probe = torch.empty(1, 1, dtype=model.dtype, device=model.device)
        ops = {name: cpu_kernels.op_for(name, probe, MAX_ROWS) for name in _OPS}
        return None if any(op is None for op in ops.values()) else cls(model, ops)

    @torch.inference_mode()
    def __call__(self, step) -> torch.Tensor:
        """Logits [B, 1, vocab], step moved on by one, as decode_eager; B <= MAX_ROWS."""
        ops, eps = self.ops, self.eps
        b = step.tokens.shape[0]
        step.valid.scatter_(1, step.slots[:, None], True)
        torch.add(step.slots, 1, out=step.lengths)
        cos = self.rope_cos[step.positions].view(b, 1, 1, -1)
        sin = self.rope_sin[step.positions].view(b, 1, 1, -1)
        x = self.embed(step.tokens[:, None]).view(b, -1)
        residual = x  # the first add_rms_norm writes the stream into it, as the eager step
        for i, layer in enumerate(self.layers):
            if i == 0:
                h = ops["rms_norm"](x, layer.input_norm, eps)
            else:
                h = ops["add_rms_norm"](x, residual, layer.input_norm, eps)
            cache = layer.attention.cache
            q = ops["rope_into_cache"](layer.qkv(h), cos, sin, cache.k, cache.v, step.slots, layer.heads)
            y = layer.attend(q, cache.k, cache.v, step)
            h = ops["add_rms_norm"](layer.o(y.reshape(b, -1)), residual, layer.post_norm, eps)
            x = layer.down(ops["swiglu"](layer.gate_up(h)))
        step.positions += 1
        step.slots += 1
        logits = self.head(ops["add_rms_norm"](x, residual, self.norm, eps))
        if self.gather is not None:
            logits = self.gather(logits)
        return logits[:, None, : self.vocab]
