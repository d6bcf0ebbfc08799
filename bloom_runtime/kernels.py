"""The int8 matmuls, and which kernel serves which shape and device.

W8A16 multiplies float activations by int8 weights with one scale per output
row; W8A8 multiplies int8 by int8 into int32. Everything else in the package
calls these two functions and never names a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# aten's int8 weight-pack kernel is a matrix-vector kernel: on a 2-core Xeon (AMX) it
# reads int8 weights at ~35 GB/s, beating bfloat16 2.4x at one row (1024x4096), but
# loses 4x at 64 rows (prefill), where dequantize + GEMM wins; the crossover is ~12.
INT8PACK_MAX_ROWS = 8


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


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] @ int8 [k, n] -> int32, on `torch._int_mm`.

    CUDA's kernel wants m > 16, so small batches (decode) are padded there.
    """
    m = a.shape[0]
    if a.device.type == "cuda" and m <= 16:
        a = F.pad(a, (0, 0, 0, 17 - m))
        return torch._int_mm(a, b)[:m]
    return torch._int_mm(a, b)
