"""The native decode kernels: every variant this CPU can run, forced one at a time, against float64.

Inputs are made to break them: full-range int8 with runs of -128 and 127 (which saturate 16-bit
pair sums), widths that are no multiple of any vector (the scalar tails), 1, 5 and 17 rows (the
row tiles and their tails), outputs that are no multiple of the tile (the last rows), tensors that
start one element past an aligned address, and enough work that torch's threads split the outputs.
`.ci/run` runs this file once more against a library built with -fsanitize=address,undefined,
and once under the AVX2 cap (where only the portable and avx2 variants may run).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from bloom_runtime.kernels import Problem, native
from bloom_runtime.kernels import selection as sel
from bloom_runtime.kernels.int4 import int4_blocks
from bloom_runtime.kernels.outer import outer_blocks, unblock
from bloom_runtime.quant import int8 as quant_int8

VARIANTS = ("portable", "avx2", "avx512", "avx512-vnni", "avx512-bf16")
SHAPES = [(1, 259, 1037), (5, 259, 1037), (17, 67, 96), (1, 3, 13)]  # rows, outputs, inputs
INT4_SHAPES = [(1, 259, 1024), (5, 67, 256), (17, 5, 512)]


@pytest.fixture(params=VARIANTS)
def variant(request) -> int:
    why = native.unavailable(request.param)
    if why is not None:
        pytest.skip(f"{request.param}: {why}")
    return native.variant_index(request.param)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` that starts one element past where an allocation would."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def before_an_unreadable_page(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` whose last byte ends a page, the next page unreadable: a kernel that
    reads past the tensor faults here (a vector gather is invisible to the sanitizers)."""
    size, page = t.numel() * t.element_size(), mmap.PAGESIZE
    total = -(-size // page) * page + page
    buffer = mmap.mmap(-1, total, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + total - page), page, 0) == 0  # PROT_NONE
    out = torch.frombuffer(buffer, dtype=t.dtype, count=t.numel(), offset=total - page - size).view(t.shape)
    out.copy_(t)
    return out


