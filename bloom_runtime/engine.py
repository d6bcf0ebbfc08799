"""`Engine`: a loaded model (see loader.py), with prefill/decode generation.

Generation is two phases. Prefill runs the whole left-padded prompt once,
writes every layer's keys/values into a preallocated `KVCache`, and computes
the head for the last position only. Each decode step then feeds one token per
row. Left padding keeps all rows aligned, so one `start` offset serves the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import parallel
from .config import BloomConfig
from .errors import InputError
from .kv_cache import KVCache
from .model import Bloom
from .sampling import GenerationConfig, next_token
from .tokenizer import Tokenizer


class Engine:
    """A loaded model: full-sequence logits, and generation with a KV cache."""

    def __init__(
        self,
        model: Bloom,
        tokenizer: Tokenizer | None,
        max_seq_len: int | None = None,
        shard: parallel.Shard = parallel.SINGLE,
    ) -> None:
        """`model` is rank `shard.rank`'s part under tensor parallelism."""
        self.model = model
        self.config: BloomConfig = model.config
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len or model.config.seq_length
        self.shard = shard
        self._cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.model.ln_f.weight.device  # the embedding may be quantized

    @property
    def dtype(self) -> torch.dtype:
        return self.model.ln_f.weight.dtype  # the embedding may be int8

    @torch.inference_mode()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, S, V] in float32 on the CPU for every position, without a cache."""
        ids, mask = self._check_inputs(input_ids, attention_mask, extra=0)
        return self.model(ids, mask).float().cpu()

    @torch.inference_mode()
    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, V] in float32 on the CPU at the last position only: what scoring a
        prompt's next token needs, without a [B, S, V] tensor (1 GB at 250k vocab, 1k tokens)."""
        ids, mask = self._check_inputs(input_ids, attention_mask, extra=0)
        return self.model(ids, mask, last_only=True)[:, -1].float().cpu()

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        generation_config: GenerationConfig | None = None,
        **settings,
    ) -> torch.Tensor:
        """New tokens [B, max_new_tokens] (CPU int64); after a row's EOS the row holds pad ids.

        Settings come as a `GenerationConfig`, as keywords (`max_new_tokens=8,
        do_sample=True, ...`), or both, keywords winning, as in transformers.
        """
        config = (generation_config or GenerationConfig()).updated(**settings)
        batch = torch.as_tensor(input_ids).shape[0]
        out = torch.full((batch, config.max_new_tokens), self.config.pad_token_id)
        for step, token in enumerate(self.stream(input_ids, attention_mask, generation_config=config)):
            out[:, step] = token.cpu()
        return out

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        generation_config: GenerationConfig | None = None,
        **settings,
    ) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens [B] (on the device) as soon as they are chosen.

        Arguments as `generate`; the inputs are checked before the first step.
        Stops early once every row has produced `eos_token_id`.
        """
        config = (generation_config or GenerationConfig()).updated(**settings)
        ids, mask = self._check_inputs(input_ids, attention_mask, extra=config.max_new_tokens)
        generator = None
        if config.do_sample:
            generator = torch.Generator(device=self.device)
            seed = parallel.shared_seed(config.seed, self.shard)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        return self._steps(ids, mask, config, generator)

    @torch.inference_mode()
    def _steps(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Iterator[torch.Tensor]:
        batch, prompt_len = ids.shape
        max_new_tokens, eos_token_id = config.max_new_tokens, config.eos_token_id
        total = prompt_len + max_new_tokens
        cache = self._kv_cache(batch, total)
        full_mask = torch.ones(batch, total, dtype=mask.dtype, device=self.device)
        full_mask[:, :prompt_len] = mask
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        logits = self.model(ids, full_mask[:, :prompt_len], cache, 0, last_only=True)
        for step in range(max_new_tokens):
            token = next_token(logits[:, -1], config, generator)
            token = token.masked_fill(done, self.config.pad_token_id)
            yield token
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    return
            if step + 1 < max_new_tokens:
                pos = prompt_len + step
                logits = self.model(token[:, None], full_mask[:, : pos + 1], cache, pos, last_only=True)

    def _kv_cache(self, batch: int, length: int) -> KVCache:
        """The cache for this generation, reusing the last one when it is big enough."""
        if self._cache is None or not self._cache.fits(batch, length, self.dtype, self.device):
            self._cache = None  # free the old buffers before allocating new ones
            cfg = self.config
            self._cache = KVCache(cfg.n_layer, batch, len(self.model.heads), length, cfg.head_dim,
                                  self.dtype, self.device)
        return self._cache

    def generate_text(
        self, prompts: list[str], *, generation_config: GenerationConfig | None = None, **settings
    ) -> list[str]:
        """Continuations of each prompt, decoded and cut at EOS (the model's, unless the
        settings name another)."""
        ids, mask = self._encode(prompts)
        new = self.generate(ids, mask, generation_config=self._text_config(generation_config), **settings)
        return [self.tokenizer.decode(row.tolist()) for row in new]

    def stream_text(
        self, prompt: str, *, generation_config: GenerationConfig | None = None, **settings
    ) -> Iterator[str]:
        """The continuation of one prompt, piece by piece as its tokens come; joined, the pieces
        are `generate_text`'s. A piece is held back while it ends inside a character (a
        byte-level token can carry part of one)."""
        ids, mask = self._encode([prompt])
        pending: list[int] = []  # tokens since the last whole character shown
        for token in self.stream(ids, mask, generation_config=self._text_config(generation_config),
                                 **settings):
            pending.append(int(token[0]))
            text = self.tokenizer.decode(pending)
            if text and not text.endswith("\ufffd"):
                yield text
                pending = []
        rest = self.tokenizer.decode(pending)
        if rest:
            yield rest

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer.json: pass token ids to generate() "
                             "(on the CLI: generate --token-ids '5 17 42')")
        return self.tokenizer.encode_batch(prompts)

    def _text_config(self, given: GenerationConfig | None) -> GenerationConfig:
        return given or GenerationConfig(eos_token_id=self.config.eos_token_id)

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, extra: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ids and mask and move them to the device; `extra` = tokens to come."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
            raise InputError(
                f"input_ids: expected a non-empty [batch, seq] integer tensor, got shape "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = torch.as_tensor(attention_mask)
            if mask.shape != ids.shape:
                raise InputError(
                    f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
                )
            if not ((mask == 0) | (mask == 1)).all():
                raise InputError("attention_mask: values must be 0 or 1")
        mask = mask.long()
        self._check_ids(ids, mask)
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise InputError("attention_mask: padding must be on the left (a 0 follows a 1)")
        if (mask.sum(dim=1) == 0).any():
            raise InputError("attention_mask: a row has no tokens (empty prompt)")
        if ids.shape[1] + extra > self.max_seq_len:
            raise InputError(
                f"prompt of {ids.shape[1]} tokens + {extra} new tokens exceeds the "
                f"maximum sequence length {self.max_seq_len}"
            )
        ids = ids.long().masked_fill(mask == 0, 0)  # any id under padding: it is never attended
        return ids.to(self.device), mask.to(self.device)

    def _check_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        real = ids[mask.bool()]
        bad = real[(real < 0) | (real >= self.config.vocab_size)]
        if bad.numel():
            raise InputError(
                f"input_ids: token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})"
            )
