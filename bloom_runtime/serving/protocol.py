"""OpenAI's completions API as vLLM serves it: requests checked field by field before anything
else sees them, and the bodies (responses, stream chunks, errors) built from what the
sequences produced.

Every field of a request is either understood or refused by name (`APIError`, status 400):
a client never gets an answer that silently ignored something it asked for. Every value is
checked for its type, range and finiteness, strings for being valid Unicode, and values
quoted back in an error message are cut to a few dozen characters (`shown`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import time
import uuid
from typing import Any

from ..batching import TokenLogprobs
from ..sampling import MIN_TEMPERATURE, GenerationConfig
from ..tokenizer import Tokenizer

MAX_BODY_BYTES = 4 * 2**20  # the default limit on a request's body (serve --max-body-bytes)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOPS = 16
MAX_N = 64
MAX_CHOICES = 256  # prompts x n in one request: they are admitted in parts, but each holds memory
# Fields OpenAI defines that this server does not implement, with the value that means "off":
# a request may send them at that value (as SDKs do), never at another.
NEUTRAL = {"best_of": (None, 1), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
           "logit_bias": (None, {}), "suffix": (None, ""), "repetition_penalty": (None, 1, 1.0),
           "min_tokens": (None, 0), "min_p": (None, 0, 0.0)}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stop_token_ids", "ignore_eos", "n", "echo", "logprobs", "stream", "stream_options", "user"}
STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 48
_SHOWN.maxlong = 24
_SHOWN.maxlevel = 2
_SHOWN.maxlist = _SHOWN.maxdict = 4


def shown(value: Any) -> str:
    """`value` as an error message may quote it: a repr cut to a few dozen characters (a request
    can carry megabytes in one field; its error should not carry them back)."""
    return _SHOWN.repr(value)


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
class Served:
    """What requests are checked against: the model's name, tokenizer, vocabulary and context."""

    name: str
    tokenizer: Tokenizer
    vocab_size: int
    context: int
    eos_token_id: int | None

    @property
    def longest_prompt_bytes(self) -> int | None:
        """UTF-8 bytes beyond which a text prompt cannot fit the context (None: no such bound)."""
        per_token = self.tokenizer.most_bytes_per_token
        return None if per_token is None else per_token * self.context


@dataclasses.dataclass(frozen=True)
class Completion:
    """A checked completions request: token-id prompts, one config (None: score the prompts only,
    max_tokens 0), `n` choices per prompt."""

    id: str
    model: str
    created: int
    prompts: list[list[int]]
    config: GenerationConfig | None
    seed: int | None
    n: int
    echo: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    logprobs: int | None

    @property
    def prompt_logprobs(self) -> int | None:
        """With echo and logprobs, the prompt's tokens are scored too (what lm-eval asks for)."""
        return self.logprobs if self.echo else None


def decode_json(raw: bytes) -> Any:
    """The body as JSON; a body that is not (including NaN, Infinity and nesting too deep for
    the parser) is a 400."""
    def constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, and integers too long to read
        raise APIError(400, f"the request body is not valid JSON ({shown(str(err))})") from None


