"""The checkpoint's sentencepiece `tokenizer.model` with InternLM's conventions, no remote code.

unk 0, bos 1, eos 2; encoding prepends BOS and appends no EOS (as InternLMTokenizer does).
"""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path):
        path = Path(checkpoint_dir) / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: sentencepiece tokenizer not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def piece_id(self, piece: str) -> int | None:
        """Id of an exact vocabulary piece, None when the vocabulary lacks it."""
        idx = self.sp.piece_to_id(piece)
        return None if idx == self.sp.unk_id() and piece != self.sp.id_to_piece(idx) else idx
