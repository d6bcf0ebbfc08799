"""INT4 weights: W4A16 (group-wise symmetric int4 weights, 16-bit activations) and W4A8 (the
same weights, per-token dynamic int8 activations).

Each group of `GROUP` input channels of an output row has its own scale:
w = q * scale, q in [-8, 7], scale = |max| / 7.5 as compressed-tensors computes
it. Symmetric, because that is the form transformers with compressed-tensors 0.20
loads (it cannot read an asymmetric group's packed zero point back) and the one
llm-compressor's W4A16 preset writes; the int4 kernels run it with a zero offset.

A checkpoint holds compressed-tensors' pack-quantized form: `weight_packed` (int32
words, eight values each, along the input), `weight_scale` [out, in / GROUP], and
`weight_shape` (written by compressed_tensors.py). A width that is not a multiple
of the group (the embedded model's 144) is padded with zero weights to whole
groups, and its activations with zeros at run time; such a layer runs and
quantizes on load, but compressed-tensors cannot store it, so writing one is refused.

W4A8 is compressed-tensors' W4A8 preset: W4A16's weights, with each token's activations
quantized to int8 at run time as W8A8's are, so that a decode step multiplies int4 by
int8 (as llama.cpp's Q4_0 x Q8_0 does) instead of converting every nibble to float.
Its cost in accuracy is the accuracy suite's w4a8 rows, beside w4a16's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import ActivationStats
from ..errors import DistributedError, InputError
from ..kernels import Problem
from ..kernels.int4 import BITS, pack_int4
from ..model import Linear, TiedEmbedding
from ..tensors import IN, INT, OUT, SCALE, VOCAB, Stored
from .base import QuantizedLinear, Scheme, frozen
from .int8 import Int8Linear, w8a8

PER_WORD = 32 // BITS  # int4 values in one int32
GROUP_WEIGHTS = {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}


def padded_width(width: int, group: int) -> int:
    """`width` rounded up to whole groups."""
    return width + (-width % group)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group of `group` inputs: (q int8 [N, K'] in [-8, 7], float32 scale
    [N, K' / group]), K' the width padded with zero weights to whole groups."""
    rows, width = weight.shape
    w = F.pad(weight.float(), (0, padded_width(width, group) - width)).view(rows, -1, group)
    scale = w.abs().amax(-1).clamp(min=1e-8) / 7.5
    q = torch.round(w / scale[..., None]).clamp(-8, 7)
    return q.view(rows, -1).to(torch.int8), scale


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """q int8 [rows, words * 8] from compressed-tensors' packed int32 words [rows, words], on their
    device (the int4 head unpacks the rows it looks up at every step: no host round trip).
    compressed-tensors is imported on first use, as in `pack_int4`."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    rows, words = packed.shape
    return unpack_from_int32(packed, BITS, torch.Size((rows, words * PER_WORD)))


class Int4Weights(Scheme):
    """What the int4 linears and heads share: packed words and group scales, the kernel role they
    pose ("w4a16", or "w4a8" where activations are int8), and their compressed-tensors description."""

    GROUP = 128
    ROLE = "w4a16"
    FORMAT = "pack-quantized"
    WEIGHTS = {**GROUP_WEIGHTS, "group_size": GROUP}
    in_features: int
    weight_packed: nn.Parameter
    weight_scale: nn.Parameter

    def int4_values(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """q int8 [N, K'] in [-8, 7], K' the padded width (what the kernels are built from), or the rows
        `ids` of it: from the packed words, or from the kernel that took them over (held once)."""
        if "weight_packed" not in self._parameters:
            return self.taken_by("weight_packed").values(ids)
        return unpack(self.weight_packed if ids is None else F.embedding(ids, self.weight_packed))

    def int4_scales(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 group scales [N, K' / GROUP], or the rows `ids` of them: the module's own, or those of
        the kernel that took them over (held once, beside the values they scale)."""
        if "weight_scale" not in self._parameters:
            return self.taken_by("weight_scale").scales(ids)
        return self.weight_scale if ids is None else F.embedding(ids, self.weight_scale)

    def kernel_problem(self, dtype: torch.dtype) -> Problem:
        scale = self.int4_scales()
        rows, groups = scale.shape
        return Problem.of(self.ROLE, rows, groups * self.GROUP, scale.device, dtype, group=self.GROUP)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ w^T in x's dtype."""
        return self.run_rows(self.padded(x))

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] padded with zeros to whole groups, the packed width (zeros leave a token's int8 scale as
        it was). Found from x alone: reading the module's scales costs a us, four times a layer."""
        rest = x.shape[-1] % self.GROUP
        return F.pad(x, (0, self.GROUP - rest)) if rest else x

    def check_storable(self, name: str) -> None:
        """compressed-tensors stores whole groups only."""
        if self.in_features % self.GROUP:
            raise InputError(f"{name}: input width {self.in_features} is not a multiple of int4 group "
                             f"{self.GROUP}; compressed-tensors cannot store it (quantize on load instead)")


