"""INT8 (W8A16, W8A8 dynamic/static/static-asym) against the float32 reference on the same weights.

Bounds per scheme on a 4-layer random model (real tokens of a left-padded
batch): top-1 agreement with float32, and mean KL(float32 || int8) in nats.
Measured values are in the comments; bounds leave room for other torch builds.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_checkpoints import hf_model, save
from random_batches import left_padded_batch
from safetensors.torch import load_file, save_file

import bloom_runtime as br
from bloom_runtime import CheckpointError, InputError
from bloom_runtime.agreement import kl_divergence, top1_agreement
from bloom_runtime.cli import main as cli
from bloom_runtime.quant import Int8Linear, Int8WeightOnlyLinear, QuantSpec, quantize_weight

FIELDS = dict(n_head=4, hidden_size=128, n_layer=4, vocab_size=1001)
MODELSLIM = QuantSpec("w8a8-static-asym", alpha=None, float_layers=(1,))  # the guide's recipe
BOUNDS = {  # name: (spec, min top-1, max KL)          measured top-1 / KL
    "w8a16": (QuantSpec.from_name("w8a16"), 0.93, 0.025),  # 0.949 / 0.0133 (int8 head)
    "w8a8": (QuantSpec.from_name("w8a8"), 0.90, 0.04),  # 0.926 / 0.021 (int8 head; float head 0.0205)
    "w8a8-static": (QuantSpec.from_name("w8a8-static"), 0.90, 0.06),  # 0.954 / 0.035
    "modelslim": (MODELSLIM, 0.85, 0.08),  # 0.903 / 0.042
}
REDUCED_TOP1, REDUCED_KL = 0.04, 0.025  # what bfloat16 / float16 compute may add to the bounds above


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(hf_model(seed=5, **FIELDS), tmp_path_factory.mktemp("quant"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    ids, mask = left_padded_batch(FIELDS["vocab_size"], [64, 40, 7, 64], seed=6)
    return ids, mask, br.load(checkpoint).logits(ids, mask)


def scheme_figures(checkpoint, reference, spec, device: str = "cpu", dtype: str = "float32"
                   ) -> tuple[float, float]:
    ids, mask, ref = reference
    ours = br.load(checkpoint, quant=spec, device=device, dtype=dtype).logits(ids, mask)
    return top1_agreement(ours, ref, mask), kl_divergence(ours, ref, mask)


@pytest.mark.parametrize("name", list(BOUNDS))
def test_int8_scheme_close_to_float32(checkpoint, reference, name, device):
    spec, min_top1, max_kl = BOUNDS[name]
    top1, kl = scheme_figures(checkpoint, reference, spec, device)
    assert top1 >= min_top1, f"{name}: top-1 agreement {top1:.3f} < {min_top1}"
    assert kl <= max_kl, f"{name}: KL {kl:.4f} > {max_kl}"


def test_dynamic_activations_beat_static_ones(checkpoint, reference):
    """Per-token scales adapt to each token; one calibrated scale cannot (measured 0.021 vs 0.035)."""
    _, dynamic_kl = scheme_figures(checkpoint, reference, QuantSpec("w8a8"))
    _, static_kl = scheme_figures(checkpoint, reference, QuantSpec("w8a8-static"))
    assert dynamic_kl < static_kl


@pytest.mark.parametrize("kernel", ["onednn-u8", "onednn-u8-split", "int_mm"])
def test_w8a8_integer_kernels_run_no_float_matmul(monkeypatch, kernel):
    """Guards a W8A8 path that dequantizes into a float GEMM: each integer candidate, forced, is
    the per-token quantized x times the dequantized W to float32 rounding, with no F.linear.
    Only where the probe finds it exact on this machine (else it would never serve here)."""
    from bloom_runtime.kernels import Problem, probe

    if kernel not in {t.name for t in probe(Problem("w8a8", "cpu", "float32", 48, 64)).trials if t.correct}:
        pytest.skip(f"{kernel} is not exact on this machine; the probe keeps it from serving")
    monkeypatch.setenv("BLOOM_RUNTIME_KERNELS", f"w8a8={kernel}")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q, scale = quantize_weight(linear.weight.detach())
    module = Int8Linear(q, scale, linear.bias.detach())
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: pytest.fail("float matmul used"))
    x = torch.randn(5, 64)
    y = module(x)
    assert set(module.kernels) == {kernel}
    x_scale = x.abs().amax(1, keepdim=True) / 127
    expected = (torch.round(x / x_scale) * x_scale) @ (q.float() * scale).t() + linear.bias
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_w8a16_equals_dequantized_weight_math():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48)
    q, scale = quantize_weight(linear.weight.detach())
    module = Int8WeightOnlyLinear(q, scale, linear.bias.detach())
    x = torch.randn(3, 12, 64)
    # "A16": the int8pack kernel multiplies bfloat16 activations, so allow their rounding.
    expected = x @ (q.float() * scale).t() + linear.bias.detach()
    y = module(x)
    assert y.dtype == torch.float32 and module.weight.dtype == torch.int8
    assert float((y - expected).abs().max() / expected.abs().max()) < 1e-2


@pytest.mark.parametrize("rows", [4, 192], ids=["decode", "prefill"])
@pytest.mark.parametrize("width", [72, 144])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_w8a16_any_width_and_dtype(rows, width, dtype_name):
    """Widths that are not a multiple of 16 once crashed aten's bfloat16 int8 kernel (a crash no
    probe survives, so int8pack declares them unsupported): whichever kernel serves decode and
    prefill rows here gives the dequantized math."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(2)
    q, scale = quantize_weight(torch.randn(96, width))
    x = torch.randn(rows, width).to(dtype)
    y = Int8WeightOnlyLinear(q, scale, None)(x)
    expected = x.float() @ (q.float() * scale).t()
    assert y.dtype == dtype
    assert float((y.float() - expected).abs().max() / expected.abs().max()) < 1e-2


