"""The kernel choice: only kernels checked on this machine serve, and what serves is exact.

These run on whatever CPU CI has; `.ci/run` runs them a second time with oneDNN and
aten capped at AVX2 (ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY), so an AVX-512 Xeon
also exercises what an AVX2-only EPYC runs, and an EPYC what it runs natively.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys

import pytest
import torch

import bloom_runtime as br
from bloom_runtime import InputError, kernels
from bloom_runtime.bench import roofline
from bloom_runtime.kernels import Kernel, Problem, Selector, describe, probe
from bloom_runtime.kernels import selection as sel
from bloom_runtime.kernels.int8 import W8A8
from bloom_runtime.model import Linear

PROBLEMS = [  # bloom-560m's widths: the probe's verdict must hold at every row count below
    Problem("dense16", "cpu", "bfloat16", 96, 1024), Problem("dense16", "cpu", "float16", 96, 1024),
    Problem("w8a16", "cpu", "bfloat16", 96, 1024), Problem("w8a16", "cpu", "float32", 96, 4096),
    Problem("w8a8", "cpu", "bfloat16", 96, 1024), Problem("w8a8", "cpu", "float32", 96, 4096),
    Problem("w4a16", "cpu", "bfloat16", 96, 1024, group=128),
    Problem("w4a16", "cpu", "float32", 96, 1024, group=32),
    Problem("w4a8", "cpu", "bfloat16", 96, 1024, group=128),
    Problem("w4a8", "cpu", "float32", 96, 4096, group=128),
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_forcing(monkeypatch):
    monkeypatch.delenv(sel.FORCE_ENV, raising=False)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.key())
def test_every_kernel_the_probe_passes_is_exact_at_every_row_count(problem):
    """Guards a probe too weak to see a wrong kernel (a saturating int8 path, a bad layout): each
    candidate it lets serve must meet its tolerance at row counts and zero points it never
    probed. Some candidate must pass: the role must run on this machine."""
    decision = probe(problem)
    passed = [t.name for t in decision.trials if t.correct]
    assert passed, describe([decision])
    role = sel.ROLES[problem.role]
    generator = torch.Generator().manual_seed(7)
    for name in passed:
        cls = sel.candidate(problem.role, name)
        for rows in (1, 8, 64, 300):
            owner, inputs = role.sample(problem, rows, generator)
            if problem.role == "w8a8":
                owner.zero_point = -37 if rows % 2 else 90
            call = cls(owner).bind(owner)  # what serves
            for variant in inputs:
                error = relative_error(call(*variant), role.reference(owner, variant))
                allowed = max(cls.tolerance(problem), role.rounding(variant))
                assert error <= allowed, f"{name} at {rows} rows: error {error:.3g} > {allowed:.3g}"


class _Raises(Kernel):
    name = "planted-raises"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        raise RuntimeError("this CPU lacks the instruction")


class _Wrong(Kernel):
    """Fast and 2% off: what a saturating int8 path looks like from outside."""

    name = "planted-wrong"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.real = kernels.int8.Float32Sums(owner)  # correct on any machine

    def forward(self, owner, q, x_scale, out_dtype):
        return self.real(owner, q, x_scale, torch.float32).mul_(1.02).to(out_dtype)


def test_a_candidate_that_raises_or_is_wrong_never_serves(monkeypatch):
    """Guards the choice by speed alone, and a kernel error escaping the probe as a crash."""
    monkeypatch.setattr(W8A8, "candidates", (_Raises, _Wrong, *W8A8.candidates))
    decision = probe(Problem("w8a8", "cpu", "float32", 64, 256))
    trials = {t.name: t for t in decision.trials}
    assert not trials["planted-raises"].correct and "lacks the instruction" in trials["planted-raises"].why
    assert not trials["planted-wrong"].correct and "relative error 0.02" in trials["planted-wrong"].why
    assert not {"planted-raises", "planted-wrong"} & set(decision.serves.values())
    assert "not used: raised RuntimeError" in describe([decision])


class _WantsWholeOctets(kernels.int8.Int8Input):
    """Refuses a width that is not a multiple of 8, as CUDA's `torch._int_mm` does (cuBLASLt)."""

    name = "planted-octets"

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.real = kernels.int8.Float32Sums(owner)

    def forward(self, owner, q, x_scale, out_dtype):
        if owner.weight.shape[0] % 8:
            raise RuntimeError(f"mat2.size(1) needs to be a multiple of 8, but got {owner.weight.shape[0]}")
        return self.real(owner, q, x_scale, out_dtype)


