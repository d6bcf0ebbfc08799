"""Latency figures from per-token arrival times, named as vLLM's benchmarks name them.

A run yields the times (seconds after the input ids were ready) at which each
new token's ids reached the host. Over the repeats of a case:
TTFT = first arrival; TPOT = (e2e - TTFT) / (n - 1); ITL = gaps between arrivals.
"""

from __future__ import annotations

import statistics

import numpy as np


def summarize(runs: list[list[float]], batch: int) -> dict[str, float]:
    """vLLM-style figures (ms) over `runs`, each the arrival times of one generation."""
    ttft = [r[0] * 1e3 for r in runs]
    e2e = [r[-1] * 1e3 for r in runs]
    tpot = [(r[-1] - r[0]) * 1e3 / (len(r) - 1) for r in runs if len(r) > 1]
    itl = [gap * 1e3 for r in runs for gap in np.diff(r)]
    n = len(runs[0])
    out: dict[str, float] = {}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        if not values:
            continue
        out[f"mean_{name}_ms"] = statistics.fmean(values)
        out[f"median_{name}_ms"] = statistics.median(values)
        out[f"std_{name}_ms"] = statistics.pstdev(values)
        for p in (90, 99):
            out[f"p{p}_{name}_ms"] = float(np.percentile(values, p))
    out["output_throughput"] = batch * n / (out["median_e2el_ms"] / 1e3)  # generated tokens/s
    return out


def guide_columns(figures: dict[str, float], batch: int, seq_in: int, seq_out: int) -> dict[str, float]:
    """The Ascend guide's CSV columns, from medians (its own timing quirks are not copied)."""
    tpot = figures.get("median_tpot_ms", float("nan"))
    return {
        "Batch": batch,
        "InputSeqLen(Encoding)": seq_in,
        "OutputSeqLen(Decoding)": seq_out,
        "TimeOfFirstToken(ms)": figures["median_ttft_ms"],
        "TimePerToken(ms)": tpot,
        "TimeTotal(s)": figures["median_e2el_ms"] / 1e3,
        "Throughput(tokens/s)": batch * 1e3 / tpot,  # decode phase: tokens per second across the batch
        "ThroughputE2E(tokens/s)": figures["output_throughput"],
    }


GUIDE_COLUMNS = [
    "Batch", "InputSeqLen(Encoding)", "OutputSeqLen(Decoding)", "TimeOfFirstToken(ms)",
    "TimePerToken(ms)", "TimeTotal(s)", "Throughput(tokens/s)", "ThroughputE2E(tokens/s)",
]  # fmt: skip
