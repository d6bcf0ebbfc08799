"""Generation settings (`GenerationConfig`) and choosing the next token from logits.

The settings follow Hugging Face's `GenerationConfig` names. The order
(temperature, then top-k, then top-p) and the top-p rule (keep the smallest set of
tokens whose probability reaches top_p, at least one) follow `transformers`'
logits processors, so seeded runs behave as users expect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import InputError


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to generate: length, greedy or sampling, when a row stops (`eos_token_id`, any of
    `stop_token_ids`, or text containing one of `stop`, which needs a tokenizer), and whether
    to report each token's log-probability with the `logprobs` most likely (None: not)."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    eos_token_id: int | None = None  # None: never stop early
    seed: int | None = None  # seeds sampling; None: a fresh random seed
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise InputError(f"logprobs must be >= 0, got {self.logprobs}")

    def updated(self, **changes: Any) -> GenerationConfig:
        """A copy with `changes` applied (the keyword form of `Engine.generate`)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InputError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def ignored_sampling_settings(self) -> list[str]:
        """Sampling settings given without `do_sample`, which greedy decoding ignores."""
        if self.do_sample:
            return []
        defaults = GenerationConfig()
        return [name for name in ("temperature", "top_k", "top_p")
                if getattr(self, name) != getattr(defaults, name)]


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
               ) -> torch.Tensor:
    """Token ids [B] chosen from logits [B, V] of any float dtype.

    Greedy takes the first maximum in the logits' own dtype (widening to float32 is
    exact and keeps the order), through `max`, not `argmax`: on 2 threads of an
    AVX-512 Xeon, one bloom row of 250880 bfloat16 logits takes 0.25 ms that way
    against 1.05 ms for `argmax` (0.46 ms for float32 + `argmax`, the old path).
    Sampling works in float32.
    """
    if not config.do_sample:
        return logits.max(dim=-1).indices
    logits = logits.float() / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with -inf outside the smallest most-likely set whose probability reaches `top_p`."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = before >= top_p  # never drops the most likely token (before = 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