def test_the_probe_checks_a_width_with_the_real_ones_tail(monkeypatch):
    """Guards the check on a cut width: the tiny head's 1001 outputs, checked at 48, passed a
    kernel that then raised when timed at 1001 (seen on an H200: the probe crashed the load)."""
    monkeypatch.setattr(W8A8, "candidates", (_WantsWholeOctets, kernels.int8.Float32Sums))
    for outputs, correct in ((1001, False), (3003, False), (4096, True)):
        decision = probe(Problem("w8a8", "cpu", "float32", outputs, 64))
        trial = next(t for t in decision.trials if t.name == "planted-octets")
        assert trial.correct == correct, (outputs, trial.why)
        assert correct or "multiple of 8" in trial.why


def test_no_correct_candidate_is_an_error_not_a_silent_choice(monkeypatch):
    monkeypatch.setattr(W8A8, "candidates", (_Raises, _Wrong))
    with pytest.raises(RuntimeError, match="no kernel computes w8a8"):
        probe(Problem("w8a8", "cpu", "float32", 64, 256))


def test_the_fastest_correct_kernel_serves_the_nearest_row_counts():
    trial = sel.Trial
    correct = [trial("int8pack", True, ms={1: 1.0, 8: 5.0, 128: 40.0}),
               trial("dequantize", True, ms={1: 4.0, 8: 6.0, 128: 9.0})]
    problem = Problem("w8a16", "cpu", "bfloat16", 8, 8)
    decision = sel.Decision(problem, sel._winners("w8a16", correct), correct)
    assert decision.serves == {1: "int8pack", 8: "int8pack", 128: "dequantize"}
    # the geometric midpoint of 8 and 128 is 32
    assert [decision.name_for(rows) for rows in (1, 4, 31, 33, 1000)] == \
        ["int8pack", "int8pack", "int8pack", "dequantize", "dequantize"]


def test_a_kernel_that_takes_the_weight_over_serves_every_row_count_or_none():
    """Guards holding a weight twice: a packed kernel at decode beside a plain one at prefill."""
    trial = sel.Trial
    correct = [trial("onednn-u8", True, ms={1: 1.0, 8: 2.0, 128: 30.0}),
               trial("int_mm", True, ms={1: 1.5, 8: 2.5, 128: 20.0})]
    serves = sel._winners("w8a8", correct)
    assert set(serves.values()) == {"onednn-u8"}  # relative slowness 0 + 0 + log 1.5 < log 1.5 + log 1.25


def test_a_kernel_that_serves_decode_beside_plain_prefill_kernels_beats_one_packed_throughout():
    """Guards giving up a decode kernel for a packed one that is slower where most steps are: the
    plain kernels (fastest at each row count among them) hold the weight once too."""
    trial = sel.Trial
    correct = [trial("onednn-u8", True, ms={1: 2.0, 8: 2.0, 128: 20.0}),
               trial("native-avx2", True, ms={1: 1.0, 8: 3.0, 128: 40.0}),
               trial("int_mm", True, ms={1: 2.2, 8: 2.2, 128: 22.0})]
    serves = sel._winners("w8a8", correct)
    assert serves == {1: "native-avx2", 8: "int_mm", 128: "int_mm"}  # log 1.1 + log 1.1 < log 2


def test_a_decision_timed_under_load_serves_but_is_not_cached(tmp_path, monkeypatch):
    """Guards verdicts that followed another process's load being kept for good."""
    problem = Problem("w8a16", "cpu", "float32", 32, 64)
    monkeypatch.setattr(sel, "_contended", lambda before, wall_s: True)
    decision = Selector(tmp_path).decide(problem)
    assert decision.contended and decision.source == "probed" and not Selector(tmp_path).cache_file.exists()
    assert "not cached" in describe([decision])
    monkeypatch.undo()
    busy = iter([(0.0, 0.0), (1.2, 0.4)])  # others used 0.8 CPU-seconds of 2 CPUs x 1 s
    monkeypatch.setattr(sel, "_cpu_seconds", lambda: next(busy))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert sel._contended(sel._cpu_seconds(), 1.0)  # 0.8 > 0.25 x 2
    quiet = iter([(0.0, 0.0), (1.2, 1.0)])
    monkeypatch.setattr(sel, "_cpu_seconds", lambda: next(quiet))
    assert not sel._contended(sel._cpu_seconds(), 1.0)


