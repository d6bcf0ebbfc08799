"""Turning prompts into choices, in batches, the two ways the methods define.

`ceval`: one forward pass per batch; the choice is the argmax over the next-token
logits at the ids of A, B, C and D (probabilities are softmaxed over those four).
`atb`: greedy generation of up to 32 tokens; the choice is the first ASCII
letter of the text, stopping a batch early once every row has one (the first
letter cannot change after that, so the result is the same).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..engine import Engine
from ..errors import InputError
from .dataset import LETTERS

ATB_MAX_NEW_TOKENS = 32
_ASCII_LETTER = re.compile(r"[A-Za-z]")


@dataclass(frozen=True)
class Choice:
    letter: str | None  # None: the output held no ASCII letter
    probs: tuple[float, float, float, float] | None = None  # ceval: A-D probabilities
    output: str | None = None  # atb: the generated text


def letter_ids(engine: Engine) -> list[int]:
    """The ids of A, B, C, D as the tokenizer encodes each letter alone."""
    ids = [engine.tokenizer.encode(letter) for letter in LETTERS]
    for letter, row in zip(LETTERS, ids):
        if len(row) != 1:
            raise InputError(f"the tokenizer encodes {letter!r} as {len(row)} tokens; C-Eval scoring "
                             "needs each answer letter to be one token")
    return [row[0] for row in ids]


def score_logits(engine: Engine, prompts: list[str], letters: list[int]) -> list[Choice]:
    ids, mask = engine.tokenizer.encode_batch(prompts)
    probs = engine.next_token_logits(ids, mask)[:, letters].softmax(-1)
    return [Choice(LETTERS[int(row.argmax())], tuple(row.tolist())) for row in probs]


def first_letter(text: str) -> str | None:
    match = _ASCII_LETTER.search(text)
    return match.group(0) if match else None


def score_generation(engine: Engine, prompts: list[str]) -> list[Choice]:
    ids, mask = engine.tokenizer.encode_batch(prompts)
    eos = engine.config.eos_token_id
    rows: list[list[int]] = [[] for _ in prompts]
    open_rows = set(range(len(prompts)))  # rows with neither a letter nor EOS yet
    for step in engine.stream(ids, mask, max_new_tokens=ATB_MAX_NEW_TOKENS, eos_token_id=eos):
        for i, token in enumerate(step.tolist()):
            rows[i].append(token)
        for i in list(open_rows):  # decode only the undecided rows: the others cannot change choice
            if first_letter(engine.tokenizer.decode(rows[i])) is not None or eos in rows[i]:
                open_rows.discard(i)
        if not open_rows:
            break
    texts = [engine.tokenizer.decode(row) for row in rows]
    return [Choice(first_letter(text), output=text) for text in texts]


def token_count(engine: Engine, text: str) -> int:
    return len(engine.tokenizer.encode(text))


def score(engine: Engine, method: str, prompts: list[str], letters: list[int]) -> list[Choice]:
    return score_logits(engine, prompts, letters) if method == "ceval" else score_generation(engine, prompts)
