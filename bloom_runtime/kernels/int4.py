"""Role "w4a16": float activations x group-wise symmetric int4 weights.

The owner gives its int4 values (`int4_values()`: int8 [N, K] in [-8, 7], K whole
groups), their float32 `weight_scale` [N, K / group] and `GROUP`; activations come
padded to K. Candidates: aten's `_weight_int4pack_mm_for_cpu` on weights repacked once
(bfloat16 activations: its other variants are far slower); the native library's
variants, which read the owner's packed words (`weight_packed`, compressed-tensors'
layout) with no second layout; and dequantizing per call into the activations' dtype
(no second layout held; what other devices run).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from .native import NativeKernel, variants_of
from .selection import Kernel, Problem, Role, activations, register

INT4PACK_GROUPS = (32, 64, 128, 256)
BITS = 4


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

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bloom_native.w4a16(x.contiguous(), owner.weight_packed, owner.weight_scale,
                                            owner.GROUP, self.index)


@register
class W4A16(Role):
    name = "w4a16"
    candidates = (Int4Pack, *variants_of(Native, "portable", "avx2", "avx512", "avx512-bf16"), Dequantize)

    @classmethod
    def sample(cls, problem: Problem, rows: int, generator: torch.Generator):
        n, k, group = problem.outputs, problem.inputs, problem.group
        q = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8).to(problem.device)
        scale = (torch.rand(n, k // group, generator=generator) * 0.02 + 1e-3).to(problem.device)
        packed = pack_to_int32(q.cpu(), BITS).to(q.device)
        owner = SimpleNamespace(int4_values=lambda: q, weight_packed=packed, weight_scale=scale, GROUP=group)
        return owner, [(activations(problem, rows, generator),)]

    @classmethod
    def reference(cls, owner, inputs: tuple) -> torch.Tensor:
        (x,) = inputs
        scale = owner.weight_scale.double().repeat_interleave(owner.GROUP, dim=1)
        return x.double() @ (owner.int4_values().double() * scale).t()
