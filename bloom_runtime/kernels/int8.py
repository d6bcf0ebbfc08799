"""Roles "w8a16" (float activations x int8 weights) and "w8a8" (int8 x int8, exact sums).

The owner holds an int8 `weight` [N, K] with float32 `weight_scale` [N, 1] and an
optional float `bias`; W8A8 owners also say their activations' `zero_point`.

W8A8's candidates all promise exact integer sums; they differ in how. oneDNN's
u8 x s8 GEMM takes activations shifted to uint8 (q + 128); CPUs with VNNI or AMX
sum its products in 32 bits, but AVX2 without VNNI adds pairs of products in 16
bits (vpmaddubsw), which saturate for uint8 inputs above 127. The split form
feeds the same GEMM q = 2h + l as two 7-bit halves (h + 64 and l + 64, all <= 127)
stacked in one call, so no pair sum can saturate and the weights are read once.
`torch._int_mm` lowers to oneDNN on CPU too (and saturates alike where oneDNN runs
AVX2 kernels). The native library's variants sum exactly on every ISA: VNNI's
u8 x s8 dot on q + 128 (the weight rows' sums take the 128 back out), and elsewhere
int8 widened to int16 and pairs summed in 32 bits (vpmaddwd), which cannot saturate.
Float32 sums are the last resort. The probe keeps those that are exact here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .native import NativeKernel, NativeProduct, variants_of, widest_variant
from .outer import OuterBlocked
from .selection import Kernel, Problem, Role, activations, register

# torch 2.13's int8pack CPU kernel segfaults on a weight that does not start on a 16-byte boundary
# (seen at 144 rows of 512 x 128, and at 1 row of 1001 x 128): tensors memory-mapped from a
# checkpoint may start anywhere
ALIGNMENT = 16


def quantize_per_token(rows: torch.Tensor, reduce_absmax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows of `rows` [M, K] (any float dtype, float32 math) with one scale per row
    [M, 1] (`reduce_absmax` widens each row's |max| over tensor-parallel ranks). On CPU, the native
    library does it in one pass over each row where it is built: the same numbers, bit for bit."""
    variant = widest_variant() if reduce_absmax is None and rows.device.type == "cpu" else None
    if variant is not None:
        return torch.ops.bloom_native.quantize_rows(rows, variant)
    return quantize_per_token_in_torch(rows, reduce_absmax)


