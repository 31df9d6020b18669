"""The model's shape, read from a checkpoint's `config.json` (SPEC §1, §1b): InternLM, InternLM2/2.5 or
a LLaMA-layout checkpoint, recognised by `architectures` / `model_type`."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_attention_heads",
                  "num_hidden_layers", "vocab_size", "max_position_embeddings")


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


class ConfigError(ValueError):
    """A config.json that is missing keys, has keys of the wrong type, or does not fit the TP size."""


def read_json(path: Path, error: type[Exception]):
    """The JSON document in `path`, or `error` naming the file: bad UTF-8, bad JSON, and what
    json.loads raises beyond JSONDecodeError (an integer past Python's digit limit, deep nesting)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"{path}: not valid JSON ({err})") from err


# Published layouts: the architectures / model_type names that select each one.
LAYOUTS = {"internlm": ("InternLMForCausalLM", "internlm"), "internlm2": ("InternLM2ForCausalLM", "internlm2"),
           "llama": ("LlamaForCausalLM", "llama")}


def layout_of(raw: dict, source: str) -> str:
    """The layout the config names; a config naming neither key is InternLM's (SPEC §1)."""
    names = raw.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
        raise ConfigError(f"{source}: architectures must be a list of class names, got {names!r}")
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"{source}: model_type must be a string, got {model_type!r}")
    for layout, (arch, mtype) in LAYOUTS.items():
        if arch in names or model_type == mtype:
            return layout
    if not names and model_type is None:
        return "internlm"
    found = ", ".join(filter(None, [f"architectures {names}" if names else "", f"model_type {model_type!r}"
                                    if model_type is not None else ""]))
    raise ConfigError(f"{source}: {found} is not a supported layout; expected one of "
                      f"{', '.join(a for a, _ in LAYOUTS.values())}")


# Rotary kinds we compute (SPEC §1b); any other `rope_type` (llama3, yarn, longrope, ...) is refused by name.
ROPE_KINDS = ("default", "linear", "dynamic")
# Keys of a rope dictionary that leave these kinds' arithmetic as we compute it (transformers' dynamic NTK
# rescales from max_position_embeddings, so original_max_position_embeddings changes nothing for it).
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings"}


def _off(value) -> bool:
    return value is None or value is False


def _one(value) -> bool:
    return value is None or (_positive_number(value) and value == 1)