class Int4WeightOnlyLinear(Int4Weights, QuantizedLinear):
    """W4A16 with groups of 128 inputs (`w4a16-g64`, `w4a16-g32`: smaller groups, more
    scales, closer to float)."""

    scheme = "w4a16"
    STORED = {"weight_packed": Stored(INT, (OUT, IN)), "weight_scale": Stored(SCALE, (OUT, IN)),
              "bias": Linear.STORED["bias"]}  # fmt: skip

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, split: str | None = None) -> None:
        super().__init__()
        self.weight_packed = frozen(weight_packed)
        self.weight_scale = frozen(weight_scale.float())
        self.bias = frozen(bias)
        self.in_features, self.split = in_features, split  # the float layer's width, before any cut

    @classmethod
    def empty_like(cls, linear: nn.Module) -> QuantizedLinear:
        rows, width = linear.weight.shape
        padded = padded_width(width, cls.GROUP)
        return cls(torch.empty(rows, padded // PER_WORD, dtype=torch.int32),
                   torch.empty(rows, padded // cls.GROUP), linear.bias, width, split=linear.split)

    @classmethod
    def from_float(cls, linear: nn.Module, stats: ActivationStats | None) -> QuantizedLinear:
        q, scale = quantize_int4(linear.weight, cls.GROUP)
        return cls(pack_int4(q), scale, linear.bias, linear.weight.shape[1], split=linear.split)

    def check_split(self, world: int) -> None:
        """A row-parallel cut must fall on group boundaries of the real inputs."""
        if self.split == "row" and self.in_features % (world * self.GROUP):
            raise DistributedError(f"tp={world} cuts {self.in_features} inputs into parts that are not "
                                   f"whole int4 groups of {self.GROUP} ({self.scheme})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4TiedEmbedding(Int4Weights, TiedEmbedding):
    """The tied embedding/head in int4 groups: on bloom-560m the head is 250880 x 1024, more
    weights than all 24 blocks, so W4A16 without it would still read an 8-bit or 16-bit
    head every step. Lookups unpack and scale just the rows they take."""

    scheme = "w4a16"
    STORED = {"weight_packed": Stored(INT, (VOCAB, None)), "weight_scale": Stored(SCALE, (VOCAB, None))}
    ACTIVATIONS: dict | None = None
    READ_ELSEWHERE = False  # transformers 5.24 runs no packed Embedding (it has no `weight`)
    bias = None  # the head has none (W4A8's kernels add their owner's)

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, in_features: int,
                 compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # not TiedEmbedding's: it would allocate a float table
        self.weight_packed = frozen(weight_packed)
        self.weight_scale = frozen(weight_scale.float())
        self.in_features, self.compute_dtype = in_features, compute_dtype

    @classmethod
    def empty_like(cls, embedding: TiedEmbedding, dtype: torch.dtype) -> Int4TiedEmbedding:
        rows, width = embedding.weight.shape
        padded = padded_width(width, cls.GROUP)
        return cls(torch.empty(rows, padded // PER_WORD, dtype=torch.int32),
                   torch.empty(rows, padded // cls.GROUP), width, dtype)

    @classmethod
    def from_float(cls, embedding: TiedEmbedding, dtype: torch.dtype) -> Int4TiedEmbedding:
        q, scale = quantize_int4(embedding.weight, cls.GROUP)
        return cls(pack_int4(q), scale, embedding.weight.shape[1], dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        q = self.int4_values(input_ids.reshape(-1))
        scale = self.int4_scales(input_ids.reshape(-1)).repeat_interleave(self.GROUP, dim=1)
        rows = (q.float() * scale)[:, : self.in_features]
        return rows.to(self.compute_dtype).view(*input_ids.shape, -1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


def with_group(cls: type, group: int) -> type:
    """`cls` with groups of `group` inputs, named `<scheme>-g<group>`."""
    return type(f"{cls.__name__}G{group}", (cls,), {
        "scheme": f"{cls.scheme}-g{group}", "GROUP": group, "WEIGHTS": {**cls.WEIGHTS, "group_size": group}})


class Int8Activations:
    """W4A8's difference from W4A16: each token's activations quantized to int8 (W8A8's per-token
    scales, spanning all ranks under tensor parallelism) and multiplied by the int4 weights in the
    "w4a8" role, whose kernels add the bias."""

    scheme = "w4a8"
    ROLE = "w4a8"
    ACTIVATIONS = Int8Linear.ACTIVATIONS
    # No SmoothQuant by default: it moves the activations' range into weights that int4 rounds
    # coarsely (embedded model, int4 head: KL to float32 0.056 with alpha 0.5, 0.050 without,
    # W4A16's own 0.051). So W4A8's weights are W4A16's.
    SMOOTHQUANT_ALPHA = None

    _quantize_input = Int8Linear._quantize_input

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8(self, self.padded(x), self._quantize_input)


class Int4Int8Linear(Int8Activations, Int4WeightOnlyLinear):
    """W4A8: W4A16's int4 groups of 128 with per-token dynamic int8 activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)  # the kernel added the bias

    def forwards_rows_as_is(self) -> bool:
        return self.reduce_absmax is None and self.in_features % self.GROUP == 0  # not padded


class Int4Int8TiedEmbedding(Int8Activations, Int4TiedEmbedding):
    """W4A16's int4 head with the final hidden state quantized per token, as W8A8's head does."""


LINEARS = [Int4WeightOnlyLinear, *(with_group(Int4WeightOnlyLinear, g) for g in (64, 32)), Int4Int8Linear]
HEADS = [Int4TiedEmbedding, *(with_group(Int4TiedEmbedding, g) for g in (64, 32)), Int4Int8TiedEmbedding]
