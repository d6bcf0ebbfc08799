"""Tensor parallelism: TP=N (--tp, default 2) against TP=1 on the same weights, cut checkpoints,
failures, torchrun.

Configs have 6 heads (3 per rank at TP=2, not a power of two) and a vocabulary
that is not a multiple of 2 (251, 333), so ALiBi slicing and vocab padding are
both exercised. float32: relative error <= 1e-5 of the logit scale and identical
greedy tokens; W8A8: identical greedy tokens; W8A16: equal to bfloat16 rounding;
bfloat16 and float16 (each rank rounds its partial sums before the all-reduce):
top-1 agreement and a bound on the logits, measured below. Every rank's outcome
is checked, not rank 0's alone.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hf_checkpoints import hf_model, save
from random_batches import left_padded_batch
from safetensors.torch import load_file, save_file
from spawn_ranks import on_every_rank, run_ranks

import bloom_runtime as br
from bloom_runtime import CheckpointError, DistributedError
from bloom_runtime.agreement import position_errors, relative_error, top1_agreement
from bloom_runtime.embedded import TINY_DIR
from bloom_runtime.kernels.selection import FORCE_ENV
from bloom_runtime.quant import QuantSpec
from bloom_runtime.weights import cut_checkpoint, quantize_checkpoint

CONFIGS = {
    "3-heads-per-rank": dict(n_head=6, hidden_size=48, vocab_size=251, n_layer=2),
    "post-ln-vocab-333": dict(n_head=6, hidden_size=96, vocab_size=333, n_layer=3,
                              apply_residual_connection_post_layernorm=True),
}  # fmt: skip
INT8 = ("w8a8", "w8a8-static", "w8a16")
# W4A16 needs row-parallel cuts on whole groups: 192 and 768 inputs split into 3 and 12 groups of 32
INT4_FIELDS = dict(n_head=6, hidden_size=192, vocab_size=251, n_layer=2)
# W4A8's groups are 128: 768 and 3072 inputs split into 3 and 12 groups at tp=2 (2 and 8 at tp=3)
W4A8_FIELDS = dict(n_head=6, hidden_size=768, vocab_size=251, n_layer=2)
# dtype x scheme cells beyond float32: (quant, dtype) -> (min top-1, max relative error) against TP=1
# (measured on the two configs: top-1, relative error)
REDUCED = {
    (None, "bfloat16"): (0.95, 0.03),  # 1.0 / 8.6e-3, 1.4e-2
    (None, "float16"): (0.98, 5e-3),  # 1.0 / 9.5e-4, 1.7e-3
    ("w8a8", "float16"): (0.9, 0.05),  # the guide's combination: 1.0, 0.92 / 1.5e-2, 2.8e-2
    ("w8a8-static-asym", "float32"): (1.0, 1e-5),  # the guide's modelslim recipe: 1.0 / 2e-7, 3e-7
}


# W8A16 in float32 on the kernel that keeps float32 activations, so that TP=2 must equal TP=1 to
# float32 rounding; int8pack (activations rounded to bfloat16) is held to its own math in test_kernels
KERNELS = {"w8a16": "w8a16=dequantize"}


def outputs(path: str, quant: str | None = None, dtype: str = "float32") -> dict:
    """What a rank computes: logits, greedy tokens and seeded samples on a fixed batch."""
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = KERNELS.get(quant, "")
    try:
        engine = br.load(path, quant=quant, dtype=dtype)
    finally:  # the test process goes on to other modules
        os.environ.pop(FORCE_ENV) if before is None else os.environ.update({FORCE_ENV: before})
    ids, mask = left_padded_batch(engine.config.vocab_size, [9, 5, 12], seed=3)
    return dict(
        logits=engine.logits(ids, mask), mask=mask,
        greedy=engine.generate(ids, mask, max_new_tokens=24),
        sampled=engine.generate(ids, mask, max_new_tokens=12, do_sample=True, top_k=8, seed=5),
    )  # fmt: skip


def many(jobs: list[tuple]) -> list[dict]:
    return [outputs(*job) for job in jobs]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tp_size):
    if CONFIGS["3-heads-per-rank"]["n_head"] % tp_size:
        pytest.skip(f"--tp {tp_size} does not divide the test models' 6 heads")
    root = tmp_path_factory.mktemp("tp")
    made = {}
    for name, fields in CONFIGS.items():
        full = save(hf_model(seed=17, **fields), root / name)
        made[name] = full
        made[name + "-cut"] = cut_checkpoint(full, root / f"{name}-cut", tp=tp_size)
        quantized = quantize_checkpoint(full, root / f"{name}-w8a8-static", QuantSpec("w8a8-static"))
        made[name + "-int8-cut"] = cut_checkpoint(quantized, root / f"{name}-int8-cut", tp=tp_size)
        made[name + "-int8"] = quantized
    made["int4-groups"] = save(hf_model(seed=17, **INT4_FIELDS), root / "int4-groups")
    made["int4-groups-128"] = save(hf_model(seed=17, **W4A8_FIELDS), root / "int4-groups-128")
    return made


@pytest.fixture(scope="module")
def tp(checkpoints, tp_size):
    """Everything the TP tests compare, computed in one multi-rank run (spawning is slow). Every
    rank must succeed and compute what rank 0 computes."""
    floats = [n for n in checkpoints if not n.endswith("int8") and not n.startswith("int4")]
    jobs = [(str(checkpoints[n]), None, "float32") for n in floats]
    jobs += [(str(checkpoints["int4-groups"]), "w4a16-g32", "float32")]
    jobs += [(str(checkpoints["int4-groups-128"]), "w4a8", "float32")]
    jobs += [(str(checkpoints[n]), q, "float32") for n in CONFIGS for q in INT8]
    jobs += [(str(checkpoints[n]), q, dtype) for n in CONFIGS for q, dtype in REDUCED]
    first, *others = on_every_rank(run_ranks(many, tp_size, jobs))
    for other in others:
        for job, mine, theirs in zip(jobs, first, other):
            assert torch.equal(mine["greedy"], theirs["greedy"]), f"ranks disagree on {job}"
    return dict(zip(jobs, first))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp_float32_equals_tp1(checkpoints, tp, name):
    single = outputs(str(checkpoints[name]))
    for variant in (name, name + "-cut"):
        double = tp[(str(checkpoints[variant]), None, "float32")]
        err = relative_error(double["logits"], single["logits"], single["mask"])
        assert err <= 1e-5, f"{variant}: relative error {err:.2e}"
        assert torch.equal(double["greedy"], single["greedy"]), variant
        assert torch.equal(double["sampled"], single["sampled"]), variant


@pytest.mark.parametrize("quant", ["w8a8", "w8a8-static"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp_w8a8_greedy_tokens_equal_tp1(checkpoints, tp, name, quant):
    """W8A8 sums int8 products exactly in int32, and per-token scales span the whole token."""
    single = outputs(str(checkpoints[name]), quant)
    assert torch.equal(tp[(str(checkpoints[name]), quant, "float32")]["greedy"], single["greedy"])


def test_tp_w4a16_close_to_tp1(checkpoints, tp):
    """W4A16 multiplies in bfloat16 on every rank (the kernel's "A16"), so TP=2 equals TP=1 to
    bfloat16 rounding of the partial sums (measured: top-1 1.0, relative error 3.9e-3)."""
    path = str(checkpoints["int4-groups"])
    single, double = outputs(path, "w4a16-g32"), tp[(path, "w4a16-g32", "float32")]
    top1 = top1_agreement(double["logits"], single["logits"], single["mask"])
    error = relative_error(double["logits"], single["logits"], single["mask"])
    print(f"w4a16-g32 tp: top-1 {top1:.3f}, relative error {error:.2e}")
    assert top1 >= 0.95 and error <= 0.02, f"top-1 {top1:.3f}, relative error {error:.2e}"


def test_tp_w4a8_greedy_tokens_equal_tp1(checkpoints, tp):
    """W4A8 sums each group of int4 x int8 exactly (every candidate kernel), and per-token scales span
    the whole token (each rank sees a slice of it in the row-parallel layers). What TP=2 changes is
    the order of float32 sums (across groups, and the all-reduce), which can flip an activation's
    int8 rounding in the next layer: that moves the token it lands on by up to ~3e-3 of the logit
    scale, and the rest agree to float32 order. Measured under the AVX2 cap, on every mix of the
    kernels the probe may pick for each side: 0 to 2 of the 26 tokens moved, the median token
    3e-8 to 1e-7. A scale taken over one rank's slice of a token moves every rounding of every
    token: planted, the median 7.1e-3. So: the same greedy tokens, and the median token within
    float32 order."""
    path = str(checkpoints["int4-groups-128"])
    single, double = outputs(path, "w4a8"), tp[(path, "w4a8", "float32")]
    errors = position_errors(double["logits"], single["logits"], single["mask"])
    print(f"w4a8 tp: tokens moved past 1e-5 {int((errors > 1e-5).sum())}/{errors.numel()}, "
          f"median {errors.median():.2e}, max {errors.max():.2e}")
    assert torch.equal(double["greedy"], single["greedy"])
    assert errors.median() <= 1e-5, f"median token's relative error {errors.median():.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp_w8a16_logits_equal_tp1(checkpoints, tp, name):
    """W8A16 on its dequantizing kernel (KERNELS) multiplies in the model's dtype: TP=2 equals
    TP=1 like float32 does. Greedy tokens are not compared: int8pack would round the activations
    to bfloat16 on each rank before the all-reduce, and these random models have near-ties."""
    single = outputs(str(checkpoints[name]), "w8a16")
    double = tp[(str(checkpoints[name]), "w8a16", "float32")]
    assert top1_agreement(double["logits"], single["logits"], single["mask"]) == 1.0
    assert relative_error(double["logits"], single["logits"], single["mask"]) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cut_quantized_checkpoint_equals_uncut(checkpoints, tp, name):
    single = outputs(str(checkpoints[name + "-int8"]))
    cut = tp[(str(checkpoints[name + "-int8-cut"]), None, "float32")]
    assert torch.equal(cut["greedy"], single["greedy"])


@pytest.mark.parametrize("quant, precision", list(REDUCED), ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp_reduced_precision_and_modelslim_close_to_tp1(checkpoints, tp, name, quant, precision):
    min_top1, max_error = REDUCED[(quant, precision)]
    single = outputs(str(checkpoints[name]), quant, precision)
    multi = tp[(str(checkpoints[name]), quant, precision)]
    top1 = top1_agreement(multi["logits"], single["logits"], single["mask"])
    error = relative_error(multi["logits"], single["logits"], single["mask"])
    assert top1 >= min_top1 and error <= max_error, f"{quant} {precision}: top-1 {top1:.3f}, {error:.2e}"


def test_cut_checkpoint_with_wrong_world_size_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match="cut for tp=2.*tp=1"):
        br.load(checkpoints["3-heads-per-rank-cut"])


def test_heads_must_divide_across_ranks(checkpoints, tmp_path):
    with pytest.raises(br.BloomRuntimeError, match="n_head=6"):
        cut_checkpoint(checkpoints["3-heads-per-rank"], tmp_path / "x", tp=4)


def _load_only(path: str) -> str:
    br.load(path)
    return "loaded"


@pytest.mark.parametrize("damage", ["missing-rank-file", "sha256-mismatch"])
def test_a_failing_rank_makes_every_rank_raise(checkpoints, tmp_path, damage):
    cut = cut_checkpoint(checkpoints["3-heads-per-rank"], tmp_path / "cut", tp=2)
    victim = cut / "rank_1" / "model.safetensors"
    if damage == "missing-rank-file":
        victim.unlink()
    else:
        state = load_file(victim)
        name = next(iter(state))
        state[name] = state[name] + 1  # same size, different bytes
        save_file(state, victim, metadata={"format": "pt"})
    results = run_ranks(_load_only, 2, str(cut))  # every rank must fail, and say which file
    assert all(status == "error" for status, _ in results), results
    kinds = {kind for _, (kind, _, _) in results}
    assert kinds <= {"CheckpointError", "DistributedError"}
    assert all("rank_1" in message for _, (_, message, _) in results)


def test_torchrun_generate_prints_once_and_matches_tp1(tmp_path):
    cut = cut_checkpoint(TINY_DIR, tmp_path / "tiny-cut", tp=2)
    prompt = "以下是中国关于计算机网络考试的单项选择题"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bloom_runtime", "generate", "--model", str(cut), "--max-new-tokens", "8", prompt],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == prompt + br.load().generate_text([prompt], max_new_tokens=8)[0] + "\n"


def test_tp_without_torchrun_is_a_clear_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="torchrun"):
        br.load(tp=2)
