"""The OpenAI request fields task=serve implements: a request body checked and turned into engine
Requests (one per answer: n answers to each prompt), and the log-probabilities in the shapes the
completions and chat APIs return them. Fields outside FIELDS are refused by name.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

from tp.engine import Request
from tp.sampler import Sampling

FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stop_token_ids", "n", "best_of", "stream", "stream_options", "user", "logprobs",
          "top_logprobs", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
          "min_tokens", "ignore_eos", "return_token_ids"}  # the last five as vLLM names them
MAX_LOGPROBS = 20
GOLDEN = 0x9E3779B97F4A7C15  # a seed's answers drawn from seed + k * GOLDEN: distinct, reproducible


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Call:
    """One HTTP request: its answers (choice i is requests[i]), and how to return them."""
    chat: bool
    stream: bool
    usage_in_stream: bool
    requests: list[Request]
    groups: list[list[Request]]  # what the engine admits together: the n answers to one prompt
    prompt_texts: list[str]      # for echo: each prompt as the client sent it (ids decoded)
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; None: no logprobs returned
    return_token_ids: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def echoed(self, choice: int) -> str:
        """The text `echo` puts before choice `choice`'s answer ("" without echo)."""
        return self.prompt_texts[choice // len(self.groups[0])] if self.echo else ""


def integer(body: dict, key: str, default, low: int, high: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"{key} must be an integer {bounds}, got {value!r}", param=key)
    return value


def number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number in [{low}, {high}], got {value!r}", param=key)
    return float(value)


def _ids(value, vocab: int, what: str) -> list[int]:
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in value):
        raise ApiError(400, f"{what} must hold token ids in [0, {vocab})", param="prompt")
    return list(value)


