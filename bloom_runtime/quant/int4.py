"""INT4 weight-only (W4A16): group-wise asymmetric int4 weights, 16-bit activations.

Each group of `GROUP` input channels of an output row has its own scale and
zero point: w = (q - zero_point) * scale, with q and zero_point in [-8, 7]. A
checkpoint holds them in compressed-tensors' pack-quantized form (`weight_packed`:
eight values per int32 along the input; `weight_scale` and int8 `weight_zero_point`
one per group; `weight_shape`, written by compressed_tensors.py), which is what
transformers with compressed-tensors 0.20 loads. On first use the
weights are repacked once for aten's int4 kernel (`kernels.Int4Weights`).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from torch import nn

from ..calibration import ActivationStats
from ..kernels import Int4Weights
from ..model import Linear
from ..tensors import IN, INT, OUT, SCALE, Stored
from .base import QuantizedLinear, frozen

PER_WORD = 8  # int4 values in one int32


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group` inputs: (q int8 [N, K], scale float32 [N, K/group],
    zero_point int8 [N, K/group]), all in [-8, 7]. Each group's range includes 0, so its zero
    point is a whole number in range and zero stays exact."""
    rows, width = weight.shape
    if width % group:
        raise ValueError(f"input width {width} is not a multiple of the int4 group size {group}")
    w = weight.float().view(rows, width // group, group)
    low, high = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
    scale = ((high - low) / 15.0).clamp(min=1e-8)
    zero_point = (torch.round(-low / scale) - 8).clamp(-8, 7)
    q = (torch.round(w / scale[..., None]) + zero_point[..., None]).clamp(-8, 7)
    return q.view(rows, width).to(torch.int8), scale, zero_point.to(torch.int8)


class Int4WeightOnlyLinear(QuantizedLinear):
    """W4A16 with groups of 128 inputs (`w4a16-g64` and `w4a16-g32`: smaller groups, more
    scales, closer to float)."""

    scheme = "w4a16"
    GROUP = 128
    FORMAT = "pack-quantized"
    STORED = {"weight_packed": Stored(INT, (OUT, IN)), "weight_scale": Stored(SCALE, (OUT, IN)),
              "weight_zero_point": Stored(INT, (OUT, IN)), "bias": Linear.STORED["bias"]}  # fmt: skip
    WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP,
               "dynamic": False}  # fmt: skip
    _kernel: Int4Weights | None = None

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor, bias: torch.Tensor | None, split: str | None = None) -> None:
        super().__init__()
        self.weight_packed = frozen(weight_packed)
        self.weight_scale = frozen(weight_scale.float())
        self.weight_zero_point = frozen(weight_zero_point)
        self.bias = frozen(bias)
        self.split = split

    @classmethod
    def empty_like(cls, linear: nn.Module) -> QuantizedLinear:
        rows, width = linear.weight.shape
        groups = width // cls.GROUP
        return cls(torch.empty(rows, width // PER_WORD, dtype=torch.int32), torch.empty(rows, groups),
                   torch.empty(rows, groups, dtype=torch.int8), linear.bias, split=linear.split)

    @classmethod
    def from_float(cls, linear: nn.Module, stats: ActivationStats | None) -> QuantizedLinear:
        q, scale, zero_point = quantize_int4(linear.weight, cls.GROUP)
        return cls(pack_to_int32(q, 4), scale, zero_point, linear.bias, split=linear.split)

    def unpacked(self) -> torch.Tensor:
        """q int8 [N, K] from the packed words."""
        rows, words = self.weight_packed.shape
        return unpack_from_int32(self.weight_packed.cpu(), 4, torch.Size((rows, words * PER_WORD)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:  # on first use: checkpoints assign the weights after construction
            self._kernel = Int4Weights(self.unpacked(), self.weight_scale.cpu(), self.weight_zero_point.cpu(),
                                       self.GROUP, self.weight_scale.device)
        y = self._kernel(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4WeightOnlyLinearG64(Int4WeightOnlyLinear):
    scheme = "w4a16-g64"
    GROUP = 64
    WEIGHTS = {**Int4WeightOnlyLinear.WEIGHTS, "group_size": GROUP}


class Int4WeightOnlyLinearG32(Int4WeightOnlyLinear):
    scheme = "w4a16-g32"
    GROUP = 32
    WEIGHTS = {**Int4WeightOnlyLinear.WEIGHTS, "group_size": GROUP}
