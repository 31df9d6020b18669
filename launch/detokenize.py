"""One answer's text as its tokens arrive, for task=serve.

A delta is sent only once it can no longer change: whole characters (a character split over tokens
waits for its last byte), and never text that could still be the start of a stop string, which is
held back until the next tokens show it is not. The answer ends exactly before the first stop string,
so the streamed deltas joined equal the non-streamed text (the leak users reported in vLLM #3574).
"""
from __future__ import annotations


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Where the earliest stop string starts in `text`, -1 when none does."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else -1


class TextStream:
    def __init__(self, tokenizer, stops: tuple[str, ...] = (), min_tokens: int = 0):
        self.tok, self.stops, self.min_tokens = tokenizer, tuple(s for s in stops if s), min_tokens
        self.ids: list[int] = []
        self.sent = ""      # the text sent so far
        self.kept = 0       # tokens the answer keeps (through the one that completed a stop string)
        self.done = False

    def add(self, tokens: list[int], finish: str | None) -> tuple[str, str | None]:
        """The text these tokens add to the answer, and how it ends: the engine's finish, or
        "stop_string" when a stop string appeared (the caller then aborts the request)."""
        if self.done:
            return "", None
        start = len(self.ids)
        self.ids += tokens
        text = self.tok.decode(self.ids)
        at = first_stop(text, self.stops) if self.stops and len(self.ids) >= self.min_tokens else -1
        if at >= 0:
            self.kept = self._completing_token(start, at)
            text, finish = text[:at], "stop_string"
        else:
            self.kept = len(self.ids)
        if finish is None:
            text = text.rstrip("\ufffd")  # half a character: wait for the rest
            text = text[:len(text) - held_back(text, self.stops)]
        if not text.startswith(self.sent):  # the decoder revised what it had rendered: send only what is new
            text = self.sent + text[len(self.sent):]
        delta, self.sent = text[len(self.sent):], text
        self.done = finish is not None
        return delta, finish

    def _completing_token(self, start: int, at: int) -> int:
        """The fewest tokens whose text holds the stop string found at `at`."""
        for n in range(max(start, self.min_tokens, 1), len(self.ids)):
            if 0 <= first_stop(self.tok.decode(self.ids[:n]), self.stops) <= at:
                return n
        return len(self.ids)
