"""Roles "w4a16" (float activations x group-wise symmetric int4 weights) and "w4a8" (int8
activations x the same weights).

The owner gives its int4 values (`int4_values()`: int8 [N, K] in [-8, 7], K whole
groups), their float32 `weight_scale` [N, K / group] and `GROUP`; activations come
padded to K. W4A16's candidates: aten's `_weight_int4pack_mm_for_cpu` on weights repacked
once (bfloat16 activations: its other variants are far slower); the native library's
variants, which read the owner's packed words (`weight_packed`, compressed-tensors'
layout) with no second layout; and dequantizing per call into the activations' dtype
(no second layout held; what other devices run).

W4A8's kernels take per-token int8 activations and their scales as W8A8's do, and the
owner's optional `bias`: the native variants sum each step's int4 x int8 products exactly
in int32 (VNNI's u8 x s8 dot on the unsigned nibbles, or maddubs, which cannot saturate on
nibbles) and scale by the group's; their outer-product form (16 output columns a vector, on
weights laid out in blocks at load in place of the packed words) and the float32 form sum each
group exactly, in int32 and in float GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .int8 import Int8ActivationRole, Int8Input
from .native import NativeKernel, NativeProduct, variants_of
from .selection import Kernel, Problem, Role, activations, register

INT4PACK_GROUPS = (32, 64, 128, 256)
W4A8_MIN_GROUP = 128  # whole steps of every native variant (the widest takes 128 inputs)
BLOCK = 16  # output columns of an outer-product block (variant.h's NB)
BITS = 4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [rows, K] (int8 in [-8, 7]) as compressed-tensors' packed int32 words [rows, K / 8].
    compressed-tensors is imported here, on first use: importing it imports transformers, which was
    2.6 of the 3.7 s that `import bloom_runtime` took (every CLI command's start)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q, BITS)


class Int4Pack(Kernel):
    """Two values a byte as q + 8, with (scale, 0) per group; outputs padded to multiples of 16."""

    name = "int4pack"
    copies = True  # the module keeps its packed words (lookups, state_dict) beside this layout

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        if problem.device != "cpu":
            return "CPU only"
        return None if problem.group in INT4PACK_GROUPS else f"groups of {INT4PACK_GROUPS} only"

    @classmethod
    def tolerance(cls, problem: Problem) -> float:
        return 4 * torch.finfo(torch.bfloat16).eps

    def __init__(self, owner) -> None:
        super().__init__(owner)
        q, scale = owner.int4_values(), owner.weight_scale
        self.group, self.outputs = owner.GROUP, q.shape[0]
        pad = -self.outputs % 16
        q, scale = F.pad(q, (0, 0, 0, pad)), F.pad(scale, (0, 0, 0, pad))
        nibbles = (q.to(torch.int32) + 8).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1),
                             persistent=False)
        pairs = torch.stack([scale, torch.zeros_like(scale)], dim=-1).transpose(0, 1)  # [K / group, N, 2]
        self.register_buffer("scales_and_zeros", pairs.contiguous().to(torch.bfloat16), persistent=False)

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group,
                                                        self.scales_and_zeros)
        return y[:, : self.outputs].to(x.dtype)


class Dequantize(Kernel):
    name = "dequantize"

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        scale = owner.weight_scale.to(x.dtype).repeat_interleave(owner.GROUP, dim=1)
        return F.linear(x, owner.int4_values().to(x.dtype) * scale)


class Native(NativeKernel):
    """Nibbles widened in registers and scaled per group, float32 multiply-adds with the activations
    (avx512-bf16, for bfloat16 activations: nibbles looked up as bfloat16 and paired in vdpbf16ps)."""

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        group = problem.group
        if group < 32 or group & (group - 1):
            return f"groups of a power of two from 32 only, not {group}"
        return super().unsupported(problem)

    def bind(self, owner) -> Callable[..., torch.Tensor]:
        op, index = torch.ops.bloom_native.w4a16.default, self.index
        tensors = (owner.weight_packed, owner.weight_scale, owner.GROUP)
        return lambda x: op(x.contiguous(), *tensors, index)


@register
class W4A16(Role):
    name = "w4a16"
    candidates = (Int4Pack, *variants_of(Native, "portable", "avx2", "avx512", "avx512-bf16"), Dequantize)

    @classmethod
    def sample(cls, problem: Problem, rows: int, generator: torch.Generator):
        return _int4_owner(problem, generator), [(activations(problem, rows, generator),)]

    @classmethod
    def reference(cls, owner, inputs: tuple) -> torch.Tensor:
        (x,) = inputs
        scale = owner.weight_scale.double().repeat_interleave(owner.GROUP, dim=1)
        return x.double() @ (owner.int4_values().double() * scale).t()


def _int4_owner(problem: Problem, generator: torch.Generator) -> SimpleNamespace:
    n, k, group = problem.outputs, problem.inputs, problem.group
    q = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8).to(problem.device)
    scale = (torch.rand(n, k // group, generator=generator) * 0.02 + 1e-3).to(problem.device)
    packed = pack_int4(q.cpu()).to(q.device)
    return SimpleNamespace(int4_values=lambda: q, weight_packed=packed, weight_scale=scale, GROUP=group)


class NativeW4A8(NativeProduct, Int8Input):
    """Unsigned nibbles x int8 activations, exact int32 sums a step, the group's scale per step;
    the token's scale and the bias in the epilogue; float rows quantized per token inside the same
    call."""

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        group = problem.group
        if group < W4A8_MIN_GROUP or group & (group - 1):
            return f"groups of a power of two from {W4A8_MIN_GROUP} only, not {group}"
        return super().unsupported(problem)

    @classmethod
    def tolerance(cls, problem: Problem) -> float:
        return 1e-6  # exact sums a step; float32 across steps

    op, scaled = "w4a8", True

    def operands(self, owner) -> tuple:
        """The packed words, their scales, the group and the owner's bias."""
        return owner.weight_packed, owner.weight_scale, owner.GROUP, owner.bias


