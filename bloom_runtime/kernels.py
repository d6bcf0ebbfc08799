"""The low-bit matmuls, and which kernel serves which shape and device.

Float bfloat16 linears on CPU run on weights packed once into oneDNN's layout
(`pack_dense`). W8A16 multiplies float activations by int8 weights with one scale per output
row (`weight_only_matmul`), W4A16 by int4 weights with a scale per group of inputs
(`Int4Weights`); W8A8 multiplies int8 by int8, exactly in integers,
and scales once (`Int8Gemm`). Everything else in the package calls these and
never names a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# aten's int8 weight-pack kernel is a matrix-vector kernel: its time grows with every row.
# Dequantize + GEMM pays a bfloat16 copy of the weight per call instead. Measured with 24
# distinct 4096x1024 weights streaming from memory (2 threads, AVX-512 VNNI Xeon), int8pack /
# dequantize ms: 8 rows 20.1 / 48.0, 16 rows 33.5 / 47.2, 32 rows 58.8 / 62.8, 48 rows
# 83.9 / 78.8; the 250880x1024 head: 8 rows 54 / 198, 32 rows 204 / 272. Crossover ~40 rows.
INT8PACK_MAX_ROWS = 32


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (int8 weight [N, K] * scale [N, 1])^T, returned in x's dtype.

    Few rows (decode) take aten's int8 matrix-vector kernel with 16-bit
    activations (the "A16"): float32 inputs are rounded to bfloat16 there, as
    its float32 variant streams weights at ~3 GB/s against ~30 GB/s in bfloat16
    (1024 x 4096, 2 threads). Many rows (prefill) dequantize and run a GEMM in
    x's own dtype.
    """
    flat = x.reshape(-1, x.shape[-1])
    act = flat.to(torch.bfloat16) if flat.dtype == torch.float32 else flat
    if weight_only_kernel(act) == "int8pack":
        y = torch.ops.aten._weight_int8pack_mm(act, weight, scale.view(-1).to(act.dtype))
        return y.to(x.dtype).view(*x.shape[:-1], -1)
    return F.linear(x, weight.to(x.dtype)) * scale.view(-1).to(x.dtype)


def weight_only_kernel(act: torch.Tensor) -> str:
    """Which W8A16 kernel serves 16-bit activations `act` [rows, K]: "int8pack" (aten's
    `_weight_int8pack_mm`) or "dequantize" (dequantize, then a GEMM).

    int8pack takes few rows on CPU only; and for bfloat16 only an input width
    divisible by 16: in torch 2.13 its bfloat16 CPU kernel segfaults on other
    widths (seen at K=72, a tensor-parallel slice of a 144-wide model); real BLOOM
    widths are multiples of 16 per rank, so only toy shapes take the fallback.
    """
    rows, width = act.shape
    safe = act.device.type == "cpu" and (act.dtype != torch.bfloat16 or width % 16 == 0)
    return "int8pack" if rows <= INT8PACK_MAX_ROWS and safe else "dequantize"


# oneDNN's bfloat16 matmul on a weight reordered once into its blocked layout, against
# F.linear on the plain [N, K] weight (the same oneDNN, reordering nothing), bloom-560m's
# 24 blocks of linears streamed from memory, 2 threads, AVX-512 BF16 Xeon without AMX:
# 1 row 27.3 / 38.6 ms, 8 rows 47.2 / 64.1, 64 rows 234 / 264; bit-identical outputs.
# float16 gains 7% at 1 row and its sums differ in the last bit, so it is left plain.
PACKED_DTYPES = (torch.bfloat16,)


def can_pack_dense(weight: torch.Tensor) -> bool:
    """Whether `pack_dense` serves this float weight (CPU, bfloat16, oneDNN built in)."""
    return (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES
            and torch.backends.mkldnn.is_available())