def full_range_int8(*shape: int, generator: torch.Generator) -> torch.Tensor:
    q = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    extremes = torch.rand(*shape, generator=generator) < 0.5
    ends = torch.where(torch.rand(*shape, generator=generator) < 0.5, -128, 127).to(torch.int8)
    q[extremes] = ends[extremes]
    return q


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("rows,outputs,inputs", [*SHAPES, (2, 259, 1037), (9, 67, 96)])
@pytest.mark.parametrize("zero_point", [0, 3])
@pytest.mark.parametrize("form", ["w8a8", "w8a8_tiled"])
def test_w8a8_sums_exactly(variant, rows, outputs, inputs, zero_point, form):
    """Guards a lost tail, a wrong VNNI offset (q + 128 and the weight sums), saturated pair sums,
    and threads that overwrite each other's outputs: exact sums leave only float32 scaling. The
    outer-product form (its weights in blocks: outer.py) also: a block of 32 columns cut by the
    last output and K no multiple of 4 (the blocks end a page: a read past them faults), the
    tiles taking 4 or 2 blocks at once for 1 or 2 rows, and 8 rows plus one. Elsewhere than VNNI
    the op says it has none."""
    g = torch.Generator().manual_seed(rows * outputs + inputs)
    w = misaligned(full_range_int8(outputs, inputs, generator=g))
    q = misaligned(full_range_int8(rows, inputs, generator=g))
    ops = torch.ops.bloom_native
    if form == "w8a8":
        op, weights = ops.w8a8, (w,)
    else:
        op, weights = ops.w8a8_tiled, (before_an_unreadable_page(outer_blocks(w)), outputs)
        assert torch.equal(unblock(weights[0], outputs, inputs), w)
        if ops.variants()[variant] not in ("avx512-vnni", "avx512-bf16"):
            with pytest.raises(RuntimeError, match="has no int8 outer products"):
                op(q, None, *weights, torch.ones(outputs), None, w.sum(dim=1, dtype=torch.int32), 0,
                   torch.float32, variant)
            return
    w_scale = torch.rand(outputs, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(outputs, generator=g)
    sums = w.sum(dim=1, dtype=torch.int32)
    exact = (q.double() - zero_point) @ w.double().t()
    for x_scale in (torch.rand(rows, 1, generator=g) + 0.5, torch.tensor([0.75])):
        want = exact * w_scale.double() * x_scale.double() + bias.double()
        got = op(q, x_scale, *weights, w_scale, bias, sums, zero_point, torch.float32, variant)
        assert error(got, want) < 1e-6
        got16 = op(q, x_scale, *weights, w_scale, None, sums, zero_point, torch.bfloat16, variant)
        assert got16.dtype == torch.bfloat16
        assert error(got16, exact * w_scale.double() * x_scale.double()) < 2 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("rows,outputs,inputs", SHAPES)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_dense16_matches_float64(variant, rows, outputs, inputs, half):
    if half == torch.float16 and variant == native.variant_index("portable"):
        pytest.skip("the portable variant converts no float16")
    g = torch.Generator().manual_seed(rows + outputs * inputs)
    w = misaligned((torch.randn(outputs, inputs, generator=g) * 0.05).to(half))
    x = misaligned(torch.randn(rows, inputs, generator=g).to(half))
    bias = torch.randn(outputs, generator=g).to(half)
    want = x.double() @ w.double().t() + bias.double()
    got = torch.ops.bloom_native.dense16(x, w, bias, variant)
    assert got.dtype == half and error(got, want) < 2 * torch.finfo(half).eps  # float32 sums, rounded once


def outer_products(variant: int) -> bool:
    """Whether the variant has bfloat16 outer products (dense16_tiled: vdpbf16ps)."""
    return torch.ops.bloom_native.variants()[variant] == "avx512-bf16"


TILED_SHAPES = [*SHAPES, (2, 259, 1037), (9, 67, 96), (10, 33, 64), (3, 131, 8)]


@pytest.mark.parametrize("rows,outputs,inputs", TILED_SHAPES)
def test_dense16_tiled_matches_float64(variant, rows, outputs, inputs):
    """Guards the outer products' blocks (outer_blocks): a pair broadcast from the wrong inputs, an odd
    K's last input paired with its neighbour's memory, a block of 32 columns cut by the last output (a
    read past the blocks faults: they end a page; a write past the output corrupts the heap), the
    tiles that take 4 or 2 blocks at once for 1 or 2 rows (259 outputs leave one block over), and a
    tile of 8 rows plus one or two. x ends a page too, unaligned: an odd K's last pair read whole
    faults. Elsewhere the op says it has none."""
    g = torch.Generator().manual_seed(rows + outputs * inputs)
    w = (torch.randn(outputs, inputs, generator=g) * 0.05).to(torch.bfloat16)
    x = before_an_unreadable_page(torch.randn(rows, inputs, generator=g).to(torch.bfloat16))
    bias = torch.randn(outputs, generator=g).to(torch.bfloat16)
    blocks = before_an_unreadable_page(outer_blocks(w))
    assert torch.equal(unblock(blocks, outputs, inputs), w)
    if not outer_products(variant):
        with pytest.raises(RuntimeError, match="has no bfloat16 outer products"):
            torch.ops.bloom_native.dense16_tiled(x, blocks, outputs, bias, variant)
        return
    want = x.double() @ w.double().t() + bias.double()
    got = torch.ops.bloom_native.dense16_tiled(x, blocks, outputs, bias, variant)
    assert got.dtype == torch.bfloat16 and error(got, want) < 2 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("kernel", ["dense16", "dense16_tiled", "w8a16", "w4a8", "w4a8_tiled"])
def test_a_rows_float_sums_do_not_depend_on_the_rows_batched_with_it(variant, kernel):
    """Guards a tile that sums its outputs in another order than the one-row tile (the two-weight-row
    tile of the 64-byte variants, or a split of K; W4A8's groups taken out of order in a tile of 8
    rows): then a sequence's logits, and at near-ties its greedy tokens, would change with the batch
    it runs in. Bit for bit, 17 rows against each alone."""
    if kernel == "dense16_tiled" and not outer_products(variant):
        pytest.skip("no bfloat16 outer products in this variant")
    g = torch.Generator().manual_seed(17)
    w = torch.randn(67, 1037, generator=g) * 0.05
    x = torch.randn(17, 1037, generator=g).to(torch.bfloat16)
    ops = torch.ops.bloom_native
    values = torch.randint(-8, 8, (67, 1024), generator=g, dtype=torch.int8)
    group_scale = torch.rand(67, 1024 // 128, generator=g) * 0.02
    int4 = {"w4a8": (pack_to_int32(values, 4), group_scale),
            "w4a8_tiled": (int4_blocks(values, group_scale, 128), 67)}

    def run(rows: torch.Tensor) -> torch.Tensor:
        if kernel == "dense16":
            return ops.dense16(rows, w.to(torch.bfloat16), None, variant).float()
        if kernel == "dense16_tiled":
            return ops.dense16_tiled(rows, outer_blocks(w.to(torch.bfloat16)), 67, None, variant).float()
        if kernel.startswith("w4a8"):
            return getattr(ops, kernel)(rows[:, :1024].float(), None, *int4[kernel], 128, None, torch.float32,
                                        variant)
        return ops.w8a16(rows.float(), (w * 1000).to(torch.int8), torch.full((67,), 1e-3), variant)

    batched = run(x)
    assert all(torch.equal(batched[m], run(x[m:m + 1])[0]) for m in range(17))


@pytest.mark.parametrize("rows,outputs,inputs", SHAPES)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_w8a16_matches_float64(variant, rows, outputs, inputs, act):
    g = torch.Generator().manual_seed(outputs + rows * inputs)
    w = misaligned(full_range_int8(outputs, inputs, generator=g))
    scale = torch.rand(outputs, generator=g) * 1e-3 + 1e-4
    x = misaligned(torch.randn(rows, inputs, generator=g).to(act))
    want = x.double() @ (w.double() * scale.double()[:, None]).t()
    got = torch.ops.bloom_native.w8a16(x, w, scale, variant)
    assert got.dtype == act and error(got, want) < 2 * max(torch.finfo(act).eps, 1e-6)


@pytest.mark.parametrize("rows,outputs,inputs", INT4_SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_w4a16_matches_the_dequantized_float64(variant, rows, outputs, inputs, group, act):
    """Guards a swapped nibble order, a lost -8 offset and a scale of the wrong group, in both the
    float32 path and avx512-bf16's bfloat16 pairs."""
    g = torch.Generator().manual_seed(rows + outputs + inputs + group)
    q = torch.randint(-8, 8, (outputs, inputs), generator=g, dtype=torch.int8)
    q[:, ::7] = -8  # the extremes of the nibble range
    q[:, 3::7] = 7
    scale = torch.rand(outputs, inputs // group, generator=g) * 0.02 + 1e-3
    packed = misaligned(pack_to_int32(q, 4))
    x = misaligned(torch.randn(rows, inputs, generator=g).to(act))
    want = x.double() @ (q.double() * scale.double().repeat_interleave(group, dim=1)).t()
    got = torch.ops.bloom_native.w4a16(x, packed, scale, group, variant)
    assert got.dtype == act and error(got, want) < 2 * max(torch.finfo(act).eps, 1e-6)


@pytest.mark.parametrize("rows,outputs,inputs", [*INT4_SHAPES, (9, 33, 256)])
@pytest.mark.parametrize("group", [128, 256])
@pytest.mark.parametrize("form", ["w4a8", "w4a8_tiled"])
def test_w4a8_sums_each_step_exactly(variant, rows, outputs, inputs, group, form):
    """Guards a swapped nibble order, a lost correction for the unsigned nibbles (-8 x the activations'
    sum, per lane or per group), a correction read for the wrong step or row, a scale of the wrong
    group, and pair sums that saturate: the extreme nibbles against runs of -128 and 127 leave float32
    scaling as the only error. Per-row and per-tensor scales; the bias and the output dtype in the
    epilogue. The outer-product form (its weights in blocks, each group's scales after its lines) also:
    a block of 16 columns cut by the last output (a read past the blocks or the scales faults: they end
    a page), a line's nibbles taken as the wrong quad, a scale line read as weights or another group's
    scales taken, and a tile of 8 rows plus one (9 rows)."""
    g = torch.Generator().manual_seed(rows + outputs + inputs + group)
    w = torch.randint(-8, 8, (outputs, inputs), generator=g, dtype=torch.int8)
    w[:, ::7] = -8
    w[:, 3::7] = 7
    scale = torch.rand(outputs, inputs // group, generator=g) * 0.02 + 1e-3
    if form == "w4a8_tiled":  # the blocks hold the scales: their last line is the last group's
        weights = (before_an_unreadable_page(int4_blocks(w, scale, group)), outputs)
    else:
        weights = (before_an_unreadable_page(pack_to_int32(w, 4)), before_an_unreadable_page(scale))
    q = misaligned(full_range_int8(rows, inputs, generator=g))
    bias = torch.randn(outputs, generator=g).to(torch.bfloat16)
    exact = q.double() @ (w.double() * scale.double().repeat_interleave(group, dim=1)).t()
    op = getattr(torch.ops.bloom_native, form)
    for x_scale in (torch.rand(rows, 1, generator=g) + 0.5, torch.tensor([0.75])):
        got = op(q, x_scale, *weights, group, bias, torch.float32, variant)
        assert error(got, exact * x_scale.double() + bias.double()) < 1e-6
        got16 = op(q, x_scale, *weights, group, None, torch.bfloat16, variant)
        assert got16.dtype == torch.bfloat16
        assert error(got16, exact * x_scale.double()) < 2 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("kind", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,positions,head", [(1, 1, 64), (3, 37, 64), (2, 300, 128), (1, 5, 16)])
@pytest.mark.parametrize("spread", [30.0, 0.1])
def test_cached_attention_matches_float64_and_writes_the_cache(variant, kind, rows, positions, head, spread):
    """Guards a softmax without its maximum (overflow), masked positions leaking, q, k or v taken from
    the wrong third of the fused projection, scores summed into the wrong position, keys read from the
    wrong row, head or layer of the cache, a value row read at a wrong offset, the step's key and value
    written to the wrong cell (or over a neighbour's), bfloat16 outputs truncated in place of rounded to
    nearest even, and an inexact exp: with the scores close
    (`spread` 0.1, q small) every position's weight counts, where far apart (30) one position takes
    nearly all."""
    g = torch.Generator().manual_seed(rows * positions + head)
    layers, heads, row0, first = 3, 3, 1, 4  # the rows sit after another one; positions start at column 4
    shape = (layers, row0 + rows + 1, heads, first + positions + 5, head)
    keys, values = (torch.randn(*shape, generator=g).to(kind) for _ in range(2))
    qkv = torch.randn(rows, heads, 3, head, generator=g) * 4  # per head [q, k, v]
    qkv[:, :, 0] *= min(1.0, spread / 30)
    qkv = qkv.to(kind)
    bias = (torch.randn(rows, heads, 1, positions, generator=g) * spread).to(kind)
    bias[0, :, :, : positions // 2] = torch.finfo(kind).min  # padding
    column = first + positions - 1
    want_keys, want_values = keys.clone(), values.clone()
    want_keys[1, row0:row0 + rows, :, column] = qkv[:, :, 1]
    want_values[1, row0:row0 + rows, :, column] = qkv[:, :, 2]
    k = want_keys[1, row0:row0 + rows, :, first:column + 1].double()
    v = want_values[1, row0:row0 + rows, :, first:column + 1].double()
    want = torch.nn.functional.scaled_dot_product_attention(qkv[:, :, None, 0].double(), k, v,
                                                            attn_mask=bias.double())  # [B, H, 1, D]
    got = torch.ops.bloom_native.cached_attention(qkv.reshape(rows, -1), keys, values, 1, row0, first, column,
                                                  bias, variant)
    assert got.dtype == kind and got.shape == (rows, heads * head)
    assert error(got, want.reshape(rows, -1)) < 2 * max(torch.finfo(kind).eps, 1e-6)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    if kind == torch.bfloat16:  # the float32 sums it takes, written to nearest even (as Tensor.to does)
        floats = (t.float() for t in (qkv.reshape(rows, -1), keys, values))
        wide = torch.ops.bloom_native.cached_attention(*floats, 1, row0, first, column, bias.float(), variant)
        assert torch.equal(got, wide.bfloat16())


@pytest.mark.parametrize("kind", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("width", [1, 13, 16384, 2 * 16384 + 37])
def test_greedy_takes_each_rows_first_maximum_as_torch_max_does(variant, kind, width):
    """The greedy pick against `max(dim=-1).indices`. Guards a lost tail (the maximum in the last,
    partial vector or part), a later equal maximum taken for the first (ties inside a part and across
    parts), a NaN missed or not the first one, rows read at a wrong stride, and a read past the end."""
    g = torch.Generator().manual_seed(width)
    rows = torch.randn(8, width + 3, generator=g).to(kind)[:, :width]  # rows `width + 3` apart
    rows[1, -1] = 100  # in the tail
    rows[2, width // 2] = rows[2, -1] = 100  # the same maximum twice (across parts where width allows)
    rows[3, width // 3] = rows[3, -1] = float("nan")
    rows[4] = float("-inf")
    rows[5] = 0.0
    rows[5, -1] = -0.0
    rows[6, -1] = float("inf")
    guarded = before_an_unreadable_page(rows[7:].contiguous())
    for logits in (rows, guarded):
        assert torch.equal(torch.ops.bloom_native.greedy(logits, variant), logits.max(dim=-1).indices)


@pytest.mark.parametrize("shape", [(1, 13), (3, 4096 + 5), (64, 4096)])
def test_gelu_is_blooms_tanh_gelu_within_an_ulp(variant, shape):
    """Against x sigmoid(2u) in float64 (the tanh form, 1 + tanh(u), cancels for x < 0 even in float64).
    Guards a wrong constant, the sigmoid's branch for x < 0 taken the wrong way, a lost tail, threads'
    ranges overlapping or missed, bfloat16 truncated instead of rounded to nearest even (half the
    outputs would differ from the reference rounded), a NaN lost, and reads past the end."""
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, generator=g) * 4).bfloat16()
    x[0, 0], x[-1, -1] = float("nan"), 200.0
    x = before_an_unreadable_page(x)
    got = torch.ops.bloom_native.gelu(x, variant)
    ref = x.double() * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3))
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.isnan(got[0, 0]) and got[-1, -1] == 200.0
    finite = ~torch.isnan(ref)
    assert float(((got.double() - ref).abs() / ref.abs().clamp(min=1e-30))[finite].max()) < 2.0**-8
    assert float((got != ref.float().bfloat16())[finite].double().mean()) < 0.01  # off only near a tie


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16, torch.float16])
def test_one_pass_quantization_equals_the_torch_ops_bit_for_bit(variant, act):
    """Guards rounding half away from zero, a scale from another formula, and the clamp: ties
    (x / scale exactly n + 0.5), a row of zeros, a row with one element, and huge values; a NaN
    that hides a lane's larger values from the row's maximum; the vector tail (1037 inputs); and a
    row ending a page (a read past it faults)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1037, generator=g) * 3
    x[1] = 0
    x[2, :] = torch.arange(1037) - 518.0  # absmax 518: scale 518 / 127; many exact ties below
    x[2, 0] = 518 / 127 * 2.5
    x[3] *= torch.finfo(act).max / x[3].abs().max()  # the largest finite values
    x[4, 1:] = 0
    x[5, 0], x[5, 16], x[5, 32] = 1000.0, float("nan"), 1.0  # each lane width's first lane: max, NaN, less
    x = before_an_unreadable_page(x.to(act))
    q, scale = torch.ops.bloom_native.quantize_rows(x, variant)
    nan_row = x[5].float()
    assert scale[5, 0] == torch.tensor(1000.0) / 127 and q[5, 16] == -128  # the NaN seen nowhere else
    finite = ~torch.isnan(nan_row)
    assert torch.equal(q[5][finite], torch.round(nan_row[finite] / scale[5]).clamp(-128, 127).to(torch.int8))
    kept = torch.arange(7) != 5  # torch's amax gives the NaN row a NaN scale
    x, q, scale = x[kept], q[kept], scale[kept]
    flat = x.float()
    want_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    want_q = torch.round(flat / want_scale).clamp(-128, 127).to(torch.int8)
    assert torch.equal(scale, want_scale) and torch.equal(q, want_q)
    assert torch.equal(quant_int8.quantize_per_token(x)[0], want_q)  # what tensor-parallel W8A8 calls


@pytest.mark.parametrize("rows,inputs", [(1, 1037), (5, 256), (17, 1024)])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_float_rows_are_quantized_inside_the_call_as_quantize_rows_does(variant, rows, inputs, act):
    """What W8A8 and W4A8 layers run: float rows and no scale, quantized inside the op. Guards the
    per-token scale dropped or taken for one number (rows > 1), rows quantized from the wrong buffer,
    and any difference from quantize_rows, which equals torch's ops bit for bit (above)."""
    g = torch.Generator().manual_seed(rows + inputs)
    x = misaligned((torch.randn(rows, inputs, generator=g) * 3).to(act))
    x[0, :] *= 40  # rows of very different ranges: a shared scale would show
    q, scale = torch.ops.bloom_native.quantize_rows(x, variant)
    ops, outputs = torch.ops.bloom_native, 67
    w = full_range_int8(outputs, inputs, generator=g)
    w_scale, bias, sums = torch.rand(outputs, generator=g) * 1e-3, torch.randn(outputs, generator=g), w.sum(
        dim=1, dtype=torch.int32)
    for out in (torch.float32, torch.bfloat16):
        want = ops.w8a8(q, scale, w, w_scale, bias, sums, 3, out, variant)
        assert torch.equal(ops.w8a8(x, None, w, w_scale, bias, sums, 3, out, variant), want)
    if inputs % 256 == 0:  # whole groups of W4A8's 128 inputs, and whole steps of every variant
        values = torch.randint(-8, 8, (outputs, inputs), generator=g, dtype=torch.int8)
        group_scale = torch.rand(outputs, inputs // 128, generator=g) * 0.02
        for op, weights in ((ops.w4a8, (pack_to_int32(values, 4), group_scale)),
                            (ops.w4a8_tiled, (int4_blocks(values, group_scale, 128), outputs))):
            want = op(q, scale, *weights, 128, bias, torch.float32, variant)
            assert torch.equal(op(x, None, *weights, 128, bias, torch.float32, variant), want)


@pytest.mark.parametrize("rows", [1, 9])
def test_16_bit_outputs_are_the_float32_ones_rounded_as_torch_rounds(variant, rows):
    """Each thread rounds its part of the sums into the output (decode.cpp's Output): guards rounding
    by truncation, a part or a vector tail left unrounded (67 outputs: 4 vectors of 16 and 3 more),
    and float16 overflow handled otherwise than torch does (sums far past 65504 give inf)."""
    g = torch.Generator().manual_seed(rows)
    ops, outputs, inputs = torch.ops.bloom_native, 67, 256
    q = torch.randint(-128, 128, (rows, inputs), generator=g, dtype=torch.int8)
    x_scale = torch.rand(rows, 1, generator=g) + 0.5
    w = full_range_int8(outputs, inputs, generator=g)
    w_scale, bias = torch.rand(outputs, generator=g) * 4, torch.randn(outputs, generator=g)
    values = torch.randint(-8, 8, (outputs, inputs), generator=g, dtype=torch.int8)
    group_scale = torch.rand(outputs, inputs // 128, generator=g) * 8
    sums, packed = w.sum(dim=1, dtype=torch.int32), pack_to_int32(values, 4)
    blocks = int4_blocks(values, group_scale, 128)
    calls = [lambda out: ops.w8a8(q, x_scale, w, w_scale, bias, sums, 0, out, variant),
             lambda out: ops.w4a8(q, x_scale, packed, group_scale, 128, bias, out, variant),
             lambda out: ops.w4a8_tiled(q, x_scale, blocks, outputs, 128, bias, out, variant)]
    if ops.variants()[variant] in ("avx512-vnni", "avx512-bf16"):  # int8 outer products: VNNI only
        tiled = outer_blocks(w)
        calls.append(lambda out: ops.w8a8_tiled(q, x_scale, tiled, outputs, w_scale, bias, sums, 0, out,
                                                variant))
    for call in calls:
        exact = call(torch.float32)
        assert float(exact.abs().max()) > 65504  # some overflow float16
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(call(dtype), exact.to(dtype))


def test_every_variant_is_a_candidate_the_probe_checks_and_times():
    """The registry offers each variant of each role, and the probe decides among them here."""
    problem = Problem("w8a8", "cpu", "bfloat16", 64, 1024)
    decision = sel.probe(problem)
    trials = {t.name: t for t in decision.trials}
    for name in ("portable", "avx2", "avx512", "avx512-vnni"):
        trial = trials[f"native-{name}"]
        assert trial.correct == (native.unavailable(name) is None), trial.why
        assert trial.correct <= bool(trial.ms)  # timed when correct


def test_the_build_is_keyed_by_its_sources_and_the_decisions_by_the_build(tmp_path, monkeypatch):
    """Guards an edited kernel keeping the old library or the old verdicts."""
    before, fingerprint = native.build_id(), sel.machine_fingerprint()
    copy = tmp_path / "csrc"
    copy.mkdir()
    for source in native.SOURCES.iterdir():
        (copy / source.name).write_text(source.read_text() + ("\n// edited" if source.suffix == ".h" else ""))
    monkeypatch.setattr(native, "SOURCES", copy)
    assert native.build_id() != before and sel.machine_fingerprint() != fingerprint


def test_the_decisions_are_keyed_by_the_registrys_python_code(tmp_path, monkeypatch):
    """Guards a candidate added, or a change in where one may serve, leaving the old verdicts cached."""
    package = Path(sel.__file__).parent
    for source in package.glob("*.py"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    assert sel._registry_code(tmp_path) == sel._registry_code(package)
    (tmp_path / "dense.py").write_text((package / "dense.py").read_text() + "\n# edited\n")
    assert sel._registry_code(tmp_path) != sel._registry_code(package)
    fingerprint = sel.machine_fingerprint()
    monkeypatch.setattr(sel, "_registry_code", lambda: "edited")
    assert sel.machine_fingerprint() != fingerprint


def test_without_a_compiler_one_line_says_so_and_torch_kernels_serve(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), sel.CACHE_DIR_ENV: str(tmp_path / "c")}
    env.pop(sel.FORCE_ENV, None)
    command = ["generate", "Hi", "--max-new-tokens", "4", "--dtype", "bf16", "--quant", "w8a8"]
    done = subprocess.run([sys.executable, "-m", "bloom_runtime", *command], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "native" in line]
    assert len(lines) == 1 and "no native kernels" in lines[0] and "no-such-compiler" in lines[0], lines
    assert not list((tmp_path / "c").glob("native/*.so"))


def test_a_library_built_on_one_machine_never_runs_a_variant_this_cpu_lacks():
    """`supported` follows the CPU's own report (cpuid), so a cached build from an AVX-512 machine,
    loaded on an AVX2 one, refuses its AVX-512 variants instead of faulting."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not flags or native.available() is not None:
        pytest.skip("needs /proc/cpuinfo and the native library")
    names = {"avx2": "avx2", "avx512": "avx512bw", "avx512-vnni": "avx512_vnni", "avx512-bf16": "avx512_bf16"}
    for variant, flag in names.items():
        index = native.variant_index(variant)
        assert torch.ops.bloom_native.supported(index) == (flag in flags), variant
    unsupported = [v for v, flag in names.items() if flag not in flags]
    for variant in unsupported:
        with pytest.raises(RuntimeError, match="cannot run"):
            torch.ops.bloom_native.dense16(torch.zeros(1, 8, dtype=torch.bfloat16),
                                           torch.zeros(2, 8, dtype=torch.bfloat16), None,
                                           native.variant_index(variant))
