"""`bloom-runtime perf serve`: each server under the same load, one after another in one run, and
the comparison the issue asks for (see `verdicts`).

For each server: a batch-1 baseline (a few requests one at a time: its own TPOT with no
batching), then each request rate of the sweep. Rows go to CSV and JSON as they are measured;
the PNG plots output throughput against p99 TPOT, a curve per server.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .. import files
from ..files import replace_atomically
from ..plotting import pyplot
from .roofline import BandwidthBeside
from .serve_load import Job, random_jobs, run_load
from .servers import Running

BASELINE_PROMPTS = 4


@dataclasses.dataclass(frozen=True)
class Load:
    rates: list[float]
    num_prompts: int
    input_len: int
    output_len: int
    max_concurrency: int | None
    vocab_size: int
    seed: int = 0
    range_ratio: float = 0.0


def measure(servers: dict[str, Callable[[], AbstractContextManager[Running]]], load: Load, output: Path,
            meta: dict, beside: BandwidthBeside | None = None) -> list[dict]:
    """Every server (by name: what starts it) under `load`; rows written to `output` (.csv, .json,
    .png) as they are measured, each with the read bandwidth sampled beside it where `beside` samples
    (servers started on this machine)."""
    jobs = random_jobs(load.num_prompts, load.input_len, load.output_len, load.vocab_size, load.seed,
                       load.range_ratio)
    rows: list[dict] = []
    steps = tqdm(total=len(servers) * (1 + len(load.rates)), desc="perf serve", unit="load")
    for name, start in servers.items():
        try:
            with start() as server:
                meta.setdefault("servers", {})[name] = server.describe
                run_load(server.url, server.model, [Job(jobs[0].prompt, 4)])  # warm up: first calls allocate
                runs = [("batch-1", jobs[:BASELINE_PROMPTS], math.inf, 1)]
                runs += [(f"{rate:g}", jobs, rate, load.max_concurrency) for rate in load.rates]
                for label, chosen, rate, concurrency in runs:
                    result = run_load(server.url, server.model, chosen, rate, concurrency, load.seed)
                    row = {"server": name, "load": label, **result}
                    rows.append(row if beside is None else beside.stamp(row))
                    steps.update()
                    export(rows, meta, output)
        except Exception as err:  # a peer that will not start or crashes is reported, not fatal
            rows.append({"server": name, "load": "failed", "errors": [f"{type(err).__name__}: {err}"[:600]]})
            export(rows, meta, output)
    steps.close()
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """For each peer: the first rate where its p99 TPOT reaches twice its batch-1 TPOT, and our
    output throughput and p99 TTFT against its own at that rate (and static's against ours)."""
    df = pd.DataFrame([r for r in rows if r["load"] != "failed"])
    if df.empty or "ours" not in set(df["server"]):
        return []
    found = []
    for peer in [s for s in df["server"].unique() if s != "ours"]:
        mine = df[df["server"] == peer]
        base = mine[mine["load"] == "batch-1"]["median_tpot_ms"]
        loaded = mine[mine["load"] != "batch-1"]
        over = loaded[loaded["p99_tpot_ms"] >= 2 * base.iloc[0]] if len(base) else loaded.iloc[:0]
        at = over.iloc[0] if len(over) else (loaded.iloc[-1] if len(loaded) else None)
        ours = df[(df["server"] == "ours") & (df["load"] == (at["load"] if at is not None else ""))]
        if at is None or ours.empty:
            continue
        found.append({"peer": peer, "at_rate": at["load"], "peer_batch1_tpot_ms": float(base.iloc[0]),
                      "peer_p99_tpot_ms": float(at["p99_tpot_ms"]), "reached_2x": bool(len(over)),
                      "output_throughput_ratio": float(ours["output_throughput"].iloc[0]
                                                       / at["output_throughput"]),
                      "p99_ttft_ratio": float(ours["p99_ttft_ms"].iloc[0] / at["p99_ttft_ms"])})
    return found


def export(rows: list[dict], meta: dict, output: Path) -> None:
    """CSV and JSON (same columns) and the PNG, each replaced whole."""
    df = pd.DataFrame(rows)
    base = output.with_suffix("")
    replace_atomically(base.with_suffix(".csv"), lambda tmp: df.to_csv(tmp, index=False))
    files.write_json(base.with_suffix(".json"), {**meta, "results": rows, "verdicts": verdicts(rows)})
    _plot(df, base.with_suffix(".png"), meta.get("title", "perf serve"))


def _plot(df: pd.DataFrame, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = df[(df["load"] != "failed") & (df["load"] != "batch-1")] if "load" in df else df.iloc[:0]
    for server, group in measured.groupby("server", sort=False):  # each curve in its rates' order
        ax.plot(group["p99_tpot_ms"], group["output_throughput"], marker="o", label=server)
        for _, row in group.iterrows():
            ax.annotate(row["load"], (row["p99_tpot_ms"], row["output_throughput"]), fontsize=6)
    ax.set_xlabel("p99 time per output token (ms)")
    ax.set_ylabel("output throughput (tokens/s)")
    ax.grid(alpha=0.3)
    if not measured.empty:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
