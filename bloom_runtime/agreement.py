"""How far one path's logits are from a reference's, over the real (unpadded) tokens.

The conformance suites, the accuracy suite and `tools/paths_report.py` state their
tolerances in these figures.
"""

from __future__ import annotations

import torch


def _real(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    if mask is None:
        return ours, ref
    keep = mask.bool().cpu()
    return ours[keep], ref[keep]


def relative_error(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |ours - ref| over real positions, divided by the logit scale max |ref|."""
    return float(position_errors(ours, ref, mask).max())


def position_errors(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each real position's max |ours - ref|, divided by the logit scale max |ref|: where an error
    sits, for paths whose int8 roundings can flip at a few tokens while the rest agree."""
    ours, ref = _real(ours, ref, mask)
    return (ours - ref).abs().amax(-1) / ref.abs().max()


def top1_agreement(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of real positions whose argmax token is the same."""
    ours, ref = _real(ours, ref, mask)
    return float((ours.argmax(-1) == ref.argmax(-1)).float().mean())


def kl_divergence(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean KL(ref || ours) in nats over real positions, from logits."""
    ours, ref = _real(ours, ref, mask)
    log_p, log_q = ref.log_softmax(-1), ours.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
