"""`Engine`: a loaded model (see loader.py), with prefill/decode generation.

Generation runs on the batching core that the server shares (batching.py): the rows
are admitted together (one prefill into the batch's `KVCache`, the head computed at
the last position only), then the batch steps, one token per running row, until every
row has finished; a finished row leaves the batch and costs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import parallel
from .batching import STOP, Batch, Output, Sequence
from .config import BloomConfig
from .detokenize import Detokenizer
from .errors import InputError
from .kv_cache import KVCache
from .model import Bloom
from .sampling import GenerationConfig
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
        self._spare: KVCache | None = None  # a finished batch's cache, for the next one

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
        """Yield each step's new tokens [B] (CPU int64) as soon as they are chosen.

        Arguments as `generate`; the inputs are checked before the first step. A finished
        row yields pad ids; the stream ends once every row has finished. Sampling with
        `seed` gives row i the generator a lone run with seed + i would have.
        """
        config = (generation_config or GenerationConfig()).updated(**settings)
        return self._tokens(self._sequences(input_ids, attention_mask, config))

    def sequence(self, prompt: list[int], config: GenerationConfig, seed: int | None, key: int = 0
                 ) -> Sequence:
        """A sequence to admit to a `batch()` of this engine."""
        return Sequence.start(prompt, config, seed, self.device, key)

    def _sequences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   config: GenerationConfig) -> list[Sequence]:
        """The checked inputs as sequences: row i's prompt without its padding, as key i."""
        ids, mask = self._check_inputs(input_ids, attention_mask, extra=config.max_new_tokens)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
        return [self.sequence(p, config, seed, key) for key, (p, seed) in
                enumerate(zip(prompts, self.seeds(config, len(prompts))))]

    def seeds(self, config: GenerationConfig, count: int) -> list[int | None]:
        """Seeds for `count` sequences sampled under `config`: seed + i, or (under tensor
        parallelism, where ranks must draw alike) rank 0's random base + i, or None: fresh."""
        base = parallel.shared_seed(config.seed, self.shard) if config.do_sample else None
        return [None if base is None else base + i for i in range(count)]

    def batch(self, rows: int, length: int) -> Batch:
        """An empty running batch of up to `rows` sequences, its cache sized for `length` tokens
        (it grows up to the context). It takes the engine's spare cache when that fits."""
        cache, self._spare = self._spare, None
        if cache is None or not cache.fits(rows, length, self.dtype, self.device):
            cache = None  # free the old buffers before allocating new ones
            cfg = self.config
            cache = KVCache(cfg.n_layer, rows, len(self.model.heads), length, cfg.head_dim,
                            self.dtype, self.device)
        return Batch(self.model, cache, self.max_seq_len)

    def give_back(self, batch: Batch) -> None:
        """Keep a finished batch's cache for the next `batch()` (allocating it again costs page faults)."""
        self._spare = batch.cache

    def _run(self, seqs: list[Sequence], stopped: Callable[[list[Output]], list[int]] | None = None
             ) -> Iterator[list[Output]]:
        """Admit every row at once, then step until all have finished; yields each step's outputs.
        `stopped` names (by key) the sequences a step's outputs end (a stop string): they leave."""
        longest = max(len(seq.prompt) + seq.config.max_new_tokens for seq in seqs)
        batch = self.batch(len(seqs), longest)
        try:
            outputs = batch.admit(seqs)
            while True:
                failed = next((out for out in outputs if out.error), None)
                if failed is not None:
                    raise RuntimeError(f"generation failed for row {failed.key}: {failed.error}")
                yield outputs
                for key in stopped(outputs) if stopped else []:
                    if seqs[key] in batch.sequences:
                        batch.evict(seqs[key], STOP)
                if not batch.sequences:
                    return
                outputs = batch.step()
        finally:
            self.give_back(batch)

    def _tokens(self, seqs: list[Sequence]) -> Iterator[torch.Tensor]:
        """Each step's new tokens [B], pad ids for rows that have finished."""
        pad = self.config.pad_token_id
        for step, _ in enumerate(self._run(seqs)):
            yield torch.tensor([seq.tokens[step] if len(seq.tokens) > step else pad for seq in seqs])

    def generate_text(
        self, prompts: list[str], *, generation_config: GenerationConfig | None = None, **settings
    ) -> list[str]:
        """Continuations of each prompt, decoded, ending before EOS (the model's, unless the settings
        name another) or a stop string of the settings' `stop`."""
        *_, texts = self._texts(prompts, generation_config, settings)  # every step yields the same list
        return [text.flush() for text in texts]

    def stream_text(
        self, prompt: str, *, generation_config: GenerationConfig | None = None, **settings
    ) -> Iterator[str]:
        """The continuation of one prompt, piece by piece as its tokens come; joined, the pieces
        are `generate_text`'s. Text is held back while it ends inside a character (a byte-level
        token can carry part of one) or may be the start of a stop string."""
        shown = 0
        text = None
        for (text,) in self._texts([prompt], generation_config, settings):
            if len(text.visible) > shown:
                yield text.visible[shown:]
                shown = len(text.visible)
        rest = text.flush()[shown:]
        if rest:
            yield rest

    def _texts(self, prompts: list[str], given: GenerationConfig | None, settings: dict
               ) -> Iterator[list[Detokenizer]]:
        """Generate for text prompts, following each row's text; yields the rows' texts each step."""
        config = (given or GenerationConfig(eos_token_id=self.config.eos_token_id)).updated(**settings)
        seqs = self._sequences(*self._encode(prompts), config)
        texts = [Detokenizer(self.tokenizer.decode, config.stop) for _ in seqs]

        def stopped(outputs: list[Output]) -> list[int]:
            return [out.key for out in outputs if out.token is not None and out.finish_reason != STOP
                    and texts[out.key].add(out.token)]

        for _ in self._run(seqs, stopped):
            yield texts

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer.json: pass token ids to generate() "
                             "(on the CLI: generate --token-ids '5 17 42')")
        return self.tokenizer.encode_batch(prompts)

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
