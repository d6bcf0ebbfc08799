"""The running batch: sequences join it (`admit`), advance together (`step`) and leave (`evict`).

`Engine.generate` and the server share this core: generate admits every row at once and
steps until all have finished; the server admits requests as they arrive and evicts them
as they finish or are cancelled, between decode steps (continuous batching).

Rows are right-aligned in one `KVCache` (fixed slots, per-row masks): every row's tokens end
at column `end`, so a decode step feeds one token per row at one position, and BLOOM's
ALiBi bias, which depends only on the mask and on the distance between indices, is exact
for every row without per-row positions (model.attention_bias). Newly admitted rows are
prefilled together, straight into the free rows at the columns that end at `end` (or, joining
a step, inside that step's forward: one read of the weights for the decode and the prefill);
a prompt longer than `end` first moves the running rows right. A leaving row's slot takes the last
row (one row copied), and when every row starts well after column 0, the columns before them
are dropped (one copy, at most once per halving), so no step's cost grows with rows that left.

Every sequence has its own settings and, when sampling, its own generator, and each row's
arithmetic is its own, so a sequence's tokens do not depend on what it was batched with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .errors import InputError
from .kv_cache import KVCache
from .model import Bloom, Segment
from .sampling import GenerationConfig, next_token
from .tokenizer import left_pad

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # why a sequence finished


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model (before temperature and filtering),
    and the `logprobs` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass(eq=False)
class Sequence:
    """One prompt's generation: its settings, its generator, its tokens and why it finished.

    With `decode` (ids -> text), `text` follows the tokens and stop strings end it; the text
    excludes the stop string and a final stop token, as OpenAI's API returns it.
    """

    prompt: list[int]
    config: GenerationConfig
    generator: torch.Generator | None = None
    decode: Callable[[list[int]], str] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    @classmethod
    def start(cls, prompt: list[int], config: GenerationConfig, seed: int | None, device: torch.device,
              decode: Callable[[list[int]], str] | None = None) -> Sequence:
        """A sequence with its own generator when it samples (seeded, or from a fresh random seed)."""
        if config.stop and decode is None:
            raise InputError("stop strings need a tokenizer: this model has no tokenizer.json")
        generator = None
        if config.do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        return cls(list(prompt), config, generator, decode)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprobs: TokenLogprobs | None) -> None:
        """Append a chosen token and finish if it ends the sequence."""
        self.tokens.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        config = self.config
        stopped = token == config.eos_token_id or token in config.stop_token_ids
        if self.decode is not None:
            self.text = self.decode(self.tokens[:-1] if stopped else self.tokens)
            cut = min((i for i in (self.text.find(s) for s in config.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, stopped = self.text[:cut], True
        if stopped:
            self.finish_reason = STOP
        elif len(self.tokens) >= config.max_new_tokens:
            self.finish_reason = LENGTH


class Batch:
    """Sequences generating together over one KV cache (see the module docstring)."""

    def __init__(self, model: Bloom, cache: KVCache, max_len: int) -> None:
        """`cache` bounds the rows; its columns grow on demand up to `max_len`, the context."""
        self.model = model
        self.cache = cache
        self.max_len = max_len
        self.sequences: list[Sequence] = []  # row i of the cache holds sequences[i]
        self.lengths: list[int] = []  # per row: how many columns before `end` hold its tokens
        self.end = 0
        device = cache.keys.device
        self.mask = torch.zeros(cache.batch, cache.max_len, dtype=torch.long, device=device)
        self.last = torch.zeros(cache.batch, dtype=torch.long, device=device)  # each row's next input

    @property
    def free_rows(self) -> int:
        return self.cache.batch - len(self.sequences)

    @torch.inference_mode()
    def admit(self, group: list[Sequence]) -> None:
        """Prefill `group` together (left-padded among themselves), choose each one's first token,
        and join the running rows. Those already finished (one token, or a stop) leave at once."""
        first = len(self.sequences)
        segment = self._place(group, after_step=False)
        logits = self.model(segment.input_ids, segment.mask, segment.cache, 0, last_only=True)[:, -1]
        self._join(group)
        self._advance(first, logits)

    @torch.inference_mode()
    def step(self, admitting: list[Sequence] = ()) -> list[Sequence]:
        """One decode step for every running sequence; returns them (each has one more token).

        With `admitting`, that group's prefill runs in the same forward (one read of the weights
        for both, where `admit` then `step` reads them twice) and it joins as `admit` would."""
        running, group = list(self.sequences), list(admitting)
        if not running:
            if group:
                self.admit(group)
            return running
        self._make_room()
        joining = [self._place(group, after_step=True)] if group else []
        n, end = len(running), self.end
        self.mask[:n, end] = 1
        decode = Segment(self.last[:n, None], self.mask[:n, : end + 1], self.cache.view(slice(0, n), 0), end)
        logits = self.model.forward_segments([decode, *joining], last_only=True)
        self.end += 1
        self.lengths = [length + 1 for length in self.lengths]
        self._join(group)
        self._advance(0, torch.cat([part[:, -1] for part in logits]))
        return running

    def _place(self, group: list[Sequence], after_step: bool) -> Segment:
        """Make room for `group` in the free rows, its prompts ending where the running rows' tokens
        end (after this step's, when it joins a step), and the segment that prefills it there."""
        if not 0 < len(group) <= self.free_rows:
            raise InputError(f"cannot admit {len(group)} sequences: {self.free_rows} rows are free")
        for seq in group:
            if len(seq.prompt) + seq.config.max_new_tokens > self.max_len:
                raise InputError(f"prompt of {len(seq.prompt)} tokens + {seq.config.max_new_tokens} new "
                                 f"tokens exceeds the maximum sequence length {self.max_len}")
        width = max(len(seq.prompt) for seq in group)
        ends = self.end + after_step
        if width > ends:
            self._shift_right(width - ends)
            ends = width
        self._grow(ends)  # joining a step: its column too
        rows = slice(len(self.sequences), len(self.sequences) + len(group))
        offset = ends - width
        ids, mask = left_pad([seq.prompt for seq in group], 0)
        ids, mask = ids.to(self.mask.device), mask.to(self.mask.device)
        self.cache.clear(rows, slice(0, offset))
        self.mask[rows] = 0
        self.mask[rows, offset:ends] = mask
        return Segment(ids, mask, self.cache.view(rows, offset), 0)

    def _join(self, group: list[Sequence]) -> None:
        """The prefilled `group` becomes rows of the batch, after the running ones."""
        self.sequences += group
        self.lengths += [len(seq.prompt) for seq in group]

    @torch.inference_mode()
    def evict(self, seq: Sequence, reason: str = CANCELLED) -> None:
        """`seq` leaves now, finished with `reason` unless it already was; the last row takes its slot."""
        row, last = self.sequences.index(seq), len(self.sequences) - 1
        if row != last:
            self.cache.copy_row(last, row, self.end)
            self.mask[row, : self.end] = self.mask[last, : self.end]
            self.last[row] = self.last[last]
            self.sequences[row], self.lengths[row] = self.sequences[last], self.lengths[last]
        self.sequences.pop()
        self.lengths.pop()
        if not seq.done:
            seq.finish_reason = reason
        if not self.sequences:
            self.end = 0

    def _advance(self, first: int, logits: torch.Tensor) -> None:
        """Give rows `first:` their next token from `logits`, then evict those that finished."""
        seqs = self.sequences[first:]
        tokens = choose(logits, seqs)
        self.last[first:first + len(seqs)] = torch.tensor(tokens, device=self.last.device)
        for seq, token, row_logits in zip(seqs, tokens, logits):
            seq.add(token, token_logprobs(row_logits, token, seq.config.logprobs))
        for seq in seqs:
            if seq.done:
                self.evict(seq)

    def _make_room(self) -> None:
        """Make column `end` writable: drop the columns before every row's first token when they
        are at least half of them or the buffers are full, and grow the buffers when still full."""
        slack = self.end - max(self.lengths)
        if slack and (2 * slack >= self.end or self.end == self.cache.max_len):
            rows = slice(0, len(self.sequences))
            self.cache.move_columns(rows, slack, 0, self.end - slack)
            self.mask[rows, : self.end - slack] = self.mask[rows, slack:self.end].clone()
            self.end -= slack
        if self.end == self.cache.max_len:
            self._grow(self.end + 1)

    def _shift_right(self, by: int) -> None:
        """Move the running rows `by` columns right, so a longer prompt can end where they end."""
        self._grow(self.end + by)
        rows = slice(0, len(self.sequences))
        self.cache.move_columns(rows, 0, by, self.end)
        self.cache.clear(rows, slice(0, by))
        self.mask[rows, by:by + self.end] = self.mask[rows, : self.end].clone()
        self.mask[rows, :by] = 0
        self.end += by

    def _grow(self, columns: int) -> None:
        """Buffers of at least `columns` columns: doubled (at most the context), so growth is rare."""
        if columns <= self.cache.max_len:
            return
        size = min(self.max_len, max(columns, 2 * self.cache.max_len))
        self.cache = self.cache.grown(size)
        mask = self.mask.new_zeros(self.mask.shape[0], size)
        mask[:, : self.mask.shape[1]] = self.mask
        self.mask = mask


def choose(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Each row's next token under its own sequence's settings: greedy rows in one call, each
    sampling row with its own generator."""
    tokens = logits.max(dim=-1).indices.tolist()
    for i, seq in enumerate(seqs):
        if seq.config.do_sample:
            tokens[i] = int(next_token(logits[i:i + 1], seq.config, seq.generator))
    return tokens


def token_logprobs(logits: torch.Tensor, token: int, top: int | None) -> TokenLogprobs | None:
    """The chosen token's log-probability and the `top` most likely ones, or None when not asked."""
    if top is None:
        return None
    logprobs = logits.float().log_softmax(dim=-1)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
    return TokenLogprobs(float(logprobs[token]), list(zip(ids.tolist(), values.tolist())))
