"""INT4 weights (W4A16, and W4A8 with int8 activations): the quantizer, the int4 kernels against
the math they stand for, agreement with float32, checkpoints, and the group rules of
compressed-tensors and TP.

Agreement is measured on the embedded model (trained): on the random test models
int4's rounding swamps their near-flat logits (KL ~2.5 with a float head, where int8
gives 0.013: int4's step is ~17x int8's, so its noise variance ~290x), which would
bound nothing. The embedded model's 144 / 576 widths are not multiples of the
groups, so it also runs the zero-padded last group.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from hf_checkpoints import hf_model, save
from random_batches import left_padded_batch

import bloom_runtime as br
from bloom_runtime import DistributedError, InputError
from bloom_runtime.agreement import kl_divergence, relative_error, top1_agreement
from bloom_runtime.config import BloomConfig
from bloom_runtime.kernels import native
from bloom_runtime.kernels.int4 import W4A8
from bloom_runtime.kernels.selection import candidate
from bloom_runtime.loader import skeleton
from bloom_runtime.parallel import Shard
from bloom_runtime.quant import LINEARS, QuantSpec
from bloom_runtime.quant.int4 import (
    BITS,
    Int4Int8Linear,
    Int4WeightOnlyLinear,
    Int4Weights,
    quantize_int4,
    with_group,
)
from bloom_runtime.weights import quantize_checkpoint

SCHEMES = [name for name in LINEARS if name.startswith("w4a")]
# min top-1, max KL on the embedded model against float32; measured 0.90-0.93 / 0.046-0.052 (w4a8 too)
MIN_TOP1, MAX_KL = 0.85, 0.12


def test_quantize_int4_rounds_to_nearest_within_each_group():
    torch.manual_seed(0)
    weight = torch.randn(40, 96) * torch.rand(40, 1)  # rows of different ranges
    q, scale = quantize_int4(weight, 32)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.allclose(scale, weight.view(40, 3, 32).abs().amax(-1) / 7.5)  # compressed-tensors' scale
    error = (q.float().view(40, 3, 32) * scale[..., None]).view(40, 96) - weight
    assert float((error.abs().view(40, 3, 32) / scale[..., None]).max()) <= 0.5 + 1e-5  # half a step


def test_quantize_int4_pads_a_width_that_is_not_whole_groups():
    q, scale = quantize_int4(torch.ones(3, 40), 32)
    assert q.shape == (3, 64) and scale.shape == (3, 2) and int(q[:, 40:].abs().sum()) == 0


@pytest.mark.parametrize("kernel", ["int4pack", "dequantize"])
@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("outputs, width", [(96, 128), (1001, 256)], ids=["96x128", "odd-vocab-1001x256"])
def test_int4_kernels_equal_dequantized_math(monkeypatch, kernel, rows, outputs, width):
    """Each int4 candidate (forced) in an int4 linear against q * scale in float64: within the
    rounding of the activations to the kernel's dtype (int4pack: bfloat16; measured <= 4e-3 of
    the output's scale). Guards a nibble offset, a transposed scale and the padding of odd N."""
    monkeypatch.setenv("BLOOM_RUNTIME_KERNELS", f"w4a16={kernel}")
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize_int4(torch.randn(outputs, width, generator=g), 64)
    module = with_group(Int4WeightOnlyLinear, 64)(pack_to_int32(q, BITS), scale, None, width)
    x = torch.randn(rows, width, generator=g)
    y = module(x)
    exact = x.double() @ (q.double() * scale.double().repeat_interleave(64, dim=1)).t()
    assert set(module.kernels) == {kernel} and y.shape == (rows, outputs) and y.dtype == torch.float32
    limit = 1e-2 if kernel == "int4pack" else 1e-5
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < limit


@pytest.mark.parametrize("kernel", [cls.name for cls in W4A8.candidates])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_w4a8_linear_equals_its_integer_math(monkeypatch, kernel, rows):
    """A W4A8 linear (each candidate forced) against per-token int8 activations times the int4
    weights in float64, plus the bias: guards the padding of a width that is not whole groups
    (zeros that must not move a token's scale), a bias added twice or not at all, and a kernel that
    reads the activations before they are quantized."""
    variant = getattr(candidate("w4a8", kernel), "variant", None)
    if variant is not None and native.unavailable(variant):
        pytest.skip(f"{kernel}: {native.unavailable(variant)}")
    monkeypatch.setenv("BLOOM_RUNTIME_KERNELS", f"w4a8={kernel}")
    g = torch.Generator().manual_seed(rows)
    outputs, width = 1001, 200  # padded to two groups of 128
    q, scale = quantize_int4(torch.randn(outputs, width, generator=g), 128)
    bias = torch.randn(outputs, generator=g)
    module = Int4Int8Linear(pack_to_int32(q, BITS), scale, bias, width)
    x = torch.randn(rows, width, generator=g) * torch.rand(rows, 1, generator=g) * 10
    y = module(x)
    x_scale = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / x_scale).clamp(-128, 127)
    dequantized = q.double()[:, :width] * scale.double().repeat_interleave(128, dim=1)[:, :width]
    exact = (xq.double() @ dequantized.t()) * x_scale.double() + bias.double()
    assert set(module.kernels) == {kernel} and y.shape == (rows, outputs) and y.dtype == torch.float32
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < 1e-5


