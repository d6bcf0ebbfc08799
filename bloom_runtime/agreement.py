"""How far one path's logits are from a reference's, over the real (unpadded) tokens.

The conformance suites, the accuracy suite and `tools/paths_report.py` state their
tolerances in these three figures.
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
    ours, ref = _real(ours, ref, mask)
    return float((ours - ref).abs().max() / ref.abs().max())


def top1_agreement(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of real positions whose argmax token is the same."""
    ours, ref = _real(ours, ref, mask)
    return float((ours.argmax(-1) == ref.argmax(-1)).float().mean())


def kl_divergence(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean KL(ref || ours) in nats over real positions, from logits."""
    ours, ref = _real(ours, ref, mask)
    log_p, log_q = ref.log_softmax(-1), ours.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