def parse_completion(body: Any, served: Served) -> Completion:
    """Check a `/v1/completions` body; raises `APIError` naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS - set(NEUTRAL))
    if unknown:
        name = unknown[0][:48] if _unicode(unknown[0][:48]) else shown(unknown[0])
        raise APIError(400, f"unknown field {shown(unknown[0])}", name)
    for name, neutral in NEUTRAL.items():
        if name in body and not _is_neutral(body[name], neutral):
            raise APIError(400, f"{name} is not supported by this server", name)
    model = body.get("model", served.name)
    if model != served.name:
        raise APIError(404, f"the model {shown(model)} does not exist; this server serves {served.name!r}",
                       "model", code="model_not_found")
    _text(body, "user")
    echo = _flag(body, "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(body, "logprobs", 0, low=0, high=MAX_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", 16, low=0 if echo else 1)
    n = _integer(body, "n", 1, low=1, high=MAX_N)
    prompts = _prompts(body.get("prompt"), served)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is more than the {MAX_CHOICES} sequences one "
                            f"request may ask for", "n")
    for i, prompt in enumerate(prompts):
        if len(prompt) + max_tokens > served.context:
            asked = f"prompt {i} has {len(prompt)} tokens: with max_tokens={shown(max_tokens)}"
            raise APIError(400, f"{asked} that is more than the context of {served.context} tokens",
                           "max_tokens")
    temperature = _number(body, "temperature", 1.0, low=0.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0)
    if top_p == 0:
        raise APIError(400, "top_p must be in (0, 1], got 0", "top_p")
    top_k = _integer(body, "top_k", -1, low=-1)
    stop_ids = _integer_list(body, "stop_token_ids", served.vocab_size)
    stream = _flag(body, "stream")
    options = _stream_options(body, stream)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", 0, low=0, high=2**63 - 1)
    sample = temperature >= MIN_TEMPERATURE  # below it: greedy (as vLLM)
    config = None if max_tokens == 0 else GenerationConfig(
        max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
        top_k=top_k if 0 < top_k < served.vocab_size else 0, top_p=top_p,
        eos_token_id=None if _flag(body, "ignore_eos") else served.eos_token_id,
        stop_token_ids=tuple(stop_ids), stop=tuple(_stops(body.get("stop"))), logprobs=logprobs)
    return Completion(f"cmpl-{uuid.uuid4().hex}", served.name, int(time.time()), prompts, config, seed, n,
                      echo, stream, options.get("include_usage", False),
                      options.get("continuous_usage_stats", False), logprobs)


def _is_neutral(value: Any, neutral: tuple) -> bool:
    return any(value == allowed and type(value) is type(allowed) for allowed in neutral)


def _prompts(prompt: Any, served: Served) -> list[list[int]]:
    """The prompt in any of its four forms, as token ids; text is tokenized only once it is known
    to be valid Unicode short enough to fit the context."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list "
                            "of lists of token ids, and not empty", "prompt")
    if len(prompt) > MAX_CHOICES:
        raise APIError(400, f"prompt holds {len(prompt)} prompts, more than the {MAX_CHOICES} one request "
                            f"may ask for", "prompt")
    texts = {}
    rows: list[list[int] | None] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            texts[i] = _prompt_text(item, i, served)
            rows.append(None)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            rows.append(item)
        else:
            raise APIError(400, f"prompt {i}: expected a string or a list of token ids", "prompt")
    for i, ids in zip(texts, served.tokenizer.encode_many(list(texts.values()))):
        rows[i] = ids
    for i, row in enumerate(rows):
        if not row:
            raise APIError(400, f"prompt {i} is empty", "prompt")
        bad = next((t for t in row if not 0 <= t < served.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt {i}: token id {shown(bad)} is outside the vocabulary "
                                f"[0, {served.vocab_size})", "prompt")
    return rows


def _prompt_text(text: str, i: int, served: Served) -> str:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise APIError(400, f"prompt {i} is not valid Unicode (a lone surrogate)", "prompt") from None
    longest = served.longest_prompt_bytes
    if longest is not None and size > longest:
        raise APIError(400, f"prompt {i} has {size} bytes of text: more than fits the model's context of "
                            f"{served.context} tokens", "prompt")
    return text


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    valid = isinstance(stops, list) and all(isinstance(s, str) and s and _unicode(s) for s in stops)
    if not valid or len(stops) > MAX_STOPS:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       "stop")
    return stops


def _stream_options(body: dict, stream: bool) -> dict[str, bool]:
    options = body.get("stream_options")
    if options is None:
        return {}
    if not stream:
        raise APIError(400, "stream_options needs stream: true", "stream_options")
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    for key, value in options.items():
        if key not in STREAM_OPTIONS:
            raise APIError(400, f"stream_options: unknown key {shown(key)} (known: "
                                f"{', '.join(sorted(STREAM_OPTIONS))})", "stream_options")
        if not isinstance(value, bool):
            raise APIError(400, f"stream_options.{key} must be true or false, got {shown(value)}",
                           "stream_options")
    return options


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(body: dict, name: str) -> None:
    value = body.get(name)
    if value is not None and not (isinstance(value, str) and _unicode(value)):
        raise APIError(400, f"{name} must be a string of valid Unicode", name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, default: int, low: int, high: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(400, f"{name} must be an integer {bound}, got {shown(value)}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            pass
    if not (math.isfinite(number) and number >= low and (high is None or number <= high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(400, f"{name} must be a finite number {bound}, got {shown(value)}", name)
    return number


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {shown(value)}", name)
    return value


def _integer_list(body: dict, name: str, vocab_size: int) -> list[int]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(_is_int(t) and 0 <= t < vocab_size for t in value):
        raise APIError(400, f"{name} must be a list of token ids in [0, {vocab_size})", name)
    return value


def logprobs_body(tokenizer: Tokenizer, tokens: list[int], entries: list[TokenLogprobs | None],
                  offset: int) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object for `tokens` with their `entries` (None: a token with no
    log-probability, a prompt's first), text offsets counted from `offset`."""
    pieces, offsets, top = [], [], []
    for token, entry in zip(tokens, entries):
        piece = tokenizer.decode([token])
        pieces.append(piece)
        offsets.append(offset)
        offset += len(piece)
        top.append(None if entry is None else {tokenizer.decode([i]): value for i, value in entry.top})
    return {"tokens": pieces, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(request: Completion, choices: list[dict], usage_body: dict | None) -> dict[str, Any]:
    return {"id": request.id, "object": "text_completion", "created": request.created, "model": request.model,
            "choices": choices, "usage": usage_body}
