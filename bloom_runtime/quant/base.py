"""What every quantization scheme declares, so the rest of the package never names one.

A scheme is a module class: its `forward` calls its kernel, `STORED` lists the
tensors a checkpoint holds for it (kinds and split axes, see tensors.py),
`empty_like` builds the skeleton a checkpoint fills, `from_float` makes it from
a float module (with calibration statistics when `calibrated`), and `WEIGHTS` /
`ACTIVATIONS` / `FORMAT` are its compressed-tensors description.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration import ActivationStats
from ..kernels import KernelOwner
from ..tensors import Stored


class Scheme:
    """What every quantized module declares, linears and tied heads alike: its name, how a
    checkpoint stores it, its compressed-tensors description, and the check tensor
    parallelism calls before cutting it."""

    scheme: ClassVar[str]  # the name users pass: --quant / weights quant --scheme
    STORED: ClassVar[dict[str, Stored]]
    FORMAT: ClassVar[str]  # compressed-tensors' name for how the weights are packed
    WEIGHTS: ClassVar[dict[str, Any]]  # compressed-tensors' QuantizationArgs of the weights
    ACTIVATIONS: ClassVar[dict[str, Any] | None] = None  # ... of the inputs; None: left in float
    SMOOTHQUANT_ALPHA: ClassVar[float | None] = None  # SmoothQuant's strength by default; None: off
    calibrated: ClassVar[bool] = False  # made with activation statistics (static scales)
    READ_ELSEWHERE: ClassVar[bool] = True  # transformers + compressed-tensors can run it from a checkpoint
    reduce_absmax = None  # set by parallel.py where per-token scales must span all ranks

    def check_split(self, world: int) -> None:
        """Raise DistributedError if tensor parallelism over `world` ranks cannot cut this module."""


class QuantizedLinear(Scheme, KernelOwner):
    """Base of a scheme's replacement for a block's float `Linear`."""

    split: str | None = None  # copied from the float linear: how tensor parallelism cuts it

    @classmethod
    def empty_like(cls, linear: nn.Module) -> QuantizedLinear:
        """An uninitialised module shaped like the float `linear`, for a checkpoint to fill."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, linear: nn.Module, stats: ActivationStats | None) -> QuantizedLinear:
        """Quantize a float linear (`stats`: its calibrated inputs, when `calibrated`)."""
        raise NotImplementedError


def frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """A stored tensor as a parameter that is never trained (None stays None)."""
    return None if tensor is None else nn.Parameter(tensor, requires_grad=False)
