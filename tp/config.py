"""The model's shape, read from an InternLM `config.json` (SPEC §1)."""
from __future__ import annotations

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
    # InternLM's `"rotary": {"type": "dynamic"}`: NTK scaling, only past max_position_embeddings.
    rope_dynamic: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise ConfigError(f"{source}: hidden_size {raw['hidden_size']} is not a multiple of "
                              f"num_attention_heads {raw['num_attention_heads']}")
        eps = raw.get("rms_norm_eps", 1e-6)
        if not _positive_number(eps):
            raise ConfigError(f"{source}: rms_norm_eps must be a positive number, got {eps!r}")
        bias = raw.get("bias", True)
        if not isinstance(bias, bool):
            raise ConfigError(f"{source}: bias must be true or false, got {bias!r}")
        theta, dynamic = raw.get("rope_theta", 10000.0), False
        rotary = raw.get("rotary")
        if rotary is not None:
            if not isinstance(rotary, dict):
                raise ConfigError(f"{source}: rotary must be an object, got {rotary!r}")
            theta = rotary.get("base", theta)
            dynamic = rotary.get("type") == "dynamic"
        if not _positive_number(theta):
            raise ConfigError(f"{source}: rope base must be a positive number, got {theta!r}")
        special = {}
        for key, default in (("bos_token_id", 1), ("eos_token_id", 2)):
            value = raw.get(key, default)
            value = default if value is None else value  # some configs write null for an unused id
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{source}: {key} must be a token id (integer >= 0), got {value!r}")
            special[key] = value
        return cls(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_attention_heads=raw["num_attention_heads"], num_hidden_layers=raw["num_hidden_layers"],
            vocab_size=raw["vocab_size"], max_position_embeddings=raw["max_position_embeddings"],
            rms_norm_eps=float(eps), bias=bias, rope_theta=float(theta), rope_dynamic=dynamic,
            **special,
        )

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "ModelConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (is {checkpoint_dir} a checkpoint directory?)")
        return cls.from_dict(read_json(path, ConfigError), source=str(path))

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

    def padded_vocab_size(self, world_size: int) -> int:
        return -(-self.vocab_size // world_size) * world_size