def test_w4a8_weights_are_w4a16s():
    """W4A8 does not smooth by default (smoothing moved the embedded model's KL from 0.050 to
    0.056: int4 rounds the migrated range coarsely), so its weights are W4A16's, bit for bit."""
    assert QuantSpec.from_name("w4a8").alpha is None
    w4a8, w4a16 = (br.load("tiny", quant=name).model.h[0].mlp.dense_h_to_4h for name in ("w4a8", "w4a16"))
    packed = [module.state_dict()["weight_packed"] for module in (w4a8, w4a16)]  # a kernel may hold them
    assert type(w4a8) is Int4Int8Linear and torch.equal(*packed)


@pytest.fixture(scope="module")
def embedded():
    ids, mask = left_padded_batch(1588, [48, 30, 9], seed=3)
    return ids, mask, br.load("tiny").logits(ids, mask)


@pytest.mark.parametrize("name", SCHEMES)
def test_w4a16_close_to_float32_on_the_embedded_model(embedded, name, dtype):
    ids, mask, ref = embedded
    engine = br.load("tiny", quant=name, dtype=dtype)
    assert type(engine.model.word_embeddings).__name__.startswith("Int4")  # the tied head too
    ours = engine.logits(ids, mask)
    top1, kl = top1_agreement(ours, ref, mask), kl_divergence(ours, ref, mask)
    print(f"{name} {dtype}: top-1 {top1:.3f}, KL {kl:.4f}")
    assert top1 >= MIN_TOP1 and kl <= MAX_KL, f"{name} {dtype}: top-1 {top1:.3f}, KL {kl:.4f}"


def test_int4_head_is_closer_to_float_with_smaller_groups(embedded):
    """Smaller groups, more scales: g32's head-only error below g128's (a check that the
    group size reaches the kernel, not just the file)."""
    ids, mask, ref = embedded
    errors = {group: relative_error(br.load("tiny", quant=QuantSpec("w8a16", None, head=f"w4a16{group}"))
                                    .logits(ids, mask), ref, mask) for group in ("", "-g32")}
    assert errors["-g32"] < errors[""], errors


@pytest.fixture(scope="module")
def whole_groups(tmp_path_factory):
    """A float checkpoint whose widths are whole groups of 128 (compressed-tensors can store it)."""
    return save(hf_model(seed=5, n_head=4, hidden_size=128, n_layer=2, vocab_size=1001),
                tmp_path_factory.mktemp("int4"))


@pytest.mark.parametrize("name", ["w4a16", "w4a16-g32"])
def test_w4a16_checkpoint_equals_quantize_on_load(whole_groups, tmp_path, name):
    out = quantize_checkpoint(whole_groups, tmp_path / name, QuantSpec.from_name(name))
    ids, mask = left_padded_batch(1001, [20, 7], seed=2)
    assert torch.equal(br.load(out).logits(ids, mask), br.load(whole_groups, quant=name).logits(ids, mask))


def test_a_width_that_is_not_whole_groups_is_not_written(tmp_path):
    with pytest.raises(InputError, match="not a multiple of int4 group 128"):
        quantize_checkpoint("tiny", tmp_path / "q", QuantSpec.from_name("w4a16"))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("hidden, ok", [(256, True), (128, False)])
def test_tp_cuts_row_parallel_int4_layers_on_group_boundaries(hidden, ok):
    """At tp=2, 128 inputs split into 64 per rank: half a group of 128, refused; 256 splits whole."""
    config = BloomConfig(vocab_size=64, hidden_size=hidden, n_layer=1, n_head=2)
    build = lambda: skeleton(config, QuantSpec.from_name("w4a16"), Shard(0, 2))  # noqa: E731
    if ok:
        build()
    else:
        with pytest.raises(DistributedError, match="whole int4 groups of 128"):
            build()


@pytest.mark.parametrize("variant", ["avx2", "avx512", "avx512-vnni"])
def test_w4a8_blocks_hold_the_int4_weights_once_and_give_them_back(monkeypatch, variant):
    """The outer-product kernel lays the int4 weights and their scales out in blocks at load, in place
    of the packed words and the scales. Guards the blocks kept beside the words (twice the int4 bytes)
    or the scales, a `state_dict` that loses or scrambles either (the blocks' inverse), and an int4 head
    whose lookups read the wrong row of a block, for values or scales (ids at block edges: 15, 16, the
    last)."""
    kernel = f"native-tiled-{variant}"
    if native.unavailable(variant):
        pytest.skip(f"{kernel}: {native.unavailable(variant)}")
    monkeypatch.setenv("BLOOM_RUNTIME_KERNELS", f"w4a8={kernel}")
    tiled = br.load("tiny", dtype="bfloat16", quant="w4a8")
    plain = br.load("tiny", dtype="bfloat16", quant="w4a8", pack=False)
    int4 = [m for m in tiled.model.modules() if isinstance(m, Int4Weights)]
    dropped = {"weight_packed", "weight_scale"}
    assert int4 and all(set(m.kernels) == {kernel} and not dropped & set(m._parameters) for m in int4)
    a, b = tiled.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in b)
    vocab = tiled.config.vocab_size
    ids = torch.tensor([[0, 15, 16, 17], [vocab - 1, vocab - 16, 3, 250]])
    assert torch.equal(tiled.model.word_embeddings(ids), plain.model.word_embeddings(ids))