class NativeW4A8Tiled(NativeW4A8):
    """The same sums as outer products: 16 output columns a vector, each activation quad broadcast,
    each group's sums exact in int32 and scaled once (variant.h's block_tile), on weights laid out in
    blocks at load with their scales among them (`int4_blocks`), so that one row reads one stream. The
    blocks replace the module's packed words and scales (held once); `state_dict`, and an int4 head's
    lookups, read both back from them."""

    op = "w4a8_tiled"
    drops = ("weight_packed", "weight_scale")

    def __init__(self, owner) -> None:
        super().__init__(owner)
        values = owner.int4_values()
        self.outputs, self.group = values.shape[0], owner.GROUP
        self.register_buffer("blocks", int4_blocks(values, owner.weight_scale, self.group), persistent=False)

    def operands(self, owner) -> tuple:
        """The blocks (the scales among them), the output count, the group and the owner's bias."""
        return self.blocks, self.outputs, self.group, owner.bias

    def values(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The int4 values (int8 in [-8, 7]) of every output row, or of rows `ids`."""
        return block_values(self.blocks, self.outputs, self.group, ids)

    def scales(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 group scales of every output row, or of rows `ids`."""
        return block_scales(self.blocks, self.outputs, self.group, ids)

    def restore(self, name: str) -> torch.Tensor:
        return pack_int4(self.values()) if name == "weight_packed" else self.scales()


def int4_blocks(values: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """int4 values [N, K] (int8 in [-8, 7]) and their float32 scales [N, K / group] as the outer products'
    blocks [ceil(N / 16), K / 8 + K / group, 64] uint8. Block b holds rows 16b .. 16b + 15, group after
    group: the group's group / 8 lines, line p's byte 4c + i holding row 16b + c's inputs 8p + i (low
    nibble) and 8p + 4 + i (high) of the group, each q + 8; then a line of the 16 rows' scales of that
    group (rows past N are zeros, never read back)."""
    n, k = values.shape
    groups, lines, pad = k // group, group // 8, -n % BLOCK
    nibbles = F.pad((values.to(torch.int16) + 8).to(torch.uint8), (0, 0, 0, pad))
    quads = nibbles.view(-1, BLOCK, groups, lines, 2, 4)  # [block, c, g, p, which quad of the line, i]
    weights = (quads[..., 0, :] | (quads[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)  # [block, g, p, c, i]
    scales = F.pad(scale.float(), (0, 0, 0, pad)).view(-1, BLOCK, groups).transpose(1, 2)  # [block, g, c]
    scale_lines = scales.contiguous().view(torch.uint8).view(-1, groups, 1, 4 * BLOCK)
    blocks = torch.cat([weights.reshape(-1, groups, lines, 4 * BLOCK), scale_lines], dim=2)
    return blocks.view(-1, groups * (lines + 1), 4 * BLOCK)


def _group_lines(blocks: torch.Tensor, group: int) -> torch.Tensor:
    """`int4_blocks`'s blocks as [block, g, group / 8 + 1, 64]: each group's lines, its scales last."""
    lines = group // 8
    return blocks.view(blocks.shape[0], -1, lines + 1, 4 * BLOCK)


def block_values(blocks: torch.Tensor, outputs: int, group: int, ids: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """`int4_blocks`'s values back: [outputs, K] (int8), or those of rows `ids` [len(ids), K]."""
    grouped = _group_lines(blocks, group)
    weights = grouped[:, :, :-1].unflatten(-1, (BLOCK, 4))  # [block, g, p, c, i]
    if ids is None:
        rows = weights.permute(0, 3, 1, 2, 4).flatten(2, 3).flatten(0, 1)[:outputs]  # [row, g p, i]
    else:
        rows = weights[ids // BLOCK, :, :, ids % BLOCK].flatten(1, 2)  # [len(ids), g p, i]
    nibbles = torch.stack([rows & 15, rows >> 4], dim=-2)  # [row, line, which quad, i]
    return nibbles.reshape(rows.shape[0], -1).to(torch.int8) - 8


def block_scales(blocks: torch.Tensor, outputs: int, group: int, ids: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """`int4_blocks`'s scales back: [outputs, K / group] (float32), or those of rows `ids`."""
    grouped = _group_lines(blocks, group)
    if ids is None:
        scales = grouped[:, :, -1].contiguous().view(torch.float32)  # [block, g, c]
        return scales.transpose(1, 2).reshape(-1, grouped.shape[1])[:outputs]
    lines = grouped[ids // BLOCK, :, -1].contiguous().view(torch.float32)  # [len(ids), g, c]
    return lines[torch.arange(len(ids), device=ids.device), :, ids % BLOCK]


class Float32W4A8(Int8Input):
    """A float GEMM per group, no integer instruction, so some candidate is correct on any machine
    and device. It sums as the native variants do, so that which kernel the probe picks moves no
    downstream rounding: each group's int4 x int8 products summed exactly (integers below 2^24 are
    exact in float32), then scaled and summed across groups in float32."""

    name = "float32"
    HELD = 2**24  # group sums held at once (64 MiB of float32): prefill rows go in chunks

    @classmethod
    def tolerance(cls, problem: Problem) -> float:
        return 1e-6  # exact sums a group; float32 across groups

    def forward(self, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        values, size = owner.int4_values(), owner.GROUP
        groups = values.shape[1] // size
        weight = values.float().view(-1, groups, size).permute(1, 2, 0)  # [groups, size, N]
        scale = owner.weight_scale.t().unsqueeze(1)  # [groups, 1, N]
        rows = max(1, self.HELD // (groups * values.shape[0]))
        y = torch.cat([(torch.bmm(part.float().view(-1, groups, size).transpose(0, 1), weight) * scale).sum(0)
                       for part in q.split(rows)]) * x_scale
        return (y if owner.bias is None else y + owner.bias.float()).to(out_dtype)


@register
class W4A8(Int8ActivationRole):
    name = "w4a8"
    candidates = (*variants_of(NativeW4A8, "portable", "avx2", "avx512", "avx512-vnni"),
                  *variants_of(NativeW4A8Tiled, "avx2", "avx512", "avx512-vnni", form="tiled"), Float32W4A8)

    @classmethod
    def owner(cls, problem: Problem, generator: torch.Generator) -> SimpleNamespace:
        owner = _int4_owner(problem, generator)
        owner.bias = torch.randn(problem.outputs, generator=generator).to(problem.device, problem.torch_dtype)
        return owner

    @classmethod
    def exact(cls, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        y = W4A16.reference(owner, (q,)) * x_scale.double() + owner.bias.double()
        return y.to(out_dtype).double()  # rounding to out_dtype is the contract, not an error