def _rope_entry(key: str, entry, source: str) -> tuple[float | None, str | None, float]:
    """(base or None, kind, factor) of one rope dictionary: transformers 4's `rope_scaling` or 5's
    `rope_parameters` ({"rope_type" or "type": kind, "factor": f, "rope_theta": base, ...})."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: {key} must be an object, got {entry!r}")
    if entry and all(isinstance(v, dict) for v in entry.values()):
        raise ConfigError(f"{source}: {key} per layer type ({', '.join(entry)}) is not supported: "
                          f"every layer here runs one rotary embedding")
    kind = entry.get("rope_type", entry.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise ConfigError(f"{source}: {key} rope_type {kind!r} is not supported ({', '.join(ROPE_KINDS)})")
    unknown = sorted(set(entry) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"{source}: {key} key {unknown[0]!r} ({entry[unknown[0]]!r}) is not supported "
                          f"for rope_type {kind!r}")
    if not _one(entry.get("partial_rotary_factor")):
        raise ConfigError(f"{source}: {key} partial_rotary_factor {entry['partial_rotary_factor']!r} is not "
                          f"supported (the rotary embedding covers the whole head)")
    theta = entry.get("rope_theta")
    if theta is not None and not _positive_number(theta):
        raise ConfigError(f"{source}: {key} rope_theta must be a positive number, got {theta!r}")
    if kind == "default":
        return theta, None, 1.0
    factor = entry.get("factor")
    if not _positive_number(factor):
        raise ConfigError(f"{source}: {key} factor must be a positive number for rope_type {kind!r}, got {factor!r}")
    return theta, kind, float(factor)


def _rotary(raw: dict, source: str) -> tuple[float, str | None, float]:
    """(base, scaling kind or None, factor) as transformers 4 and 5 and InternLM write them: a rope
    dictionary (5's `rope_parameters`, 4's `rope_scaling`; both present must agree), its `rope_theta`
    before InternLM's `rotary: {"base", "type": "origin" | "dynamic", "scaling_factor"}`,
    and 10000 when none is given. A checkpoint saved by transformers 5 has only `rope_parameters`."""
    entries = {k: _rope_entry(k, raw[k], source) for k in ("rope_parameters", "rope_scaling") if raw.get(k) is not None}
    if len(entries) == 2 and len({(t or raw.get("rope_theta"), kind, f) for t, kind, f in entries.values()}) > 1:
        raise ConfigError(f"{source}: rope_parameters {raw['rope_parameters']!r} and rope_scaling "
                          f"{raw['rope_scaling']!r} disagree; keep one")
    theta, kind, factor = next(iter(entries.values()), (None, None, 1.0))
    rotary = raw.get("rotary")
    if rotary is not None:
        if not isinstance(rotary, dict):
            raise ConfigError(f"{source}: rotary must be an object, got {rotary!r}")
        rotary_kind = rotary.get("type", "origin")
        if rotary_kind not in ("origin", "dynamic"):
            raise ConfigError(f"{source}: rotary type {rotary_kind!r} is not supported (origin or dynamic)")
        if rotary_kind == "dynamic" and kind is None:
            kind, factor = "dynamic", rotary.get("scaling_factor", 1.0)
            if not _positive_number(factor):
                raise ConfigError(f"{source}: rotary scaling_factor must be a positive number, got {factor!r}")
    if theta is None:  # InternLM's own code reads its rotary base, not rope_theta
        theta = (rotary or {}).get("base", raw.get("rope_theta", 10000.0))
    if not _positive_number(theta):
        raise ConfigError(f"{source}: rope base must be a positive number, got {theta!r}")
    if not _one(raw.get("partial_rotary_factor")):
        raise ConfigError(f"{source}: partial_rotary_factor {raw['partial_rotary_factor']!r} is not supported "
                          f"(the rotary embedding covers the whole head)")
    return float(theta), kind, float(factor)


# Top-level keys that change the arithmetic, each with the test its value must pass for our model to
# compute what the config asks for, and what our model computes. Any other value is refused by name,
# never run as something else. Keys that leave the arithmetic alone (auto_map, torch_dtype / dtype,
# transformers_version, use_cache, pretraining_tp, attention_dropout, ...) are not read at all.
_ARITHMETIC = {
    "hidden_act": (lambda v: v in ("silu", "swish"), "the MLP is SwiGLU, silu-gated"),
    "mlp_bias": (_off, "the MLP projections carry no bias"),
    "attn_logit_softcapping": (lambda v: v is None, "attention scores are not capped"),
    "final_logit_softcapping": (lambda v: v is None, "logits are not capped"),
    "qk_norm": (_off, "queries and keys are not normalised"),
    "use_qk_norm": (_off, "queries and keys are not normalised"),
    "qk_layernorm": (_off, "queries and keys are not normalised"),
    "layer_types": (lambda v: v is None or (isinstance(v, list) and all(t == "full_attention" for t in v)),
                    "every layer attends to the whole context"),
    "embedding_multiplier": (_one, "embeddings are not scaled"),
    "residual_multiplier": (_one, "residual branches are not scaled"),
    "logits_scaling": (_one, "logits are not scaled"),
    "attention_multiplier": (lambda v: v is None, "attention scores are scaled by 1/sqrt(head_dim)"),
}


def _refuse_unimplemented(raw: dict, source: str) -> None:
    for key, (supported, ours) in _ARITHMETIC.items():
        if key in raw and not supported(raw[key]):
            raise ConfigError(f"{source}: {key} {raw[key]!r} is not supported ({ours})")
    use, window = raw.get("use_sliding_window"), raw.get("sliding_window")
    if use is False:  # Qwen2-style configs name a window and switch it off
        return
    if use not in (None, True):
        raise ConfigError(f"{source}: use_sliding_window must be true or false, got {use!r}")
    context = raw["max_position_embeddings"]
    within = not (isinstance(window, int) and not isinstance(window, bool) and window >= context)
    if (use or window is not None) and within:  # a window shorter than the context changes attention
        raise ConfigError(f"{source}: sliding_window {window!r} is not supported (every position attends to "
                          f"all before it, up to max_position_embeddings {context})")


def _eos_ids(value, source: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ConfigError(f"{source}: eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    bias: bool = True
    rope_theta: float = 10000.0
    # InternLM's `"rotary": {"type": "dynamic"}` or `rope_scaling`: dynamic NTK changes only positions
    # past max_position_embeddings; linear divides every position by the factor.
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    layout: str = "internlm"
    num_key_value_heads: int = 0     # 0: as many as attention heads
    head_dim_override: int = 0       # 0: hidden_size / num_attention_heads
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()  # every id that ends a sequence (generation_config.json)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def rope_dynamic(self) -> bool:
        return self.rope_scaling == "dynamic"

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_token_ids or (self.eos_token_id,)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        missing = [k for k in _REQUIRED_INTS if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
        for key in _REQUIRED_INTS:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
        layout = layout_of(raw, source)
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim")
        if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0):
            raise ConfigError(f"{source}: head_dim must be a positive integer, got {head_dim!r}")
        if head_dim is None and raw["hidden_size"] % heads:
            raise ConfigError(f"{source}: hidden_size {raw['hidden_size']} is not a multiple of "
                              f"num_attention_heads {heads}")
        kv = raw.get("num_key_value_heads", heads)
        kv = heads if kv is None else kv
        if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0:
            raise ConfigError(f"{source}: num_key_value_heads must be a positive integer, got {kv!r}")
        if heads % kv:
            raise ConfigError(f"{source}: num_key_value_heads {kv} does not divide num_attention_heads {heads}")
        eps = raw.get("rms_norm_eps", 1e-6)
        if not _positive_number(eps):
            raise ConfigError(f"{source}: rms_norm_eps must be a positive number, got {eps!r}")
        bias_key = "attention_bias" if layout == "llama" else "bias"
        bias = raw.get(bias_key, layout == "internlm")
        if not isinstance(bias, bool):
            raise ConfigError(f"{source}: {bias_key} must be true or false, got {bias!r}")
        tied = raw.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ConfigError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
        theta, scaling, factor = _rotary(raw, source)
        _refuse_unimplemented(raw, source)
        special = {}
        for key, default in (("bos_token_id", 1), ("eos_token_id", 2)):
            value = raw.get(key, default)
            value = default if value is None else value  # some configs write null for an unused id
            if isinstance(value, list) and key == "eos_token_id" and value:
                value = _eos_ids(value, source)[0]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{source}: {key} must be a token id (integer >= 0), got {value!r}")
            special[key] = value
        return cls(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_attention_heads=heads, num_hidden_layers=raw["num_hidden_layers"],
            vocab_size=raw["vocab_size"], max_position_embeddings=raw["max_position_embeddings"],
            rms_norm_eps=float(eps), bias=bias, rope_theta=float(theta), rope_scaling=scaling, rope_factor=factor,
            layout=layout, num_key_value_heads=kv, head_dim_override=head_dim or 0, tie_word_embeddings=tied,
            **special,
        )

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "ModelConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (is {checkpoint_dir} a checkpoint directory?)")
        cfg = cls.from_dict(read_json(path, ConfigError), source=str(path))
        generation = Path(checkpoint_dir) / "generation_config.json"
        if generation.is_file():  # chat models end turns with a second EOS listed here
            raw = read_json(generation, ConfigError)
            if isinstance(raw, dict) and raw.get("eos_token_id") is not None:
                cfg = dataclasses.replace(cfg, eos_token_ids=_eos_ids(raw["eos_token_id"], str(generation)))
        return cfg

    def check_divisible(self, world_size: int) -> None:
        """Refuse a TP size that does not split the heads or the MLP evenly (vocab is padded instead)."""
        problems = []
        if self.num_attention_heads % world_size:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.intermediate_size % world_size:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            raise ConfigError(f"tensor parallel size {world_size} does not divide "
                              f"{' and '.join(problems)}; choose a world size that divides both")
        kv = self.kv_heads
        if kv % world_size and world_size % kv:
            raise ConfigError(f"tensor parallel size {world_size} can not place num_key_value_heads={kv}: "
                              f"it must divide them (split) or be a multiple of them (replicated)")

    def local_kv_heads(self, world_size: int) -> int:
        return max(1, self.kv_heads // world_size)

    def padded_vocab_size(self, world_size: int) -> int:
        return -(-self.vocab_size // world_size) * world_size
