"""Figures that compare our logits with the reference's, over the real (unpadded) tokens."""

from __future__ import annotations

import torch


def relative_error(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |ours - ref| over real positions, divided by the logit scale max |ref|."""
    ours, ref = ours.float().cpu(), ref.float().cpu()
    if mask is not None:
        keep = mask.bool().cpu()
        ours, ref = ours[keep], ref[keep]
    return float((ours - ref).abs().max() / ref.abs().max())


def top1_agreement(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of real positions whose argmax token is the same."""
    same = ours.float().cpu().argmax(-1) == ref.float().cpu().argmax(-1)
    if mask is not None:
        same = same[mask.bool().cpu()]
    return float(same.float().mean())


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)] left-padded to the longest row, with the attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask
