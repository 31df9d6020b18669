"""The checkpoint's chat template (`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`
as transformers 5 saves it), rendered as transformers' `apply_chat_template(add_generation_prompt=True)`
does: jinja2's sandbox with trim_blocks and lstrip_blocks, `raise_exception`, the special tokens by name.
"""
from __future__ import annotations

import json
from pathlib import Path


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str]):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template, self.special = env.from_string(source), special

    @classmethod
    def of(cls, directory: str | Path, tokenizer) -> "ChatTemplate | None":
        root = Path(directory)
        settings = {}
        if (root / "tokenizer_config.json").is_file():
            settings = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        source = settings.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source and (root / "chat_template.jinja").is_file():
            source = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(source, str) or not source:
            return None
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = settings.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
        return cls(source, special)

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
