"""Text <-> token ids through a Hugging Face `tokenizer.json`, batched with left padding.

BLOOM's tokenizer adds no special tokens, so encoding is the raw BPE ids and a
prompt's last token is the last thing the model saw: generation continues it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, InputError

FILENAME = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def write_tokenizer_config(directory: Path) -> None:
    """The `tokenizer_config.json` BLOOM publishes beside tokenizer.json (special tokens, left
    padding), so `transformers.AutoTokenizer` and converters such as CTranslate2's read it."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left",
              "add_prefix_space": False, **SPECIAL_TOKENS}  # fmt: skip
    (directory / CONFIG_FILES[0]).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids as one batch padded on the left: (`input_ids`, `attention_mask`), [B, S] int64.

    Left padding keeps every row's last token in the last column, where generation continues.
    """
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


class Tokenizer:
    def __init__(self, path: str | Path, pad_token_id: int, eos_token_id: int) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception on a bad file
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({err})") from None
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, encoded together: the tokenizer releases the GIL while it works, so
        a long text encoded on one thread does not stop the others (`encode` holds it)."""
        return [encoding.ids for encoding in self._tok.encode_batch(texts, add_special_tokens=False)]

    @functools.cached_property
    def most_bytes_per_token(self) -> int | None:
        """An upper bound on the UTF-8 bytes of text one token can stand for: 4 per character of the
        longest vocabulary entry (a byte-level entry has a character per byte). None when a
        normalizer may shrink the text before it is split, so no bound holds."""
        if self._tok.normalizer is not None:
            return None
        return 4 * max(len(token) for token in self._tok.get_vocab(with_added_tokens=True))

    def encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded `input_ids` and `attention_mask`, both [B, S] int64."""
        if isinstance(texts, str) or not texts:
            raise InputError("prompts: expected a non-empty list of strings")
        rows = self.encode_many(texts)
        for i, row in enumerate(rows):
            if not row:
                raise InputError(f"prompt {i} is empty: nothing to condition generation on")
        return left_pad(rows, self.pad_token_id)

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens (EOS, padding) left out: the text does not end at an EOS,
        since with `ignore_eos` generation goes on after one (`generate` pads rows after
        theirs, and padding has no text)."""
        return self._tok.decode(ids, skip_special_tokens=True)
