"""The latency harness's arithmetic, in milliseconds, without the perf-marked grid: figures from
arrival times, the case grid, roofline counts (per rank under TP), ratios, the clock of our
runner, and which W8A16 kernel a shape gets."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from bloom_runtime import InputError
from bloom_runtime.bench import cases, roofline
from bloom_runtime.bench.derived import add_derived, ratios
from bloom_runtime.bench.metrics import guide_columns, summarize
from bloom_runtime.bench.runners import OursRunner
from bloom_runtime.config import BloomConfig
from bloom_runtime.loader import skeleton
from bloom_runtime.parallel import SINGLE, Shard

# Two runs of 4 tokens: first token after 100 (120) ms, then one every 50 (40) ms.
RUNS = [[0.100, 0.150, 0.200, 0.250], [0.120, 0.160, 0.200, 0.240]]


def test_figures_from_arrival_times():
    f = summarize(RUNS, batch=2)
    assert f["median_ttft_ms"] == pytest.approx(110.0)
    assert f["mean_tpot_ms"] == pytest.approx(45.0)  # (250-100)/3 and (240-120)/3: the first token excluded
    assert f["median_itl_ms"] == pytest.approx(45.0) and f["p99_itl_ms"] == pytest.approx(50.0)
    assert f["median_e2el_ms"] == pytest.approx(245.0)
    assert f["output_throughput"] == pytest.approx(2 * 4 / 0.245)
    guide = guide_columns(f, batch=2, seq_in=32, seq_out=4)
    assert guide["TimePerToken(ms)"] == pytest.approx(45.0)
    assert guide["Throughput(tokens/s)"] == pytest.approx(2 * 1000 / 45.0)  # decode rate of the batch
    assert guide["TimeTotal(s)"] == pytest.approx(0.245)


class _SlowEngine:
    """Prefill takes 60 ms and each decode step 15 ms, like a real engine's stream."""

    def stream(self, ids, max_new_tokens):
        time.sleep(0.060)
        for step in range(max_new_tokens):
            if step:
                time.sleep(0.015)
            yield torch.zeros(ids.shape[0], dtype=torch.long)


def test_our_clock_starts_before_prefill_and_ticks_per_token():
    arrivals = OursRunner(_SlowEngine()).arrivals(torch.zeros(1, 4, dtype=torch.long), 5)
    assert len(arrivals) == 5
    assert arrivals[0] >= 0.060  # a clock started after prefill would see ~0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0.015 and arrivals[-1] - arrivals[0] < 0.060 + 4 * 0.015 + 0.5


def test_grid_of_cases():
    grid = cases.from_ranges([1, 8], (5, 10), (5, 6))
    assert len(grid) == 2 * 6 * 2 and grid[0] == cases.Case(1, 32, 32) and grid[-1] == cases.Case(8, 1024, 64)
    assert cases.from_pairs([1], [32, 256], [16, 16]) == [cases.Case(1, 32, 16), cases.Case(1, 256, 16)]
    with pytest.raises(InputError, match="2 values.*1"):
        cases.from_pairs([1], [32, 256], [16])
    with pytest.raises(InputError, match="range"):
        cases.from_ranges([1], (6, 5), (5, 5))
    with pytest.raises(InputError, match="batch"):
        cases.from_ranges([0], (5, 5), (5, 5))


CONFIG = BloomConfig(vocab_size=251, hidden_size=48, n_layer=2, n_head=6)


@pytest.mark.parametrize("shard, expected", [
    # 2 * (12 h^2 per layer * 2 layers) * 10 tokens + 2 * (V h) + 2 * 2 * L * s^2 * h / 2
    (SINGLE, 2 * 55296 * 10 + 2 * 251 * 48 + 2 * 2 * 2 * 100 * 48 / 2),
    # rank 0 of 2: half the block weights and heads, ceil(251 / 2) = 126 vocabulary rows
    (Shard(0, 2), 2 * 27648 * 10 + 2 * 126 * 48 + 2 * 2 * 2 * 100 * 24 / 2),
])  # fmt: skip
def test_prefill_flops_are_this_ranks(shard, expected):
    assert roofline.prefill_flops(CONFIG, shard, batch=1, seq_in=10) == expected
    assert roofline.prefill_flops(CONFIG, shard, batch=3, seq_in=10) == 3 * expected


def test_decode_bytes_count_this_ranks_weights_and_cache():
    full, half = skeleton(CONFIG), skeleton(CONFIG, shard=Shard(1, 2))
    params = sum(p.numel() for p in full.parameters())
    assert roofline.weight_bytes(full) == 4 * params
    assert roofline.weight_bytes(half) < 0.55 * roofline.weight_bytes(full)
    # keys + values, per layer, per token: heads * head_dim floats
    assert roofline.kv_bytes(full, batch=2, length=7) == 2 * 2 * 2 * 7 * 6 * 8 * 4
    assert roofline.kv_bytes(half, batch=2, length=7) == 2 * 2 * 2 * 7 * 3 * 8 * 4


def test_ratios_read_below_one_as_faster_for_latency_and_above_for_throughput():
    ours = {"median_ttft_ms": 50.0, "median_tpot_ms": 10.0, "output_throughput": 300.0}
    peer = {"median_ttft_ms": 100.0, "median_tpot_ms": 20.0, "output_throughput": 100.0}
    assert ratios(ours, peer, "x") == {"ratio_ttft_vs_x": 0.5, "ratio_tpot_vs_x": 0.5,
                                       "ratio_throughput_vs_x": 3.0}


def test_a_case_is_held_to_the_bandwidth_sampled_beside_it():
    """`tpot_x_bandwidth_limit` divides by the case's own bandwidth sample where it has one (this VM's
    read bandwidth moves by 2x within minutes, so the run's one sample can be far from the case's), and
    by the run's otherwise. Guards the case's sample ignored, or read in the wrong unit."""
    model = skeleton(CONFIG)
    engine = SimpleNamespace(model=model, config=CONFIG, shard=SINGLE)
    limits = {"weight_bytes": roofline.weight_bytes(model), "bandwidth": 40e9, "peak_flops": 1e12}
    case = {"Batch": 1, "InputSeqLen(Encoding)": 8, "OutputSeqLen(Decoding)": 4, "median_ttft_ms": 5.0,
            "median_tpot_ms": 2.0, "engine": OursRunner.name}
    sampled, unsampled = {**case, "case": "a", "memory_bandwidth_GBps": 10.0}, {**case, "case": "b"}
    add_derived([sampled, unsampled], engine, limits)
    step_ms = (limits["weight_bytes"] + roofline.kv_bytes(model, 1, 8 + 2)) / 1e9 * 1e3  # at 1 GB/s
    assert math.isclose(sampled["tpot_x_bandwidth_limit"], 2.0 / (step_ms / 10))
    assert math.isclose(unsampled["tpot_x_bandwidth_limit"], 2.0 / (step_ms / 40))
