"""INT8 schemes: weight-only W8A16, and W8A8 with per-token dynamic, per-tensor static, or
per-tensor static asymmetric activations (the Ascend modelslim recipe).

Weights are int8, symmetric, one scale per output channel. W8A8 multiplies int8
by int8 with exact integer sums (the "w8a8" kernel role: whichever candidate is
exact and fastest on this machine) and rescales once: no float matmul on
dequantized weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import ActivationStats
from ..kernels import KernelOwner, Problem
from ..kernels.int8 import quantize_per_token
from ..model import Linear, TiedEmbedding
from ..tensors import IN, INT, OUT, SCALE, VOCAB, Stored
from .base import QuantizedLinear, Scheme, frozen

CHANNEL_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], float32 scale [out, 1])."""
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def per_token(rows: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Per-token int8 activations left to the W8A8 kernel (no scale given: it quantizes `rows` itself,
    inside its own call where it is native; see kernels.int8.Int8Input)."""
    return rows, None


def int8_problem(role: str, weight: torch.Tensor, dtype: torch.dtype) -> Problem:
    """An int8 weight [N, K] with activations of `dtype` as a "w8a16" or "w8a8" problem."""
    return Problem.of(role, *weight.shape, weight.device, dtype)


def w8a8(owner: KernelOwner, x: torch.Tensor, quantize) -> torch.Tensor:
    """x [..., K] quantized by `quantize` (rows of x's dtype -> int8, scale, in float32 math; or the rows
    and None, `per_token`), through the owner's "w8a8" kernel, in x's dtype."""
    if x.dim() == 2:  # the model's rows, as they are (see KernelOwner.run_rows)
        return owner.run_kernel(x.dtype, *quantize(x), x.dtype)
    q, scale = quantize(x.reshape(-1, x.shape[-1]))
    return owner.run_kernel(x.dtype, q, scale, x.dtype).view(*x.shape[:-1], -1)


class _Int8Weights(QuantizedLinear):
    """int8 weight [out, in] with float32 scales [out, 1] and a float bias, as compressed-tensors
    names them."""

    STORED = {"weight": Stored(INT, (OUT, IN)), "weight_scale": Stored(SCALE, (OUT, None)),
              "bias": Linear.STORED["bias"]}  # fmt: skip
    WEIGHTS = CHANNEL_INT8

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 split: str | None = None) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.weight_scale = frozen(weight_scale.float())
        self.bias = frozen(bias)
        self.split = split

    @classmethod
    def empty_like(cls, linear: nn.Module) -> QuantizedLinear:
        out_f, in_f = linear.weight.shape
        extra = {leaf: torch.empty(1, dtype=torch.int8 if s.kind == INT else torch.float32)
                 for leaf, s in cls.STORED.items() if leaf.startswith("input_")}
        return cls(torch.empty(out_f, in_f, dtype=torch.int8), torch.empty(out_f, 1), linear.bias,
                   split=linear.split, **extra)

    @classmethod
    def from_float(cls, linear: nn.Module, stats: ActivationStats | None) -> QuantizedLinear:
        return cls(*quantize_weight(linear.weight), linear.bias, split=linear.split)



class Int8WeightOnlyLinear(_Int8Weights):
    """W8A16: y = x (q * scale)^T + b with the weight kept in int8 (the "w8a16" kernel role)."""

    scheme = "w8a16"
    FORMAT = "int-quantized"  # int8 `weight` + `weight_scale`, as compressed-tensors reads weight-only int8

    def kernel_problem(self, dtype: torch.dtype) -> Problem:
        return int8_problem("w8a16", self.weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.run_rows(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Linear(_Int8Weights):
    """W8A8 with per-token dynamic activation scales, computed at run time.

    `reduce_absmax`, when set (by parallel.py on row-parallel ranks, which each see
    a slice of a token), makes the scales span the whole token, so tensor-parallel
    runs quantize exactly as a single device does.
    """

    scheme = "w8a8"
    FORMAT = "int-quantized"
    ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    SMOOTHQUANT_ALPHA = 0.5

    def kernel_problem(self, dtype: torch.dtype) -> Problem:
        return int8_problem("w8a8", self.weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8(self, x, self._quantize_input)

    def _quantize_input(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.reduce_absmax is None:
            return per_token(flat)
        return quantize_per_token(flat, self.reduce_absmax)

    def forwards_rows_as_is(self) -> bool:
        return self.reduce_absmax is None  # per_token: the rows go to the kernel as they are

    @property
    def zero_point(self) -> int:
        """The activations' integer zero point, which the kernel subtracts (0: symmetric)."""
        return 0


class Int8StaticLinear(Int8Linear):
    """W8A8 with one calibrated activation scale per tensor (`input_scale`)."""

    scheme = "w8a8-static"
    calibrated = True
    STORED = {**_Int8Weights.STORED, "input_scale": Stored(SCALE, (None,))}
    ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor, split: str | None = None) -> None:
        super().__init__(weight, weight_scale, bias, split)
        self.input_scale = frozen(input_scale.float())

    @classmethod
    def from_float(cls, linear: nn.Module, stats: ActivationStats | None) -> QuantizedLinear:
        scale = torch.maximum(stats.low.abs(), stats.high.abs()).clamp(min=1e-8) / 127.0
        return cls(*quantize_weight(linear.weight), linear.bias, scale.reshape(1), split=linear.split)

    def _quantize_input(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.round(flat.float() / self.input_scale).clamp(-128, 127).to(torch.int8), self.input_scale

    def forwards_rows_as_is(self) -> bool:
        return False  # quantized here with the calibrated scale


class Int8StaticAsymLinear(Int8StaticLinear):
    """W8A8 with one calibrated asymmetric scale and int8 zero point per tensor (modelslim)."""

    scheme = "w8a8-static-asym"
    STORED = {**Int8StaticLinear.STORED, "input_zero_point": Stored(INT, (None,))}
    ACTIVATIONS = {**Int8StaticLinear.ACTIVATIONS, "symmetric": False}

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor, input_zero_point: torch.Tensor, split: str | None = None) -> None:
        super().__init__(weight, weight_scale, bias, input_scale, split)
        self.input_zero_point = frozen(input_zero_point)

    @classmethod
    def from_float(cls, linear: nn.Module, stats: ActivationStats | None) -> QuantizedLinear:
        low, high = torch.clamp(stats.low, max=0.0), torch.clamp(stats.high, min=0.0)
        scale = (high - low).clamp(min=1e-8) / 255.0
        zero_point = (-128 - torch.round(low / scale)).clamp(-128, 127).to(torch.int8)
        return cls(*quantize_weight(linear.weight), linear.bias, scale.reshape(1), zero_point.reshape(1),
                   split=linear.split)

    def _quantize_input(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(flat.float() / self.input_scale) + self.input_zero_point.float()
        return q.clamp(-128, 127).to(torch.int8), self.input_scale

    @property
    def zero_point(self) -> int:
        return int(self.input_zero_point)


class Int8TiedEmbedding(Scheme, TiedEmbedding):
    """The tied embedding/head in weight-only int8, one scale per vocabulary row.

    The head is the largest matrix a decode step reads, so int8 halves (bf16) or
    quarters (fp32) its cost; lookups dequantize just the rows they take.
    """

    scheme = "w8a16"
    STORED = {"weight": Stored(INT, (VOCAB, None)), "weight_scale": Stored(SCALE, (VOCAB, None))}
    FORMAT = "int-quantized"
    WEIGHTS = CHANNEL_INT8
    ACTIVATIONS: dict | None = None  # of the head; lookups never quantize their input
    KEEPS = ("weight",)  # lookups read the int8 rows: oneDNN's packed head holds its layout beside them

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # not TiedEmbedding's: it would allocate a float table
        self.weight = frozen(weight)
        self.weight_scale = frozen(weight_scale)
        self.compute_dtype = compute_dtype  # what looked-up rows dequantize to

    @classmethod
    def empty_like(cls, embedding: TiedEmbedding, dtype: torch.dtype) -> Int8TiedEmbedding:
        rows, hidden = embedding.weight.shape
        return cls(torch.empty(rows, hidden, dtype=torch.int8), torch.empty(rows, 1), dtype)

    @classmethod
    def from_float(cls, embedding: TiedEmbedding, dtype: torch.dtype) -> Int8TiedEmbedding:
        return cls(*quantize_weight(embedding.weight), dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input_ids).to(self.compute_dtype)
        return rows * nn.functional.embedding(input_ids, self.weight_scale).to(self.compute_dtype)

    def kernel_problem(self, dtype: torch.dtype) -> Problem:
        return int8_problem("w8a16", self.weight, dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_rows(x)


class Int8DynamicTiedEmbedding(Int8TiedEmbedding):
    """The tied embedding/head for W8A8: int8 rows as for W8A16, and a head that multiplies
    per-token int8 activations by them on the int8 GEMM (as CTranslate2's int8 head does).

    The head is the largest matrix a decode step reads: on bloom-560m it is 257 MB in
    int8 against 1 GB in float32, 10 ms a step on oneDNN against 34 ms.
    """

    scheme = "w8a8"
    ACTIVATIONS = Int8Linear.ACTIVATIONS
    zero_point = 0

    def kernel_problem(self, dtype: torch.dtype) -> Problem:
        return int8_problem("w8a8", self.weight, dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8(self, x, per_token)
