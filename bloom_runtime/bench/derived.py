"""Figures derived per case from the measured rows: how far ours is from the machine's limits,
and ours / each peer on the same case."""

from __future__ import annotations

from ..engine import Engine
from . import roofline
from .runners import OursRunner


def add_derived(rows: list[dict], engine: Engine, limits: dict) -> None:
    """Per row of ours: roofline multiples (against the bandwidth sampled beside the case where the row
    has it, else the run's), and ratios ours/peer for the same case."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["engine"]] = row
    for engines in by_case.values():
        ours = engines.get(OursRunner.name)
        if ours is None:
            continue
        b, s_in, s_out = ours["Batch"], ours["InputSeqLen(Encoding)"], ours["OutputSeqLen(Decoding)"]
        step_bytes = limits["weight_bytes"] + roofline.kv_bytes(engine.model, b, s_in + s_out // 2)
        bandwidth = 1e9 * ours.get("memory_bandwidth_GBps", limits["bandwidth"] / 1e9)
        ours["tpot_x_bandwidth_limit"] = ours["median_tpot_ms"] / (step_bytes / bandwidth * 1e3)
        flops = roofline.prefill_flops(engine.config, engine.shard, b, s_in)
        ours["ttft_x_compute_limit"] = ours["median_ttft_ms"] / (flops / limits["peak_flops"] * 1e3)
        for name, peer in engines.items():
            if name != OursRunner.name:
                ours.update(ratios(ours, peer, name))


def ratios(ours: dict, peer: dict, name: str) -> dict[str, float]:
    """ours / peer for latency (below 1: we are faster) and throughput (above 1: we are faster)."""
    return {f"ratio_ttft_vs_{name}": ours["median_ttft_ms"] / peer["median_ttft_ms"],
            f"ratio_tpot_vs_{name}": ours["median_tpot_ms"] / peer["median_tpot_ms"],
            f"ratio_throughput_vs_{name}": ours["output_throughput"] / peer["output_throughput"]}
