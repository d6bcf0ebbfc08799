"""Role "w4a16": float activations x group-wise symmetric int4 weights.

The owner gives its int4 values (`int4_values()`: int8 [N, K] in [-8, 7], K whole
groups), their float32 `weight_scale` [N, K / group] and `GROUP`; activations come
padded to K. Candidates: aten's `_weight_int4pack_mm_for_cpu` on weights repacked once
(bfloat16 activations: its other variants are far slower), and dequantizing per call
into the activations' dtype (no second layout held; what other devices run).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .selection import Kernel, Problem, Role, activations, register

INT4PACK_GROUPS = (32, 64, 128, 256)


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


@register
class W4A16(Role):
    name = "w4a16"
    candidates = (Int4Pack, Dequantize)

    @classmethod
    def sample(cls, problem: Problem, rows: int, generator: torch.Generator):
        n, k, group = problem.outputs, problem.inputs, problem.group
        q = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8).to(problem.device)
        scale = (torch.rand(n, k // group, generator=generator) * 0.02 + 1e-3).to(problem.device)
        owner = SimpleNamespace(int4_values=lambda: q, weight_scale=scale, GROUP=group)
        return owner, [(activations(problem, rows, generator),)]

    @classmethod
    def reference(cls, owner, inputs: tuple) -> torch.Tensor:
        (x,) = inputs
        scale = owner.weight_scale.double().repeat_interleave(owner.GROUP, dim=1)
        return x.double() @ (owner.int4_values().double() * scale).t()
