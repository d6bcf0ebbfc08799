"""Role "dense16": a float linear in bfloat16 or float16, y = x @ w^T + b.

Candidates: `F.linear` on the plain weight; oneDNN's matmul on the weight reordered
once into its blocked layout (it raises where the CPU lacks 16-bit instructions,
e.g. bfloat16 on AVX2); the native library's row variants, which read the plain weight
and stream it at the memory's pace for few rows; its bfloat16 outer products
(AVX512_BF16), on blocks laid out at load in place of the weight, which give a tied
head's lookups their rows back; and float32 arithmetic on the 16-bit weight (converted per call: storage stays
16-bit), which wins where 16-bit GEMMs are emulated.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .native import NativeProduct, variants_of
from .outer import OuterBlocked
from .selection import Kernel, Problem, Role, activations, register


def _mkldnn() -> bool:
    return torch.backends.mkldnn.is_available()


class Plain(Kernel):
    name = "plain"

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, owner.weight, owner.bias)


class Float32(Kernel):
    """Each call converts the weight to float32: a GEMM with native float32 arithmetic."""

    name = "float32"

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        bias = None if owner.bias is None else owner.bias.float()
        return F.linear(x.float(), owner.weight.float(), bias).to(x.dtype)


class OneDnnPacked(Kernel):
    """oneDNN's matmul on the weight reordered once (the owner's plain weight is dropped)."""

    name = "onednn-packed"
    drops = ("weight",)

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        return None if problem.device == "cpu" and _mkldnn() else "needs oneDNN on CPU"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(owner.weight.detach(), 1),
                             persistent=False)

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, owner.bias, "none", [], "")

    def restore(self, name: str) -> torch.Tensor:
        return self.packed.to_dense()


class Native(NativeProduct):
    """bfloat16 weights widened to float32 (or paired in vdpbf16ps: avx512-bf16), float16 ones by
    F16C; float32 sums, the bias added once, rounded once to the activations' dtype."""

    op = "dense16"

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        if problem.dtype == "float16" and cls.variant in ("portable", "avx512-bf16"):
            return "float16 runs in the avx2 and avx512 variants"  # none, or the same code again
        return super().unsupported(problem)

    def operands(self, owner) -> tuple:
        return owner.weight, owner.bias


class NativeTiled(OuterBlocked, Native):
    """bfloat16 outer products: 16 output columns a vector, each activation pair broadcast, no
    horizontal sums (variant.h's `outer`), on the weight's blocks (outer.py)."""

    op = "dense16_tiled"

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        return "bfloat16 only" if problem.dtype != "bfloat16" else super().unsupported(problem)

    def operands(self, owner) -> tuple:
        return self.blocks, self.outputs, owner.bias


@register
class Dense16(Role):
    name = "dense16"
    candidates = (OneDnnPacked, *variants_of(Native, "portable", "avx2", "avx512", "avx512-bf16"),
                  *variants_of(NativeTiled, "avx512-bf16", form="tiled"), Plain, Float32)

    @classmethod
    def sample(cls, problem: Problem, rows: int, generator: torch.Generator):
        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(problem.device, problem.torch_dtype)

        n, k = problem.outputs, problem.inputs
        owner = SimpleNamespace(weight=randn(n, k) * 0.05, bias=randn(n))
        return owner, [(activations(problem, rows, generator),)]

    @classmethod
    def reference(cls, owner, inputs: tuple) -> torch.Tensor:
        (x,) = inputs
        return x.double() @ owner.weight.double().t() + owner.bias.double()
