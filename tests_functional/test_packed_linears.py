"""16-bit linears on CPU may run on weights packed into oneDNN's layout (kernel
"onednn-packed", where this machine's probe finds it correct and fastest).

Packing must change nothing a user can see but speed: the same logits bit for bit,
the same state_dict, the same weight bytes in the roofline, and a weight that comes
back plain. Each test names the bug it guards against; where this CPU cannot pack
(bfloat16 on AVX2) the probe keeps the packed kernel out, and they skip saying so.
"""

from __future__ import annotations

import pytest
import torch

import bloom_runtime as br
from bloom_runtime.bench import roofline
from bloom_runtime.kernels import Problem, probe
from bloom_runtime.kernels.dense import Dense16
from bloom_runtime.kernels.native import NativeKernel
from bloom_runtime.kernels.selection import CACHE_DIR_ENV
from bloom_runtime.model import Linear

PACKED = "dense16=onednn-packed"


@pytest.fixture(scope="module", autouse=True)
def packs_here():
    problem = Problem("dense16", "cpu", "bfloat16", 80, 96)
    if "onednn-packed" not in {t.name for t in probe(problem).trials if t.correct}:
        pytest.skip("oneDNN cannot pack bfloat16 weights on this CPU (the probe keeps it from serving)")


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_linear_equals_the_plain_one(monkeypatch, rows):
    """Guards a wrong layout, a dropped bias or a transposed weight."""
    monkeypatch.setenv("BLOOM_RUNTIME_KERNELS", PACKED)
    torch.manual_seed(0)
    linear = Linear(96, 80, "column").to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    expected = linear(x)
    weight = linear.weight.clone()
    linear.prepare_kernels(torch.bfloat16)
    assert not hasattr(linear, "weight")  # held once: no plain copy left behind
    assert torch.equal(linear(x), expected)
    linear.release_kernels()
    assert torch.equal(linear.weight, weight) and torch.equal(linear(x), expected)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLOOM_RUNTIME_KERNELS", PACKED)
        # the tied head cannot be packed, so the probe picks its kernel: keep that among those that sum
        # as F.linear does (a native kernel's float32 sums differ in the last bit), or equality is luck;
        # in a cache of its own, so that no decision made earlier in this process (perhaps native) serves
        kept = tuple(c for c in Dense16.candidates if not issubclass(c, NativeKernel))
        patch.setattr(Dense16, "candidates", kept)
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("kernels")))
        return br.load("tiny", dtype="bfloat16"), br.load("tiny", dtype="bfloat16", pack=False)


def test_load_packs_bfloat16_block_linears_on_cpu(engines):
    packed, plain = engines
    linears = [m for m in packed.model.modules() if isinstance(m, Linear)]
    assert linears and all(set(m.kernels) == {"onednn-packed"} for m in linears)
    assert all(m.decision is None for m in plain.model.modules() if isinstance(m, Linear))


def test_packed_engine_gives_the_same_logits_and_tokens(engines):
    packed, plain = engines
    ids = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 8, 1, 2, 77, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(packed.logits(ids, mask), plain.logits(ids, mask))
    tokens = [engine.generate(ids, mask, max_new_tokens=6) for engine in engines]
    assert torch.equal(*tokens)


def test_packed_engine_keeps_its_state_dict_and_weight_bytes(engines):
    """Guards `weights quant` writing a model without its float layers' weights, and the
    roofline's bandwidth limit counting only the unpacked parameters."""
    packed, plain = engines
    a, b = packed.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in b)
    assert roofline.weight_bytes(packed.model) == roofline.weight_bytes(plain.model)