def prompts_of(body: dict, tok, vocab: int) -> list[tuple[str, list[int]]]:
    """`prompt` as a string, a list of ids, or a list of either: (text, ids) per prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        items = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of either",
                       param="prompt")
    out = []
    for k, item in enumerate(items):
        ids = tok.encode(item) if isinstance(item, str) else _ids(item, vocab, f"prompt {k}")
        if not ids:
            raise ApiError(400, f"prompt {k} is empty: it gives no tokens (this tokenizer adds no BOS)", param="prompt")
        out.append((item if isinstance(item, str) else tok.decode(ids), ids))
    return out


def sampling_of(body: dict, vocab: int) -> Sampling:
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default: sampled
    temperature = 0.0 if temperature < 1e-5 else temperature  # as vLLM: below it, greedy (no inf logits)
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias must map token ids to numbers in [-100, 100]", param="logit_bias")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias: {key!r}: {value!r} is not a token id in [0, {vocab}) with a bias in "
                                "[-100, 100]", param="logit_bias")
        pairs.append((token, float(value)))
    top_k = max(integer(body, "top_k", 0, -1) or 0, 0)  # -1 (vLLM) or 0: no top-k
    return Sampling(temperature, number(body, "top_p", 1.0, 0.0, 1.0), top_k,
                    number(body, "presence_penalty", 0.0, -2.0, 2.0), number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                    number(body, "repetition_penalty", 1.0, 0.01, 10.0), tuple(sorted(pairs)))


def logprobs_wanted(body: dict, chat: bool) -> int | None:
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise ApiError(400, "logprobs must be true or false (chat)", param="logprobs")
        top = integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (top or 0) if wanted else None
    return integer(body, "logprobs", None, 0, MAX_LOGPROBS)


def stops_of(body: dict, vocab: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list):
        raise ApiError(400, "stop_token_ids must be a list of token ids", param="stop_token_ids")
    return tuple(stops), tuple(_ids(ids, vocab, "stop_token_ids"))


def parse(body, chat: bool, tok, chat_template, model_name: str, max_seq: int, max_rows: int, vocab: int,
          model_stop_ids: tuple[int, ...], check) -> Call:
    """The Call a request body asks for; ApiError (400/404) for anything the server cannot do.
    `check(request)` is the engine's own test (ValueError: cannot run)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(400, f"{unknown[0]} is not supported", param=unknown[0])
    if body.get("model") != model_name:
        raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                       code="model_not_found", param="model")
    n = integer(body, "n", 1, 1, max_rows)
    if integer(body, "best_of", n, 1) != n:
        raise ApiError(400, "best_of must equal n (every answer drawn is returned)", param="best_of")
    echo = bool(body.get("echo"))
    if chat:
        if echo:
            raise ApiError(400, "echo is for /v1/completions", param="echo")
        prompts = [(None, _chat_ids(body.get("messages"), tok, chat_template))]
    else:
        prompts = prompts_of(body, tok, vocab)
    limit = integer(body, "max_completion_tokens", None, 1) if chat else None
    limit = limit if limit is not None else integer(body, "max_tokens", None, 0 if echo else 1)
    sampling, logprobs = sampling_of(body, vocab), logprobs_wanted(body, chat)
    stop_strings, stop_ids = stops_of(body, vocab)
    if not body.get("ignore_eos"):
        stop_ids = tuple(dict.fromkeys(stop_ids + tuple(model_stop_ids)))
    seed, min_tokens = integer(body, "seed", None, 0), integer(body, "min_tokens", 0, 0)
    requests, groups = [], []
    for k, (_, ids) in enumerate(prompts):
        max_tokens = limit if limit is not None else max(1, max_seq - len(ids))
        if len(ids) + max_tokens > max_seq:
            raise ApiError(400, f"this model's context is {max_seq} tokens; prompt {k} has {len(ids)} and max_tokens "
                                f"asks for {max_tokens} ({len(ids) + max_tokens} in all)", param="max_tokens",
                           code="context_length_exceeded")
        group = []
        for i in range(n):
            choice = len(requests)
            request = Request(
                f"{uuid.uuid4().hex[:16]}-{choice}", ids, max_tokens, stop_ids, sampling,
                (seed + choice * GOLDEN) % 2 ** 63 if seed is not None else random.randrange(2 ** 63),
                min_tokens=min_tokens, logprobs=logprobs,
                prompt_logprobs=(logprobs or 0) if echo and (logprobs is not None or max_tokens == 0) else None,
                stop_strings=stop_strings, group=group[0].id if group else None)
            try:
                check(request)
            except ValueError as err:
                raise ApiError(400, str(err), param="prompt") from err
            group.append(request)
            requests.append(request)
        groups.append(group)
    options = body.get("stream_options") or {}
    return Call(chat, bool(body.get("stream")), bool(isinstance(options, dict) and options.get("include_usage")),
                requests, groups, [text for text, _ in prompts], echo, logprobs, bool(body.get("return_token_ids")))


def _chat_ids(messages, tok, template) -> list[int]:
    if template is None:
        raise ApiError(400, "this checkpoint has no chat_template (tokenizer_config.json): use /v1/completions")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} strings", param="messages")
    ids = tok.encode(template.render(messages), bos=False)
    if not ids:
        raise ApiError(400, "the chat template renders these messages as no tokens", param="messages")
    return ids


def completion_logprobs(tok, ids: list[int], values: list, offset: int) -> dict:
    """The completions API's logprobs object for tokens `ids` and their RowLogprobs (None: a prompt's
    first token, which has none); text_offset counts from `offset`."""
    tokens = [tok.piece_text(i) for i in ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [None if v is None else v.logprob for v in values],
            "top_logprobs": [None if v is None else {tok.piece_text(i): p for i, p in v.top} for v in values],
            "text_offset": offsets}


def chat_logprobs(tok, ids: list[int], values: list) -> dict:
    def entry(i: int, p: float) -> dict:
        text = tok.piece_text(i)
        return {"token": text, "logprob": p, "bytes": list(text.encode())}
    return {"content": [{**entry(i, v.logprob), "top_logprobs": [entry(j, p) for j, p in v.top]}
                        for i, v in zip(ids, values)]}
