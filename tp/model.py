"""InternLM-7B, InternLM2 and LLaMA-layout models built from tensor-parallel layers, with a KV cache.

Numerically it follows transformers' LlamaForCausalLM (attention_bias as the config says,
num_key_value_heads for grouped-query attention): RMSNorm in float32, rotate-half rotary embedding,
SwiGLU MLP. Rank r holds query heads [r*h/N, (r+1)*h/N), the kv heads they use (split when N divides
the kv heads, else its one kv head, replicated), and the matching MLP columns. q/k/v and gate/up are
fused into one column-parallel matmul each; the loader places the source slices (see `tp.layout`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tp import cpu_kernels, cpu_step, decode_attention, prefill_attention
from tp.config import ModelConfig
from tp.cpu_kernels import MAX_ROWS
from tp.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from tp.quant import WeightFormat, lm_head_quantized


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: normalise in float32, round to the input dtype, then scale.
        # On the CPU, any number of rows: the same in one call of tp/csrc/rms_norm.cpp instead of seven
        # (prefill too: with swiglu in MLP, ~1% of a float32 prefill at 512 positions, docs/performance.md).
        op = cpu_kernels.op_for("rms_norm", x)
        if op is not None:
            return op(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps).view(x.shape)
        # F.rms_norm does the normalisation in one kernel instead of five.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's add and this norm. On the CPU in
        one kernel call, which writes the sum into `residual` (the caller's to give away)."""
        op = cpu_kernels.op_for("add_rms_norm", x)
        if op is not None and residual.is_contiguous() and x.shape == residual.shape:
            d = x.shape[-1]
            y = op(x.reshape(-1, d).contiguous(), residual.view(-1, d), self.weight, self.eps)
            return y.view(x.shape), residual
        residual = x + residual
        return self.forward(residual), residual


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [length, head_dim] in float32 (halves repeated, rotate-half layout).

    Dynamic NTK (InternLM's `rotary`, or `rope_scaling` dynamic) only differs from the plain rotary
    past max_position_embeddings: positions before it always get the configured base; positions past
    it (a request longer than the context) get the base rescaled for the request's length, as
    transformers' LlamaDynamicNTKScalingRotaryEmbedding with the configured factor (1 for InternLM).
    Linear scaling divides every position by the factor.
    """
    dim = cfg.head_dim

    def table(base: float, positions: torch.Tensor) -> torch.Tensor:
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        freqs = torch.outer(positions, inv_freq)
        return torch.cat((freqs, freqs), dim=-1)

    positions = torch.arange(length, device=device, dtype=torch.float32)
    if cfg.rope_scaling == "linear":
        positions = positions / cfg.rope_factor
    emb = table(cfg.rope_theta, positions)
    limit = cfg.max_position_embeddings
    if cfg.rope_dynamic and length > limit:
        f = cfg.rope_factor
        scaled = cfg.rope_theta * (f * length / limit - (f - 1)) ** (dim / (dim - 2))
        emb[limit:] = table(scaled, positions[limit:])
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    op = cpu_kernels.op_for("rope", x)  # the same roundings in one call instead of six
    if op is not None:
        return op(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Preallocated keys and values [batch, local kv heads, max_seq, head_dim], written in place."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def zeros(cls, batch: int, heads: int, max_seq: int, head_dim: int, dtype: torch.dtype, device=None) -> "KVCache":
        shape = (batch, heads, max_seq, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def rows_view(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a batch of their own: views, so what is written lands in this cache."""
        return KVCache(self.k[start:stop], self.v[start:stop])

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stop = start + k.shape[2]
        self.k[:, :, start:stop] = k
        self.v[:, :, start:stop] = v
        return self.k[:, :, :stop], self.v[:, :, :stop]

    def write_rows(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Row b's one new key and value [B, KVH, 1, D] into its own slot slots[b], on the device."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, slots] = k[:, :, 0]
        self.v[rows, :, slots] = v[:, :, 0]


@dataclass
class DecodeStep:
    """The decode step's inputs: fixed-shape tensors on the model's device, one entry a row, each row at
    its own point of its own sequence. They are written in place between steps, never reallocated, and
    nothing in the step reads them back to the host or depends on a Python value that changes from one
    step to the next: what a captured graph needs, and what continuous batching needs (a row admitted
    later simply has other positions and slots).

    tokens [B]: each row's last token; positions [B]: its rotary position; slots [B]: the cache slot its
    key and value go to; valid [B, capacity]: the cache slots each row attends (the step adds its new
    slot); lengths [B]: slots + 1, how far the CPU kernel reads each row's cache.
    """
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, capacity: int, device=None) -> "DecodeStep":
        def longs():
            return torch.zeros(batch, dtype=torch.long, device=device)
        return cls(longs(), longs(), longs(), torch.zeros(batch, capacity, dtype=torch.bool, device=device), longs())

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, self.positions, self.slots, self.valid, self.lengths]

    def first_rows(self, n: int) -> "DecodeStep":
        """Rows [0, n) as a step of their own: views, so the step's updates land in this one."""
        return DecodeStep(*(t[:n] for t in self.tensors()))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, world_size: int, dtype: torch.dtype, device=None, int8: "bool | WeightFormat" = False):
        super().__init__()
        self.local_heads = cfg.num_attention_heads // world_size
        self.local_kv_heads = cfg.local_kv_heads(world_size)
        self.head_dim = cfg.head_dim
        h, hd = cfg.hidden_size, cfg.head_dim
        rows = (self.local_heads + 2 * self.local_kv_heads) * hd  # this rank's q, k, v rows
        self.qkv_proj = ColumnParallelLinear(h, rows * world_size, world_size, cfg.bias, dtype, device, quantized=int8)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, h, world_size, cfg.bias, dtype, device,
                                        quantized=int8)
        self.cache: KVCache | None = None
        self.decode_path: str | None = None  # tp.decode_attention's choice, on the CPU
        self.prefill_path = "sdpa"  # tp.prefill_attention's choice, on the CPU

    def forward(self, x, cos, sin, mask, start: int, step: DecodeStep | None = None):
        if step is not None:
            return self.decode(x, cos, sin, step)
        b, t, _ = x.shape
        q, k, v = self._rotated(self.qkv_proj(x), b, t, cos, sin)
        k, v = self.cache.update(start, k, v)
        scale = 1.0 / math.sqrt(self.head_dim)
        if t == 1 and x.device.type == "cpu":  # a one-token prompt: the decode path measured fastest here
            y = self._attend_one(q, k, v, scale, mask)
        elif mask is None and t > 1 and k.shape[2] == t and x.device.type == "cpu":  # a whole unpadded prompt
            y = prefill_attention.run(self.prefill_path, q, k, v, scale)
        else:
            # mask None: no padding in the batch, so plain causal attention (SDPA's faster path).
            # Grouped-query attention: SDPA maps query heads onto their kv head, the cache is not copied.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=scale,
                                               enable_gqa=self.local_kv_heads != self.local_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim))

    def _rotated(self, qkv, b: int, t: int, cos, sin):
        """q, k with the rotary embedding and v [B, heads, T, D], from the fused projection's rows."""
        qkv = qkv.view(b, t, self.local_heads + 2 * self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.local_heads, self.local_kv_heads, self.local_kv_heads], dim=1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def chosen_decode_path(self, dtype: torch.dtype) -> str:
        """decode_path; before any choice, tp.decode_attention's first candidate, kept."""
        if self.decode_path is None:
            self.decode_path = decode_attention.candidates(dtype)[0]
        return self.decode_path

    def _attend_one(self, q, k, v, scale: float, mask, lengths=None):
        """One query a row on the CPU, through the path measured fastest on this host."""
        return decode_attention.run(self.chosen_decode_path(q.dtype), q, k, v, scale, mask, lengths)

    def decode(self, x, cos, sin, step: DecodeStep):
        """One new token a row [B, 1, hidden], row b's key and value into slot step.slots[b], attention
        over the whole cache where step.valid allows (on the CPU, each row read only to its length)."""
        b = x.shape[0]
        qkv = self.qkv_proj(x)
        into_cache = cpu_kernels.op_for("rope_into_cache", qkv, MAX_ROWS)
        if into_cache is not None:  # the ropes and the cache writes in one call
            q = into_cache(qkv.view(b, -1), cos, sin, self.cache.k, self.cache.v, step.slots, self.local_heads)
        else:
            q, k, v = self._rotated(qkv, b, 1, cos, sin)
            self.cache.write_rows(step.slots, k, v)
        scale, mask = 1.0 / math.sqrt(self.head_dim), step.valid[:, None, None, :]
        if x.device.type == "cpu":
            y = self._attend_one(q, self.cache.k, self.cache.v, scale, mask, step.lengths)
        else:
            y = F.scaled_dot_product_attention(q, self.cache.k, self.cache.v, attn_mask=mask, scale=scale,
                                               enable_gqa=self.local_kv_heads != self.local_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, 1, self.local_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, world_size: int, dtype: torch.dtype, device=None, int8: "bool | WeightFormat" = False):
        super().__init__()
        h, inter = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(h, 2 * inter, world_size, False, dtype, device, quantized=int8)
        self.down_proj = RowParallelLinear(inter, h, world_size, False, dtype, device, quantized=int8)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        op = cpu_kernels.op_for("swiglu", gate_up)  # one call instead of three, decode and prefill alike
        if op is not None:
            return self.down_proj(op(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, world_size: int, dtype: torch.dtype, device=None, int8: "bool | WeightFormat" = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, world_size, dtype, device, int8)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, world_size, dtype, device, int8)

    def forward(self, x, residual, cos, sin, mask, start: int, step: DecodeStep | None = None):
        """x: the previous layer's output, residual: the stream before it (None for the first layer:
        x is the embedding). Returns this layer's output and the stream it is to be added to, so each
        add is done with the norm after it (RMSNorm.add_and_norm)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(h, cos, sin, mask, start, step),
                                                                 residual)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, rank: int, world_size: int, dtype: torch.dtype, device=None,
                 int8: "bool | WeightFormat" = False, int8_embedding: "bool | WeightFormat" = False):
        super().__init__()
        padded = cfg.padded_vocab_size(world_size)
        self.embed_tokens = VocabParallelEmbedding(padded, cfg.hidden_size, rank, world_size, dtype, device,
                                                   int8_embedding)
        self.layers = nn.ModuleList(DecoderLayer(cfg, world_size, dtype, device, int8)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


def stored_bytes(tensors) -> int:
    """Bytes of the memory holding the tensors, each buffer once: the CPU's int4 weights are three
    views into one buffer of fused rows (tp/int4.py), padding included, as a step reads it."""
    sizes = {}
    for t in tensors:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr()) if storage.data_ptr() else id(t)
        sizes[key] = storage.nbytes() if storage.data_ptr() else t.numel() * t.element_size()
    return sum(sizes.values())


class InternLM(nn.Module):
    """Parameter names mirror the checkpoint's, except the fused `qkv_proj` and `gate_up_proj`.

    quantize="int8": the linear layers, the LM head and the embedding (unless quantize_lm_head or
    quantize_embedding is False) hold int8 weights with per-row `weight_scale` (tp/quant.py);
    quantize="int4": packed int4 with `weight_group_scale` and `weight_group_zero` per group of
    `group_size` input channels (tp/int4.py). `dtype` is then the activations'.
    """

    def __init__(self, cfg: ModelConfig, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, device=None, quantize: str = "none",
                 quantize_lm_head: bool = True, quantize_embedding: bool = True, group_size: int = 128,
                 act_order: bool = False):
        super().__init__()
        cfg.check_divisible(world_size)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        quantized = quantize in ("int8", "int4")
        fmt = WeightFormat(quantize, group_size, act_order) if quantize == "int4" else WeightFormat(quantize) if quantized \
            else WeightFormat()
        embedding_fmt = WeightFormat(quantize, group_size) if quantize == "int4" else fmt  # looked up, never permuted
        self.quantize, self.quantize_embedding = quantize, quantized and quantize_embedding
        self.group_size = fmt.group_size
        self.quantize_lm_head = quantized and lm_head_quantized(cfg.tie_word_embeddings, quantize_lm_head, quantize_embedding)
        self.model = Backbone(cfg, rank, world_size, dtype, device, fmt,
                              embedding_fmt if self.quantize_embedding else WeightFormat())
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.padded_vocab_size(world_size), cfg.vocab_size, world_size,
                                      dtype, device, quantized=embedding_fmt if self.quantize_lm_head else WeightFormat())
        if cfg.tie_word_embeddings:
            embed = self.model.embed_tokens
            self.lm_head.weight, self.lm_head.weight_scale = embed.weight, embed.weight_scale
            if fmt.kind == "int4" and self.quantize_embedding:
                self.lm_head.weight_group_scale = embed.weight_group_scale
                self.lm_head.weight_group_zero = embed.weight_group_zero
        self.max_seq, self.rope_len = 0, 0
        self.step: DecodeStep | None = None  # the decode step's inputs, allocated with the cache
        self.graphs = None  # tp.graphs.DecodeGraphs where the step is replayed from a graph
        self.bound_step = None  # tp.cpu_step's bound step, bound on the CPU's first step per cache
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (int8 weights keep their scales in float32)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def matmul_modules(self) -> list:
        """The layers that multiply activations by a weight matrix (every one but the embedding)."""
        return [m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead))]

    def attentions(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    def weight_bytes(self) -> int:
        return stored_bytes(self.parameters())

    def decode_weight_bytes(self, batch: int) -> int:
        """Bytes of this rank's weights one decode step reads: every matrix once, and of the
        embedding only the `batch` rows looked up (all of it when it is also the LM head)."""
        if self.cfg.tie_word_embeddings:
            return self.weight_bytes()
        emb = self.model.embed_tokens
        table = stored_bytes(emb.parameters())
        return self.weight_bytes() - table + batch * table // emb.weight.shape[0]

    def cache_bytes(self) -> int:
        cache = self.model.layers[0].self_attn.cache
        return 0 if cache is None else 2 * cache.k.numel() * cache.k.element_size() * len(self.model.layers)

    def setup_cache(self, batch: int, max_seq: int) -> None:
        """(Re)allocate the KV cache; reused as is when it is already large enough. Either way the CPU's
        bound step is bound again at the next step (it binds what the layers chose by then)."""
        self.bound_step = None
        cache = self.model.layers[0].self_attn.cache
        if cache is not None and cache.k.shape[0] == batch and self.max_seq >= max_seq:
            if self.cfg.rope_dynamic and max(max_seq, self.rope_len) > self.cfg.max_position_embeddings \
                    and max_seq != self.rope_len:
                self._set_rope(max_seq)  # past the context the tables depend on the request's length
            return
        heads = self.cfg.local_kv_heads(self.world_size)
        for layer in self.model.layers:
            layer.self_attn.cache = None  # free the old cache before allocating the new one
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache.zeros(batch, heads, max_seq, self.cfg.head_dim, self.dtype, self.device)
        self.max_seq = max_seq
        self.step = DecodeStep.allocate(batch, max_seq, self.device)
        if self.graphs is not None:
            self.graphs.reset()  # it was captured on the old cache
        self._set_rope(max_seq)

    @contextmanager
    def cache_rows(self, start: int, stop: int):
        """Within it, the model runs on rows [start, stop) of the cache alone, as a batch of their own:
        a prompt admitted into one row of a batch whose other rows are elsewhere in their sequences, or
        a decode step over only the rows up to the last busy one."""
        attentions = self.attentions()
        whole = [a.cache for a in attentions]
        for a, cache in zip(attentions, whole):
            a.cache = cache.rows_view(start, stop)
        try:
            yield
        finally:
            for a, cache in zip(attentions, whole):
                a.cache = cache

    def cache_prefix(self, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the first `length` slots of row 0 of every layer's keys and values."""
        caches = [layer.self_attn.cache for layer in self.model.layers]
        return [c.k[:1, :, :length].clone() for c in caches], [c.v[:1, :, :length].clone() for c in caches]

    def copy_cache_row(self, source: int, target: int, length: int) -> None:
        """Slots [0, length) of row `source` copied into row `target` in every layer: a prompt prefilled
        once for several answers to it (n > 1)."""
        for layer in self.model.layers:
            cache = layer.self_attn.cache
            cache.k[target, :, :length] = cache.k[source, :, :length]
            cache.v[target, :, :length] = cache.v[source, :, :length]

    def load_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write a prefix's keys and values into slots [0, len) of every row of the cache."""
        for layer, k, v in zip(self.model.layers, keys, values):
            layer.self_attn.cache.k[:, :, :k.shape[2]] = k
            layer.self_attn.cache.v[:, :, :v.shape[2]] = v

    def _set_rope(self, length: int) -> None:
        """The rotary tables for sequences of `length`, written into the tables in place when they are
        large enough: a captured decode graph reads these very tensors (dynamic NTK changes the values
        past the context with the request's length)."""
        cos, sin = rope_tables(self.cfg, length, self.device)
        if self.rope_cos.dim() == 2 and self.rope_cos.shape[0] >= length and self.rope_cos.shape[1] == cos.shape[1]:
            self.rope_cos[:length].copy_(cos)
            self.rope_sin[:length].copy_(sin)
        else:
            self.rope_cos, self.rope_sin = cos.to(self.dtype), sin.to(self.dtype)
            if self.graphs is not None:
                self.graphs.reset()  # captured on the old tables
        self.rope_len = length

    def free_cache(self) -> None:
        """Drop the KV cache (and a graph captured on it): the next setup_cache allocates exactly what it is
        asked for (benchmarks comparing runs on the same capacity)."""
        for layer in self.model.layers:
            layer.self_attn.cache = None
        self.max_seq, self.step, self.bound_step = 0, None, None
        if self.graphs is not None:
            self.graphs.reset()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int,
                last_only: bool = True) -> torch.Tensor:
        """Logits for `ids` [B, T] written at cache slots [start, start+T).

        positions [B, T]: rotary positions (left padding makes them differ from the slots);
        mask [B, 1, T, start+T]: True where a query may attend a key; None when no sequence is padded
        (causal attention over slots [0, start+T), which needs start == 0 when T > 1).
        last_only: run only the last position through the LM head (all prefill needs).
        """
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        x, residual = self.model.embed_tokens(ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, mask, start)
        if last_only:
            x, residual = x[:, -1:], None if residual is None else residual[:, -1:]
        return self._logits(x, residual)

    def _logits(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        norm = self.model.norm
        return self.lm_head(norm(x) if residual is None else norm.add_and_norm(x, residual)[0])

    def decode(self, step: DecodeStep) -> torch.Tensor:
        """Logits [B, 1, vocab] after each row's token step.tokens[b] at its position and cache slot;
        then every row moves on by one (positions and slots + 1), ready for the next step. Replayed
        from a captured graph where `graphs` is set (tp.graphs: on accelerators), on the CPU as one
        flat loop of bound kernel calls (tp.cpu_step), else run eagerly.
        On a graph the logits tensor is the graph's own: read it before the next step."""
        if self.graphs is not None:
            return self.graphs(step)
        if self.device.type == "cpu" and step.tokens.shape[0] <= MAX_ROWS:
            if self.bound_step is None:  # once per cache; False where a kernel it needs is not built
                self.bound_step = cpu_step.CpuDecodeStep.bind(self) or False
            if self.bound_step:
                return self.bound_step(step)
        return self.decode_eager(step)

    @torch.inference_mode()
    def decode_eager(self, step: DecodeStep) -> torch.Tensor:
        """`decode` op by op: fixed shapes, no read back to the host, the same Python values every
        step (DecodeStep), so that it can be captured."""
        step.valid.scatter_(1, step.slots[:, None], True)
        torch.add(step.slots, 1, out=step.lengths)
        b = step.tokens.shape[0]
        cos = self.rope_cos[step.positions].view(b, 1, 1, -1)
        sin = self.rope_sin[step.positions].view(b, 1, 1, -1)
        x, residual = self.model.embed_tokens(step.tokens[:, None]), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, None, 0, step)
        step.positions += 1
        step.slots += 1
        return self._logits(x, residual)