def pack_dense(weight: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] in oneDNN's blocked layout for `packed_linear` (an opaque
    tensor: it cannot be indexed, saved or changed; `unpack_dense` gives the weight back)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def unpack_dense(packed: torch.Tensor) -> torch.Tensor:
    """The plain [N, K] weight back from `pack_dense`'s layout (exactly)."""
    return packed.to_dense()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ w^T + bias for a weight packed by `pack_dense`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Int8Gemm:
    """An int8 weight [N, K] with its scales [N] and bias, ready for W8A8: `gemm(q, x_scale)`
    returns ((q - zero_point) @ weight^T) * weight_scale * x_scale + bias in float32, with
    exact integer sums.

    On CPU it runs oneDNN's int8 GEMM (`onednn::qlinear_pointwise`, what PyTorch's
    own x86 int8 inference lowers to) on weights prepacked once into oneDNN's
    blocked layout. The activations go in as uint8 (q + 128, zero point + 128):
    the prepacked weights carry oneDNN's compensation for a uint8 source, and an
    int8 source falls to its reference kernel (`ref_int8`, 70 ms for one 1024x4096
    row on an AVX-512 VNNI Xeon, against 0.2 ms for brgemm on uint8). Measured on
    that 2-core Xeon, the 250880 x 1024 head: 10.0 / 12.1 / 48.9 ms at 1 / 8 / 64
    rows, against 12.7 / 22.7 / 95.5 for `torch._int_mm` and 19.8 / 51.0 / - for
    aten's int8 weight-pack kernel. Elsewhere, and where oneDNN is missing,
    `torch._int_mm`, with the zero point's contribution zp * sum_k w[n, k] subtracted.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, zero_point: int = 0,
                 bias: torch.Tensor | None = None, onednn: bool | None = None) -> None:
        """`onednn`: None chooses by device; False forces the `_int_mm` path (tests compare them)."""
        self.zero_point = zero_point
        self.weight_scale = weight_scale.reshape(-1).float().contiguous()
        self.bias = None if bias is None else bias.float()  # once, not per call
        self.onednn = weight.device.type == "cpu" and _has_onednn_int8() and onednn is not False
        if self.onednn:
            self.packed = torch.ops.onednn.qlinear_prepack(weight, None)
            self.weight_zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
            self.one = torch.ones((), dtype=torch.float32)
            self.shifted_zero_point = torch.tensor(zero_point + 128, dtype=torch.long)
        else:
            self.transposed = weight.t()
            self.row_sums = weight.sum(dim=1, dtype=torch.int32) if zero_point else None

    def __call__(self, q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
        """The product for int8 `q` [M, K] with `x_scale` [M, 1] (per row) or [1] (per tensor),
        rounded once to `out_dtype`.

        Where the activation scale is one number (a decode step's single row, a static
        scale), oneDNN applies it and the bias in its epilogue and writes `out_dtype`
        itself: one call per linear instead of three elementwise passes after it.
        Per-row scales take one fused multiply-add after the float32 GEMM.
        """
        if self.onednn:
            shifted = q.view(torch.uint8) ^ 128  # two's complement + 128: q + 128 as uint8
            fused = x_scale.numel() == 1
            y = torch.ops.onednn.qlinear_pointwise.tensor(
                shifted, x_scale.reshape(()) if fused else self.one, self.shifted_zero_point, self.packed,
                self.weight_scale, self.weight_zero_points, self.bias if fused else None, 1.0, 0,
                out_dtype if fused else torch.float32, "none", [], "")  # fmt: skip
            return y if fused else self._epilogue(y, x_scale, out_dtype)
        acc = int8_matmul(q, self.transposed)
        if self.zero_point:
            acc = acc - self.zero_point * self.row_sums
        return self._epilogue(acc.float() * self.weight_scale, x_scale, out_dtype)

    def _epilogue(self, y: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        y = y * x_scale if self.bias is None else torch.addcmul(self.bias, y, x_scale)
        return y.to(out_dtype)


def _has_onednn_int8() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] @ int8 [k, n] -> int32, on `torch._int_mm`.

    CUDA's kernel wants m > 16, so small batches (decode) are padded there.
    """
    m = a.shape[0]
    if a.device.type == "cuda" and m <= 16:
        a = F.pad(a, (0, 0, 0, 17 - m))
        return torch._int_mm(a, b)[:m]
    return torch._int_mm(a, b)


class Int4Weights:
    """Group-wise symmetric int4 weights ready for W4A16: `weights(x)` is x @ w^T in x's dtype,
    where w = q * scale per group of `group` inputs (q int8 [N, K] in [-8, 7], scale [N, K / group]).

    On CPU it runs aten's `_weight_int4pack_mm_for_cpu` on weights repacked once (two
    values a byte, as q + 8, with (scale, 0) per group) and bfloat16 activations: that
    kernel is fast only in bfloat16 (in float32 or float16 it takes 62 / 90 ms at 8 rows
    of bloom-560m's 4096 x 1024), so float32 and float16 inputs are rounded to bfloat16
    there (the "A16"). It takes groups of 32, 64, 128 or 256, and outputs in multiples
    of 16 (others are padded with zero rows: the embedded model's vocabulary of 1588).
    Prefill uses it too. Against dequantizing the 4096 x 1024 weight per call (4.7 ms)
    and a bfloat16 GEMM, one weight, 2 threads, a Xeon without AMX: 16 rows 1.0 / 6.1
    ms, 64 rows 3.9 / 9.0, 256 rows 15.4 / 18.9, 512 rows 31.4 / 32.8, 1024 rows 62.5 /
    57.6. A crossover near 700 rows, 8% at 1024, is too little for a second path; an
    AMX machine, with a far faster bfloat16 GEMM, would move it down and is where to
    measure it again.
    Elsewhere (CUDA's `_weight_int4pack_mm` is not wired: no GPU to test it on) the
    weight is dequantized once, into the activations' dtype, which keeps W4A16's
    numerics but not its memory or speed.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group: int, int4pack: bool | None = None
                 ) -> None:
        """`int4pack`: None chooses by device; False forces the dequantized path (tests compare them)."""
        self.group, self.outputs = group, q.shape[0]
        self.int4pack = scale.device.type == "cpu" and int4pack is not False
        if self.int4pack:
            rows = -self.outputs % 16
            q, scale = F.pad(q, (0, 0, 0, rows)), F.pad(scale, (0, 0, 0, rows))
            nibbles = (q.to(torch.int32) + 8).contiguous()  # the kernel's nibbles are q + 8 in [0, 15]
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
            pairs = torch.stack([scale, torch.zeros_like(scale)], dim=-1).transpose(0, 1)  # [K / group, N, 2]
            self.scales_and_zeros = pairs.contiguous().to(torch.bfloat16)
        else:
            self.dequantized = q.float() * scale.float().repeat_interleave(group, dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.int4pack:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, self.group,
                                                            self.scales_and_zeros)[:, : self.outputs]
        else:
            if self.dequantized.dtype != flat.dtype:  # once: the model's dtype does not change
                self.dequantized = self.dequantized.to(flat.dtype)
            y = F.linear(flat, self.dequantized)
        return y.to(x.dtype).view(*x.shape[:-1], -1)
