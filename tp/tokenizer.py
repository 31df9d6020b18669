"""The checkpoint's own tokenizer, no remote code: a sentencepiece `tokenizer.model` (InternLM,
InternLM2, LLaMA) or a `tokenizers` `tokenizer.json` (LLaMA-layout checkpoints saved by transformers).

BOS as the tokenizer's configuration says: `tokenizer_config.json`'s `add_bos_token` when present
(InternLM's sentencepiece convention, BOS prepended, no EOS appended, is the default), else the
tokenizer.json's own post-processor. Special tokens are dropped when decoding, and so are ids the
tokenizer does not have: a model whose vocab_size is padded past its tokenizer (to a multiple of 64 or
128) can generate one. Such an id renders as nothing, as transformers' fast tokenizers do, and is logged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("internlm_tp")


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path):
        root = Path(checkpoint_dir)
        settings = _settings(root / "tokenizer_config.json")
        if (root / "tokenizer.model").is_file():
            self._backend = _SentencePiece(root / "tokenizer.model")
        elif (root / "tokenizer.json").is_file():
            self._backend = _TokenizersJson(root / "tokenizer.json", settings)
        else:
            raise FileNotFoundError(f"{root}: no tokenizer (tokenizer.model or tokenizer.json)")
        self.bos_id, self.eos_id = self._backend.bos_id, self._backend.eos_id
        self.vocab_size = self._backend.vocab_size
        add_bos = settings.get("add_bos_token")
        self._add_bos = add_bos if isinstance(add_bos, bool) else None  # None: the backend's own rule
        self._warned_unknown = False

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self._backend.encode(text, bos and self._add_bos is not False, self._add_bos is None)

    def decode(self, ids: list[int]) -> str:
        known = [i for i in ids if 0 <= i < self.vocab_size]
        if len(known) < len(ids) and not self._warned_unknown:
            self._warned_unknown = True  # once: a model that generates them may do so in every answer
            unknown = sorted({i for i in ids if not 0 <= i < self.vocab_size})
            log.warning("generated id(s) %s outside the tokenizer's %d pieces (the model's vocabulary is larger): "
                        "rendered as nothing in the text, kept in output_ids; later ones are not logged",
                        unknown, self.vocab_size)
        return self._backend.decode(known)

    def piece_id(self, piece: str) -> int | None:
        """Id of an exact vocabulary piece, None when the vocabulary lacks it."""
        return self._backend.piece_id(piece)

    def piece_text(self, token: int) -> str:
        """One token as text on its own (log-probability listings): its piece, a word boundary as a space."""
        return self._backend.piece_text(token) if 0 <= token < self.vocab_size else ""


def _settings(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return raw if isinstance(raw, dict) else {}


class _SentencePiece:
    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()

    def encode(self, text: str, bos: bool, backend_rule: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def piece_text(self, token: int) -> str:
        return self.sp.id_to_piece(token).replace("\u2581", " ")

    def piece_id(self, piece: str) -> int | None:
        idx = self.sp.piece_to_id(piece)
        return None if idx == self.sp.unk_id() and piece != self.sp.id_to_piece(idx) else idx


class _TokenizersJson:
    def __init__(self, path: Path, settings: dict):
        from tokenizers import Tokenizer as HFTokenizer
        self.tok = HFTokenizer.from_file(str(path))

        def special(key: str, default: str) -> int | None:
            value = settings.get(key, default)
            value = value.get("content") if isinstance(value, dict) else value
            return self.tok.token_to_id(value) if isinstance(value, str) else None
        self.bos_id, self.eos_id = special("bos_token", "<s>"), special("eos_token", "</s>")
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool, backend_rule: bool) -> list[int]:
        if backend_rule:  # no add_bos_token setting: the post-processor adds what it adds
            ids = self.tok.encode(text, add_special_tokens=True).ids
            return ids if bos or not ids or ids[0] != self.bos_id else ids[1:]
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def piece_text(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)
