"""OpenAI's completions API as vLLM serves it: requests checked field by field, and the bodies
(responses, stream chunks, errors) built from finished or running sequences.

Every field of a request is either understood or refused by name (`APIError`, status 400):
a client never gets an answer that silently ignored something it asked for.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from ..batching import Sequence
from ..sampling import GenerationConfig
from ..tokenizer import Tokenizer

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOPS = 16
# Fields OpenAI defines that this server does not implement, with the value that means "off":
# a request may send them at that value (as SDKs do), never at another.
NEUTRAL = {"best_of": (None, 1), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
           "logit_bias": (None, {}), "suffix": (None, ""), "repetition_penalty": (None, 1, 1.0),
           "min_tokens": (None, 0), "min_p": (None, 0, 0.0)}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stop_token_ids", "ignore_eos", "n", "echo", "logprobs", "stream", "stream_options", "user"}


class APIError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Completion:
    """A checked completions request: token-id prompts, one config, `n` choices per prompt."""

    id: str
    model: str
    created: int
    prompts: list[list[int]]
    config: GenerationConfig
    seed: int | None
    n: int
    echo: bool
    stream: bool
    include_usage: bool

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


def parse_completion(body: Any, model: str, tokenizer: Tokenizer, vocab_size: int, context: int,
                     eos_token_id: int | None) -> Completion:
    """Check a `/v1/completions` body; raises `APIError` naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS - set(NEUTRAL))
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}", unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise APIError(400, f"{name} is not supported by this server", name)
    if body.get("model", model) != model:
        raise APIError(404, f"the model {body['model']!r} does not exist; this server serves {model!r}",
                       "model", code="model_not_found")
    prompts = _prompts(body.get("prompt"), tokenizer, vocab_size)
    max_tokens = _integer(body, "max_tokens", 16, low=1)
    for i, prompt in enumerate(prompts):
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"prompt {i} has {len(prompt)} tokens: with max_tokens={max_tokens} that is "
                                f"more than the model's context of {context} tokens", "max_tokens")
    temperature = _number(body, "temperature", 1.0, low=0.0)
    top_p = _number(body, "top_p", 1.0, low=0.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _integer(body, "top_k", -1, low=-1)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(body, "logprobs", 0, low=0, high=MAX_LOGPROBS)
    echo = _flag(body, "echo")
    if echo and logprobs is not None:
        raise APIError(400, "echo with logprobs (log-probabilities of the prompt) is not supported", "echo")
    stop_ids = _integer_list(body, "stop_token_ids", vocab_size)
    options = body.get("stream_options")
    stream = _flag(body, "stream")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise APIError(400, "stream_options must be an object {\"include_usage\": bool} and needs stream",
                       "stream_options")
    config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
        top_k=max(top_k, 0), top_p=top_p, eos_token_id=None if _flag(body, "ignore_eos") else eos_token_id,
        stop_token_ids=tuple(stop_ids), stop=tuple(_stops(body.get("stop"))), logprobs=logprobs)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", 0, low=0, high=2**63 - 1)
    return Completion(f"cmpl-{uuid.uuid4().hex}", model, int(time.time()), prompts, config, seed,
                      _integer(body, "n", 1, low=1, high=64), echo, stream,
                      bool((options or {}).get("include_usage", False)))


def _prompts(prompt: Any, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """The prompt in any of its four forms, as token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list "
                            "of lists of token ids, and not empty", "prompt")
    rows = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            row = tokenizer.encode(item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            row = item
        else:
            raise APIError(400, f"prompt {i}: expected a string or a list of token ids", "prompt")
        if not row:
            raise APIError(400, f"prompt {i} is empty", "prompt")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                           "prompt")
        rows.append(list(row))
    return rows


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    valid = isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
    if not valid or len(stops) > MAX_STOPS:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       "stop")
    return stops


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, default: int, low: int, high: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(400, f"{name} must be an integer {bound}, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float, low: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise APIError(400, f"{name} must be a number >= {low}, got {value!r}", name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def _integer_list(body: dict, name: str, vocab_size: int) -> list[int]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(_is_int(t) and 0 <= t < vocab_size for t in value):
        raise APIError(400, f"{name} must be a list of token ids in [0, {vocab_size})", name)
    return value


def logprobs_body(seq: Sequence, tokenizer: Tokenizer, start: int, end: int, offset: int) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object for tokens `start:end` of `seq`, text offsets from `offset`."""
    tokens, offsets, top = [], [], []
    for token, entry in zip(seq.tokens[start:end], seq.logprobs[start:end]):
        piece = tokenizer.decode([token])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        top.append({tokenizer.decode([i]): value for i, value in entry.top})
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in seq.logprobs[start:end]],
            "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(request: Completion, choices: list[dict], usage_body: dict | None) -> dict[str, Any]:
    return {"id": request.id, "object": "text_completion", "created": request.created, "model": request.model,
            "choices": choices, "usage": usage_body}