def test_timing_takes_turns_and_keeps_each_candidates_fastest_run(monkeypatch):
    """Guards one candidate's every run falling in a burst of load: runs interleave."""
    order = []
    runs = [lambda i=i: order.append(i) for i in range(3)]
    best = sel._interleaved_best_ms(runs, "cpu")
    assert len(best) == 3 and order[:6] == [0, 1, 2, 0, 1, 2]


def test_decisions_are_cached_per_machine_and_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setattr(sel, "_contended", lambda before, wall_s: False)  # a busy CI machine keeps nothing
    problem = Problem("w8a16", "cpu", "float32", 32, 64)
    first = Selector(tmp_path).decide(problem)
    assert first.source == "probed" and Selector(tmp_path).cache_file.is_file()
    again = Selector(tmp_path).decide(problem)
    assert again.source == "cache" and again.serves == first.serves
    assert [t.name for t in again.trials] == [t.name for t in first.trials]
    other = tmp_path / "off"
    assert Selector(other, use_cache=False).decide(problem).source == "probed"
    assert not other.exists()
    before = sel.machine_fingerprint()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # another machine as far as dispatch goes
    assert sel.machine_fingerprint() != before


def test_a_forced_kernel_serves_and_a_bad_name_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(sel.FORCE_ENV, "w8a8=float32")
    decision = Selector(use_cache=False).decide(Problem("w8a8", "cpu", "float32", 16, 32))
    assert decision.source == "forced" and set(decision.serves.values()) == {"float32"}
    monkeypatch.setenv(sel.FORCE_ENV, "w8a8=fastest")
    with pytest.raises(InputError, match="w8a8: onednn-u8, onednn-u8-split, native-portable, .*, float32"):
        sel.forced_kernels()


@pytest.mark.parametrize("quant", [None, "w8a8", "w8a16", "w4a16", "w4a8"])
def test_a_loaded_model_runs_only_probed_kernels_holds_weights_once_and_saves_them_plain(quant):
    """Guards kernels built lazily and invisible to `.to()`/`weight_bytes`, W8A8's int8 weight kept
    beside oneDNN's prepacked copy, and `weights quant` writing a model without its weights."""
    prepared = br.load("tiny", dtype="bfloat16", quant=quant)
    plain = br.load("tiny", dtype="bfloat16", quant=quant, pack=False)
    owners = [m for m in prepared.model.modules() if isinstance(m, kernels.KernelOwner) and m.decision]
    posed = [m for m in plain.model.modules() if isinstance(m, kernels.KernelOwner)
             and m.kernel_problem(torch.bfloat16) is not None]
    assert owners and len(owners) == len(posed)  # every matmul with a role got its kernel at load
    for owner in owners:
        served = set(owner.decision.serves.values())
        assert served <= {t.name for t in owner.decision.trials if t.correct}
        assert set(owner.kernels) == served
        for kernel in owner.kernels.values():
            for name in kernel.drops:
                if name not in owner.KEEPS:
                    assert name not in dict(owner.named_parameters(recurse=False))  # held once
    a, b = prepared.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in b)
    ids = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 8, 1, 2, 77, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ours, theirs = prepared.logits(ids, mask), plain.logits(ids, mask)
    assert relative_error(ours, theirs.double()) < 2e-2  # both probed kernels, of bfloat16 compute
    dropped = any(k.drops for m in owners for k in m.kernels.values())
    assert (roofline.weight_bytes(prepared.model) == roofline.weight_bytes(plain.model)) or dropped


@pytest.mark.parametrize("quant,forced", [(None, "dense16=native-tiled-avx512-bf16"),
                                          ("w8a8", "w8a8=native-tiled-avx512-vnni")])