def test_smoothing_alone_changes_nothing_in_float(checkpoint, reference):
    """Folding SmoothQuant's scales into LayerNorm and weights is an identity before rounding."""
    from bloom_runtime.calibration import calibration_ids
    from bloom_runtime.quant.smoothquant import smooth

    ids, mask, ref = reference
    engine = br.load(checkpoint)
    smooth(engine.model, 0.5, calibration_ids(None, FIELDS["vocab_size"], 8))
    ours = engine.logits(ids, mask)
    assert float((ours - ref)[mask.bool()].abs().max() / ref.abs().max()) <= 1e-5


def test_calibration_is_reproducible(checkpoint):
    a = br.load(checkpoint, quant="w8a8-static").model.h[2].mlp.dense_4h_to_h.input_scale
    b = br.load(checkpoint, quant="w8a8-static").model.h[2].mlp.dense_4h_to_h.input_scale
    c = br.load(checkpoint, quant="w8a8-static", seed=1).model.h[2].mlp.dense_4h_to_h.input_scale
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("args, spec", [
    (["--scheme", "w8a8"], QuantSpec("w8a8", head="w8a8")),
    (["--scheme", "w8a8", "--float-head"], QuantSpec("w8a8")),
    (["--scheme", "w8a8", "--activation", "static"], QuantSpec("w8a8-static")),
    (["--scheme", "w8a16"], QuantSpec("w8a16", None, head="w8a16")),
    (["--scheme", "w4a8"], QuantSpec("w4a8", None, head="w8a16")),  # W4A8 smooths only when asked
    (["--scheme", "w4a8", "--alpha", "0.5", "--float-head"], QuantSpec("w4a8", 0.5)),
    (["--activation", "static-asym", "--no-smooth", "--float-layers", "1"],
     QuantSpec("w8a8-static-asym", None, (1,))),
])  # fmt: skip
def test_quantized_checkpoint_round_trip(checkpoint, reference, tmp_path, args, spec):
    ids, mask, _ = reference
    out = tmp_path / "q"
    assert cli(["weights", "quant", "--input", str(checkpoint), "--output", str(out), *args]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    on_load = br.load(checkpoint, quant=spec).logits(ids, mask)
    assert torch.equal(br.load(out).logits(ids, mask), on_load)
    assert list(checkpoint.iterdir())  # the input is untouched
    assert cli(["weights", "quant", "--input", str(checkpoint), "--output", str(out), *args]) == 2


@pytest.fixture()
def static_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "static"
    assert cli(["weights", "quant", "--input", str(checkpoint), "--output", str(out),
                "--activation", "static"]) == 0
    return out


SCALE = "transformer.h.0.self_attention.dense.weight_scale"
INPUT_SCALE = "transformer.h.3.mlp.dense_h_to_4h.input_scale"
H_TO_4H = "transformer.h.0.mlp.dense_h_to_4h.weight"


@pytest.mark.parametrize("edit, words", [
    (lambda s: s[SCALE].__setitem__((0, 0), float("nan")), ["weight_scale", "NaN"]),
    (lambda s: s[SCALE].__setitem__((1, 0), 0.0), ["weight_scale", "<= 0"]),
    (lambda s: s.update({SCALE: s[SCALE][:-1]}), ["weight_scale", "shape"]),
    (lambda s: s.pop(INPUT_SCALE), ["input_scale", "missing"]),
    (lambda s: s.update({H_TO_4H: s[H_TO_4H].float()}), ["dense_h_to_4h.weight", "int8"]),
], ids=["nan-scale", "zero-scale", "scale-shape", "no-input-scale", "float-weight"])  # fmt: skip
def test_corrupt_quantized_checkpoint_is_named(static_checkpoint, edit, words):
    path = static_checkpoint / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    with pytest.raises(CheckpointError) as caught:
        br.load(static_checkpoint)
    for word in words:
        assert word in str(caught.value)


def test_quantizing_twice_is_refused(static_checkpoint):
    with pytest.raises(InputError, match="already quantized"):
        br.load(static_checkpoint, quant="w8a8")


def test_output_inside_input_is_refused(checkpoint):
    assert cli(["weights", "quant", "--input", str(checkpoint), "--output", str(checkpoint / "q")]) == 2
    assert not (checkpoint / "q").exists()


@pytest.mark.parametrize("name", list(BOUNDS))
def test_int8_scheme_in_reduced_precision(checkpoint, reference, name, dtype, device):
    """The guide's own combination (float16 + W8A8) and every other INT8 scheme in bfloat16 and
    float16, against float32: the float32 bounds, plus what the dtype adds (measured at most
    +0.019 of KL and -0.03 of top-1, bfloat16 W8A8: KL 0.040, top-1 0.909)."""
    spec, min_top1, max_kl = BOUNDS[name]
    top1, kl = scheme_figures(checkpoint, reference, spec, device, dtype)
    assert top1 >= min_top1 - REDUCED_TOP1, f"{name} {dtype}: top-1 agreement {top1:.3f}"
    assert kl <= max_kl + REDUCED_KL, f"{name} {dtype}: KL {kl:.4f}"
