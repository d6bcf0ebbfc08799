"""Random prompts for the tests: token ids left-padded into one batch, as the runtime takes them."""

from __future__ import annotations

import torch

from bloom_runtime.tokenizer import left_pad


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)] left-padded to the longest row, with the attention mask."""
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths], pad_token_id=3)