def quantize_per_token_in_torch(rows: torch.Tensor, reduce_absmax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token` in torch's ops: the definition the native one-pass form must equal."""
    flat = rows.float()
    absmax = flat.abs().amax(dim=1, keepdim=True)  # 6x faster than vector_norm(inf) at 8 rows
    if reduce_absmax is not None:
        absmax = reduce_absmax(absmax)
    scale = absmax.clamp(min=1e-8) / 127.0
    return torch.round(flat / scale).clamp(-128, 127).to(torch.int8), scale


class Int8Pack(Kernel):
    """aten's int8 weight-pack matrix-vector kernel, 16-bit activations (float32 rounds to
    bfloat16 there: its float32 variant is far slower, as the probe's timings show)."""

    name = "int8pack"

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        if problem.device != "cpu":
            return "CPU only"
        if problem.dtype in ("bfloat16", "float32") and problem.inputs % 16:
            # torch 2.13's bfloat16 CPU kernel segfaults on such widths (seen at K=72): a crash
            # kills the process, so no probe may run it
            return f"input width {problem.inputs} is not a multiple of 16 (the kernel crashes)"
        return None

    @classmethod
    def tolerance(cls, problem: Problem) -> float:
        return 4 * torch.finfo(torch.bfloat16 if problem.dtype == "float32" else problem.torch_dtype).eps

    def __init__(self, owner) -> None:
        super().__init__(owner)
        if owner.weight.data_ptr() % ALIGNMENT:  # checkpoint.read_state aligns what it loads
            raise ValueError(f"int8pack needs a weight aligned to {ALIGNMENT} bytes (it segfaults on others)")

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        act = x.to(torch.bfloat16) if x.dtype == torch.float32 else x
        y = torch.ops.aten._weight_int8pack_mm(act, owner.weight, owner.weight_scale.view(-1).to(act.dtype))
        return y.to(x.dtype)


class Dequantize(Kernel):
    """The int8 weight converted to the activations' dtype per call, then a float GEMM."""

    name = "dequantize"

    def forward(self, owner, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, owner.weight.to(x.dtype)) * owner.weight_scale.view(-1).to(x.dtype)


class NativeW8A16(NativeKernel):
    """int8 weights widened to float32 in registers, float32 sums, the channel scale once."""

    def bind(self, owner) -> Callable[..., torch.Tensor]:
        op, index = torch.ops.bloom_native.w8a16.default, self.index
        weight, scale = owner.weight, owner.weight_scale.view(-1)
        return lambda x: op(x.contiguous(), weight, scale, index)


@register
class W8A16(Role):
    name = "w8a16"
    candidates = (Int8Pack, *variants_of(NativeW8A16, "portable", "avx2", "avx512"), Dequantize)

    @classmethod
    def sample(cls, problem: Problem, rows: int, generator: torch.Generator):
        return _int8_owner(problem, generator), [(activations(problem, rows, generator),)]

    @classmethod
    def reference(cls, owner, inputs: tuple) -> torch.Tensor:
        (x,) = inputs
        return x.double() @ (owner.weight.double() * owner.weight_scale.double()).t()


def _int8_owner(problem: Problem, generator: torch.Generator, zero_point: int = 0) -> SimpleNamespace:
    n, k = problem.outputs, problem.inputs
    weight = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=generator) * 1e-3 + 1e-4
    bias = torch.randn(n, generator=generator).to(problem.torch_dtype)
    return SimpleNamespace(weight=weight.to(problem.device), weight_scale=scale.to(problem.device),
                           bias=bias.to(problem.device), zero_point=zero_point)


class Int8Input(Kernel):
    """A kernel fed int8 activations, `forward(owner, q, x_scale, out_dtype)` (the W8A8 and W4A8
    roles). Its bound call also takes float rows with x_scale None, meaning per-token scales:
    it quantizes them first (`quantize_per_token`), where the native kernels do it inside their own
    call, in one pass over each row."""

    def bind(self, owner) -> Callable[..., torch.Tensor]:
        forward = functools.partial(self.forward, owner)

        def call(q: torch.Tensor, x_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
            if x_scale is None:
                q, x_scale = quantize_per_token(q)
            return forward(q, x_scale, out_dtype)
        return call


class _Int8Gemm(Int8Input):
    """What the W8A8 kernels share: `kernel(owner, q, x_scale, out_dtype)` is
    ((q - zero_point) @ w^T) * weight_scale * x_scale + bias, rounded once to `out_dtype`, for
    int8 q [M, K] and x_scale [M, 1] (per row) or one number (per tensor)."""

    @classmethod
    def tolerance(cls, problem: Problem) -> float:
        return 1e-6  # exact integer sums; float32 scaling

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.zero_point = int(owner.zero_point)
        scale = owner.weight_scale.reshape(-1).float().contiguous()
        self.register_buffer("weight_scale", scale, persistent=False)
        bias = None if owner.bias is None else owner.bias.float()
        self.register_buffer("bias", bias, persistent=False)

    def epilogue(self, y: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Sums already scaled by the weight's scales [M, N] -> times x_scale, biased, in `out_dtype`
        (one fused multiply-add)."""
        y = y * x_scale if self.bias is None else torch.addcmul(self.bias, y, x_scale)
        return y.to(out_dtype)


class IntMM(_Int8Gemm):
    """`torch._int_mm` on the plain weight (CUDA wants more than 16 rows: small calls are padded)."""

    name = "int_mm"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        rows = owner.weight.sum(dim=1, dtype=torch.int32) if self.zero_point else None
        self.register_buffer("row_sums", rows, persistent=False)

    def forward(self, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        m = q.shape[0]
        padded = F.pad(q, (0, 0, 0, 17 - m)) if q.device.type == "cuda" and m <= 16 else q
        acc = torch._int_mm(padded, owner.weight.t())[:m]
        if self.zero_point:
            acc = acc - self.zero_point * self.row_sums
        return self.epilogue(acc.float() * self.weight_scale, x_scale, out_dtype)


class Float32Sums(_Int8Gemm):
    """The integers as float32, a float GEMM: products of int8 are exact in float32 and the sums
    round only past 2^24 (relative 6e-8). Slow (the weight is converted per call), but it needs
    no integer instruction, so some candidate is correct on any machine."""

    name = "float32"

    def forward(self, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        acc = F.linear(q.float() - self.zero_point, owner.weight.float())
        return self.epilogue(acc * self.weight_scale, x_scale, out_dtype)


class _OneDnn(_Int8Gemm):
    """oneDNN's int8 GEMM (`onednn::qlinear_pointwise`, what PyTorch's x86 int8 inference lowers
    to) on the weight prepacked once; the owner's plain int8 weight is dropped (held once)."""

    drops = ("weight",)

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        ok = problem.device == "cpu" and torch.backends.mkldnn.is_available() and \
            hasattr(torch.ops.onednn, "qlinear_pointwise")
        return None if ok else "needs oneDNN's int8 ops on CPU"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(owner.weight, None), persistent=False)
        self.register_buffer("weight_zero_points", torch.zeros(owner.weight.shape[0], dtype=torch.long),
                             persistent=False)
        self.one = torch.ones((), dtype=torch.float32)

    def gemm(self, u8: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise.tensor(
            u8, scale, zero_point, self.packed, self.weight_scale, self.weight_zero_points, bias, 1.0, 0,
            out_dtype, "none", [], "")  # fmt: skip

    def restore(self, name: str) -> torch.Tensor:
        return self.packed.to_dense().t().contiguous()  # the prepacked layout unpacks as [K, N]


class OneDnnU8(_OneDnn):
    """Activations as uint8 q + 128 (zero point + 128): one GEMM. Where the activation scale is
    one number, oneDNN applies it and the bias in its epilogue and writes `out_dtype` itself."""

    name = "onednn-u8"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.shifted_zero_point = torch.tensor(self.zero_point + 128, dtype=torch.long)

    def forward(self, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        shifted = q.view(torch.uint8) ^ 128  # two's complement + 128: q + 128 as uint8
        if x_scale.numel() == 1:
            return self.gemm(shifted, self.shifted_zero_point, x_scale.reshape(()), self.bias, out_dtype)
        y = self.gemm(shifted, self.shifted_zero_point, self.one, None, torch.float32)
        return self.epilogue(y, x_scale, out_dtype)


class OneDnnSplit(_OneDnn):
    """q = 2h + l with h = q >> 1 in [-64, 63] and l in {0, 1}; rows [h + 64; l + 64] (uint8, all
    <= 127) in one GEMM with zero point 64, then 2 * top + bottom: exact without VNNI, and the
    weights are read once (decode is bound by that read, so two rows cost about what one does).
    The zero point's share, zero_point * sum_k w[n, k] (scaled), is subtracted after."""

    name = "onednn-u8-split"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.sixty_four = torch.tensor(64, dtype=torch.long)
        sums = owner.weight.sum(dim=1, dtype=torch.int32).float() * self.weight_scale * self.zero_point
        self.register_buffer("zero_point_sums", sums if self.zero_point else None, persistent=False)

    def forward(self, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        m = q.shape[0]
        halves = torch.cat([(q >> 1) + 64, (q & 1) + 64]).view(torch.uint8)
        y = self.gemm(halves, self.sixty_four, self.one, None, torch.float32)
        acc = torch.add(y[m:], y[:m], alpha=2)
        if self.zero_point:
            acc = acc - self.zero_point_sums
        return self.epilogue(acc, x_scale, out_dtype)


class NativeW8A8(NativeProduct, _Int8Gemm):
    """Exact int32 sums on the plain weight; zero point, scales and bias in one epilogue; float rows
    quantized per token inside the same call."""

    op, scaled = "w8a8", True

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.register_buffer("weight_sums", owner.weight.sum(dim=1, dtype=torch.int32), persistent=False)

    def operands(self, owner) -> tuple:
        return owner.weight, self.weight_scale, self.bias, self.weight_sums, self.zero_point


class NativeW8A8Tiled(OuterBlocked, NativeW8A8):
    """The same sums as outer products: 16 output columns a vector, each activation quad (q + 128)
    broadcast, no horizontal sums (variant.h's `outer`), on the int8 weight's blocks (outer.py)."""

    op = "w8a8_tiled"

    def operands(self, owner) -> tuple:
        return self.blocks, self.outputs, self.weight_scale, self.bias, self.weight_sums, self.zero_point


class Int8ActivationRole(Role):
    """What the roles fed int8 activations (W8A8, W4A8) share: their probe's inputs and their
    contract, exact sums rounded once to the output dtype."""

    @classmethod
    def owner(cls, problem: Problem, generator: torch.Generator) -> SimpleNamespace:
        """An owner holding random weights (and a bias) of `problem`'s shape."""
        raise NotImplementedError

    @classmethod
    def exact(cls, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The exact product of int8 rows `q` with scales `x_scale`, rounded to `out_dtype`, in float64."""
        raise NotImplementedError

    @classmethod
    def reference(cls, owner, inputs: tuple) -> torch.Tensor:
        """Float rows with no scale are quantized per token by torch's ops (the definition), then exact."""
        q, x_scale, out_dtype = inputs
        if x_scale is None:
            q, x_scale = quantize_per_token_in_torch(q)
        return cls.exact(owner, q, x_scale, out_dtype)

    @classmethod
    def rounding(cls, inputs: tuple) -> float:
        out_dtype = inputs[2]
        return 0.0 if out_dtype == torch.float32 else 2 * torch.finfo(out_dtype).eps

    @classmethod
    def sample(cls, problem: Problem, rows: int, generator: torch.Generator):
        """Full-range int8 activations with runs of the extremes (-128, 127), which saturate 16-bit
        pair sums; per-row and per-tensor scales; float32 output (exact sums must survive to 1e-6)
        and the model's dtype (the fused epilogue); and float rows with no scale, which the kernel
        quantizes per token itself (float32 out: a row quantized otherwise than torch's ops do it
        shows as an error far above 1e-6)."""
        owner = cls.owner(problem, generator)
        q = torch.randint(-128, 128, (rows, problem.inputs), generator=generator, dtype=torch.int8)
        extremes = torch.rand(rows, problem.inputs, generator=generator) < 0.5
        q[extremes] = torch.where(torch.rand(int(extremes.sum()), generator=generator) < 0.5, -128, 127).to(
            torch.int8)
        device = problem.device
        per_row = (torch.rand(rows, 1, generator=generator) + 0.5).to(device)
        per_tensor = torch.tensor([0.75], device=device)
        q = q.to(device)
        rows_in_float = activations(problem, rows, generator)
        return owner, [(q, per_row, torch.float32), (q, per_tensor, torch.float32),
                       (q, per_tensor, problem.torch_dtype), (rows_in_float, None, torch.float32)]


@register
class W8A8(Int8ActivationRole):
    name = "w8a8"
    candidates = (OneDnnU8, OneDnnSplit,
                  *variants_of(NativeW8A8, "portable", "avx2", "avx512", "avx512-vnni"),
                  *variants_of(NativeW8A8Tiled, "avx512-vnni", form="tiled"), IntMM, Float32Sums)
    ZERO_POINT = 3  # probes run with a zero point: static asymmetric activations have one

    @classmethod
    def owner(cls, problem: Problem, generator: torch.Generator) -> SimpleNamespace:
        return _int8_owner(problem, generator, cls.ZERO_POINT)

    @classmethod
    def exact(cls, owner, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        acc = (q.double() - owner.zero_point) @ owner.weight.double().t()
        y = acc * owner.weight_scale.double().view(-1) * x_scale.double() + owner.bias.double()
        return y.to(out_dtype).double()  # rounding to out_dtype is the contract, not an error
