"""The running batch: sequences join it (`admit`), advance together (`step`) and leave (`evict`).

`Engine.generate` and the server share this core: generate admits every row at once and
steps until all have finished; the server admits requests as they arrive and evicts them
as they finish or are cancelled, between decode steps (continuous batching).

Rows are right-aligned in one `KVCache` (fixed slots, per-row masks): every row's tokens end
at column `end`, so a decode step feeds one token per row at one position, and BLOOM's
ALiBi bias, which depends only on the mask and on the distance between indices, is exact
for every row without per-row positions (model.attention_bias). Newly admitted rows are
prefilled in one forward (a segment per prompt length: no prompt is padded to another's),
straight into the free rows at the columns that end at `end` (or, joining
a step, inside that step's forward: one read of the weights for the decode and the prefill);
a prompt longer than `end` first moves the running rows right. A leaving row's slot takes the last
row (one row copied), and when every row starts well after column 0, the columns before them
are dropped (one copy, at most once per halving), so no step's cost grows with rows that left.

Every sequence has its own settings and, when sampling, its own generator, and each row's
arithmetic is its own, so a sequence's tokens do not depend on what it was batched with.
Each `admit` and `step` returns an immutable `Output` per sequence it moved (token,
log-probabilities, finish reason): what a reader in another thread gets, never the live
`Sequence`. A sequence whose token cannot be chosen fails alone; the batch goes on.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from .errors import InputError
from .kv_cache import KVCache
from .model import Bloom, Segment
from .sampling import GenerationConfig, choose

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"  # why a sequence finished


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model (before temperature and filtering),
    and the `logprobs` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass(frozen=True)
class Output:
    """What one step did to one sequence, as a value that another thread may keep: the token
    chosen (None when the sequence failed or only scored its prompt), its log-probabilities
    when asked, why the sequence finished (None: it runs on) and, for a failure, the reason."""

    key: int
    token: int | None
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Sequence:
    """One prompt's generation: its settings, its generator, its tokens and why it finished.

    The core works in tokens: EOS, stop token ids and the length end a sequence here; stop
    strings are text, which whoever reads the outputs follows (detokenize.py) and ends by
    evicting the sequence. `key` names the sequence in its outputs.
    """

    prompt: list[int]
    config: GenerationConfig
    generator: torch.Generator | None = None
    key: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    @classmethod
    def start(cls, prompt: list[int], config: GenerationConfig, seed: int | None, device: torch.device,
              key: int = 0) -> Sequence:
        """A sequence with its own generator when it samples (seeded, or from a fresh random seed)."""
        generator = None
        if config.do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        return cls(list(prompt), config, generator, key)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprobs: TokenLogprobs | None) -> Output:
        """Append a chosen token and finish if it ends the sequence."""
        self.tokens.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        config = self.config
        if token == config.eos_token_id or token in config.stop_token_ids:
            self.finish_reason = STOP
        elif len(self.tokens) >= config.max_new_tokens:
            self.finish_reason = LENGTH
        return Output(self.key, token, logprobs, self.finish_reason)

    def fail(self, error: str) -> Output:
        """End the sequence on an error of its own (the batch goes on without it)."""
        self.finish_reason, self.error = ERROR, error
        return Output(self.key, None, None, ERROR, error)


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
    def admit(self, group: list[Sequence]) -> list[Output]:
        """Prefill `group` in one forward (see `_place`), choose each one's first token,
        and join the running rows; returns their outputs. Those already finished (one token, or a
        stop) leave at once."""
        first = len(self.sequences)
        logits = self._last_logits(self._place(group, after_step=False))
        self._join(group)
        return self._advance(first, logits)

    @torch.inference_mode()
    def step(self, admitting: list[Sequence] = ()) -> list[Output]:
        """One decode step for every running sequence; returns what it did to each (the running
        sequences' outputs, then the admitted ones').

        With `admitting`, that group's prefill runs in the same forward (one read of the weights
        for both, where `admit` then `step` reads them twice) and it joins as `admit` would."""
        running, group = list(self.sequences), list(admitting)
        if not running:
            return self.admit(group) if group else []
        self._make_room()
        joining = self._place(group, after_step=True) if group else []
        n, end = len(running), self.end
        self.mask[:n, end] = 1
        decode = Segment(self.last[:n, None], self.mask[:n, : end + 1], self.cache.view(slice(0, n), 0), end)
        logits = self._last_logits([decode, *joining])
        self.end += 1
        self.lengths = [length + 1 for length in self.lengths]
        self._join(group)
        return self._advance(0, logits)

    def _last_logits(self, segments: list[Segment]) -> torch.Tensor:
        """The segments through one forward: each row's logits at its last position, rows in order."""
        return torch.cat([part[:, -1] for part in self.model.forward_segments(segments, last_only=True)])

    def _place(self, group: list[Sequence], after_step: bool) -> list[Segment]:
        """Make room for `group` in the free rows, its prompts ending where the running rows' tokens
        end (after this step's, when it joins a step), and the segments that prefill it there: one
        per run of neighbouring prompts of one length, so no prompt is padded to another's and a
        group's prefill costs its own tokens (a server's admissions have every length)."""
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
        segments, row = [], len(self.sequences)
        device = self.mask.device
        for length, run in itertools.groupby(group, key=lambda seq: len(seq.prompt)):
            prompts = [seq.prompt for seq in run]
            rows, offset = slice(row, row + len(prompts)), ends - length
            row += len(prompts)
            self.cache.clear(rows, slice(0, offset))
            self.mask[rows] = 0
            self.mask[rows, offset:ends] = 1
            ids = torch.tensor(prompts, dtype=torch.long, device=device)
            segments.append(Segment(ids, torch.ones_like(ids), self.cache.view(rows, offset), 0))
        return segments

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

    def _advance(self, first: int, logits: torch.Tensor) -> list[Output]:
        """Give rows `first:` their next token from `logits`, then evict those that finished."""
        seqs = self.sequences[first:]
        tokens, errors = choose(logits, [seq.config for seq in seqs], [seq.generator for seq in seqs])
        self.last[first:first + len(seqs)] = torch.tensor(tokens, device=self.last.device)
        logprobs = token_logprobs(logits, tokens, [None if error else seq.config.logprobs
                                                   for seq, error in zip(seqs, errors)])
        outputs = [seq.fail(error) if error else seq.add(token, scored)
                   for seq, token, error, scored in zip(seqs, tokens, errors, logprobs)]
        for seq in seqs:
            if seq.done:
                self.evict(seq)
        return outputs

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


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int | None]
                   ) -> list[TokenLogprobs | None]:
    """For each row of `logits` [R, V]: the log-probability of `tokens[i]` and the `tops[i]` most
    likely tokens with theirs, or None where `tops[i]` is None (not asked). One log-softmax and
    one top-k over the rows that ask."""
    asked = [i for i, top in enumerate(tops) if top is not None]
    out: list[TokenLogprobs | None] = [None] * len(tops)
    if not asked:
        return out
    logprobs = logits[asked].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in asked], device=logprobs.device))
    most = max(tops[i] for i in asked)
    values, ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids, chosen = values.tolist(), ids.tolist(), chosen[:, 0].tolist()
    for row, i in enumerate(asked):
        out[i] = TokenLogprobs(chosen[row], list(zip(ids[row][:tops[i]], values[row][:tops[i]])))
    return out
