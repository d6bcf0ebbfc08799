"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

x W^T = (x / s)(W s)^T with s_j = max|x_j|^alpha / max|W_j|^(1-alpha). For the two
projections fed by a LayerNorm (see `Block.smoothable`), 1/s folds into that
LayerNorm's gain and bias, so smoothing costs nothing at run time.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import collect


def smooth_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|x|^alpha / max|W|^(1-alpha)."""
    w_max = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def fold_smoothing(norm: nn.LayerNorm, linear: nn.Module, factors: torch.Tensor) -> None:
    """Divide the LayerNorm's output by `factors` and multiply the linear's inputs by them."""
    f = factors.to(norm.weight.device)
    norm.weight.div_(f.to(norm.weight.dtype))
    norm.bias.div_(f.to(norm.bias.dtype))
    linear.weight.mul_(f.to(linear.weight.dtype)[None, :])


@torch.no_grad()
def smooth(model: nn.Module, alpha: float, calib_ids: torch.Tensor, skip: tuple[int, ...] = ()) -> None:
    """Fold SmoothQuant scales into every block but `skip`, from one calibration pass.

    Skipped when the config puts the residual after the LayerNorm: there the
    LayerNorm's output is also the residual, so its scales cannot move.
    """
    if model.config.apply_residual_connection_post_layernorm:
        return
    pairs = [pair for i, block in enumerate(model.h) if i not in skip for pair in block.smoothable()]
    names = {module: name for name, module in model.named_modules()}
    stats = collect(model, calib_ids, [names[linear] for _, linear in pairs])
    for norm, linear in pairs:
        factors = smooth_factors(stats[names[linear]].channel_absmax, linear.weight, alpha)
        fold_smoothing(norm, linear, factors)
