"""`pytest -m perf --benchmark-json F`: every case of the guide's grid on the embedded model, in
pytest-benchmark's format, with the harness's figures (vLLM names, guide columns) in extra_info."""

from __future__ import annotations

import pytest

import bloom_runtime as br
from bloom_runtime.bench import cases
from bloom_runtime.bench.metrics import guide_columns, summarize
from bloom_runtime.bench.runners import OursRunner

pytestmark = pytest.mark.perf
GRID = cases.from_ranges([1], (5, 10), (5, 10))


@pytest.fixture(scope="module")
def runner():
    return OursRunner(br.load("tiny"))


@pytest.mark.parametrize("case", GRID, ids=[c.key for c in GRID])
def test_case_latency(benchmark, runner, case):
    import torch

    ids = torch.randint(4, runner.engine.config.vocab_size, (case.batch, case.seq_in),
                        generator=torch.Generator().manual_seed(0))
    runs: list[list[float]] = []
    benchmark.pedantic(lambda: runs.append(runner.arrivals(ids, case.seq_out)), rounds=2, warmup_rounds=1)
    runs = runs[-2:]  # the warm-up round is not a measurement
    figures = summarize(runs, case.batch)
    benchmark.extra_info.update(guide_columns(figures, case.batch, case.seq_in, case.seq_out))
    benchmark.extra_info.update(figures)
    assert all(len(r) == case.seq_out for r in runs)