def test_a_tied_head_taken_over_by_a_kernel_looks_its_rows_up_there(monkeypatch, quant, forced):
    """A tied head may be served by a kernel that holds the weight in its own layout, without a copy
    of it, only if the kernel looks rows up (the outer products' blocks: bfloat16, and W8A8's int8
    rows): guards lookups reading a weight that is gone, rows gathered from the wrong column of a
    block, the head holding its weight twice, and `state_dict` (what `weights quant` writes)
    missing the tied weight."""
    from bloom_runtime.kernels import native

    variant = forced.split("native-tiled-")[1]
    why = native.unavailable(variant)
    if why:
        pytest.skip(f"these outer products need the {variant} variant: {why}")
    monkeypatch.setenv(sel.FORCE_ENV, forced)
    tiled = br.load("tiny", dtype="bfloat16", quant=quant)
    plain = br.load("tiny", dtype="bfloat16", quant=quant, pack=False)
    head, name = tiled.model.word_embeddings, forced.split("=")[1]
    assert set(head.kernels) == {name} and "weight" not in dict(head.named_parameters())
    last = plain.model.word_embeddings.weight.shape[0] - 1
    ids = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 8, 1, 2, 77, last]])
    assert torch.equal(head(ids), plain.model.word_embeddings(ids))
    a, b = tiled.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in b)
    mask = torch.ones_like(ids)
    assert relative_error(tiled.logits(ids, mask), plain.logits(ids, mask).double()) < 2e-2


def test_a_released_linear_gets_its_weight_back_exactly():
    torch.manual_seed(0)
    linear = Linear(96, 80, "column").to(torch.bfloat16).requires_grad_(False)
    weight = linear.weight.clone()
    x = torch.randn(2, 7, 96, dtype=torch.bfloat16)
    linear.prepare_kernels(torch.bfloat16)
    y = linear(x)
    linear.release_kernels()
    assert torch.equal(linear.weight, weight) and linear.decision is None
    assert relative_error(y, linear(x).double()) < 2e-2


def test_info_prints_each_candidate_its_verdict_and_what_serves():
    out = subprocess.run([sys.executable, "-m", "bloom_runtime", "info", "--dtype", "bfloat16", "--quant",
                          "w8a8"], capture_output=True, text=True, timeout=300, check=True).stdout
    assert "kernels on this machine (bfloat16, w8a8, cpu" in out
    for name in ("onednn-u8", "onednn-u8-split", "int_mm", "float32"):
        assert name in out
    assert "serves rows" in out and "w8a8 cpu bfloat16 144x144" in out


CAPPED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_VERBOSE": "1"}
CAP_PROBE = r"""
import torch
from bloom_runtime.kernels import Problem, probe
print("aten", torch.backends.cpu.get_cpu_capability())
decision = probe(Problem("w8a8", "cpu", "float32", 64, 1024))
print("verdict", {t.name: t.correct for t in decision.trials})
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or "avx2" not in
                    open("/proc/cpuinfo").read(), reason="the AVX2 cap needs an x86 CPU with AVX2")
def test_the_avx2_cap_reaches_both_dispatchers_and_the_probe_sees_saturation():
    """What `.ci/run`'s capped pass relies on: that the caps do cap (oneDNN says its ISA, aten its
    capability), and that under them oneDNN's one-call u8 GEMM saturates and is rejected while
    the split form is exact (the AVX2-only EPYC case, on any x86 machine)."""
    env = {**os.environ, **CAPPED, sel.CACHE_ENV: "off"}
    run = subprocess.run([sys.executable, "-c", CAP_PROBE], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    out = run.stdout + run.stderr
    assert "aten AVX2" in out
    isa = [line for line in out.splitlines() if "info,cpu,isa:" in line]
    assert isa and "AVX2" in isa[0] and "512" not in isa[0], isa
    verdict = eval(next(line for line in out.splitlines() if line.startswith("verdict"))[len("verdict "):])
    assert verdict["onednn-u8"] is False and verdict["onednn-u8-split"] is True, verdict


def test_probe_problems_are_hashable_keys():
    problem = Problem("w4a16", "cpu", "bfloat16", 8, 256, group=128)
    assert problem.key() == "w4a16 cpu bfloat16 8x256 g128"
    assert dataclasses.replace(problem, copies=False).key().endswith("no-copy")
