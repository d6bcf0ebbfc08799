"""Applying a `QuantSpec` to a float model: smooth, calibrate, swap in the scheme's modules.

The same swap, with empty modules, gives the skeleton a quantized checkpoint fills.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import collect
from ..errors import InputError
from .schemes import HEADS
from .smoothquant import smooth
from .spec import QuantSpec


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, calib_ids: torch.Tensor | None) -> None:
    """Quantize `model` in place as `spec` says (`calib_ids` [N, S] when it needs calibration)."""
    targets = spec.targets(model)
    if spec.needs_calibration and calib_ids is None:
        raise InputError(f"{spec}: needs calibration data")
    if spec.smooths:
        smooth(model, spec.alpha, calib_ids, skip=spec.float_layers)
    stats = collect(model, calib_ids, list(targets)) if spec.linear_class.calibrated else {}
    cls = spec.linear_class
    _swap(model, {name: cls.from_float(linear, stats.get(name)) for name, linear in targets.items()})
    if spec.head is not None:
        embedding = model.word_embeddings
        model.word_embeddings = HEADS[spec.head].from_float(embedding, embedding.weight.dtype)


def quantized_skeleton(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> None:
    """Swap in `spec`'s modules, empty, shaped as the float ones (for a checkpoint to fill)."""
    cls = spec.linear_class
    _swap(model, {name: cls.empty_like(linear) for name, linear in spec.targets(model).items()})
    if spec.head is not None:
        model.word_embeddings = HEADS[spec.head].empty_like(model.word_embeddings, dtype)


def _swap(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for name, module in replacements.items():
        model.set_submodule(name, module)
