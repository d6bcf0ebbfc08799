"""The latency harness behind `bloom-runtime perf` and `pytest -m perf`.

For every engine (ours in this process, then each peer asked for in a process of
its own, see isolated.py) and every case (batch, seq_in, seq_out), the same random
prompt ids are generated from, `warmup` runs are thrown away and `repeat` runs are
timed. Results are exported after every case, so an interrupted run keeps what it
measured; a peer that fails is reported under "peers" in the metadata with why.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

from .. import device as devices
from ..errors import InputError
from ..loader import load
from ..parallel import world_from_env
from . import export, roofline
from .cases import Case
from .derived import add_derived
from .isolated import run_peer
from .metrics import guide_columns, summarize
from .peers import DEFAULT_CACHE, PEERS, shared_checkpoint
from .runners import OursRunner


@dataclasses.dataclass
class PerfOptions:
    cases: list[Case]
    model: str = "tiny"
    dtype: str = "float32"
    device: str = "cpu"
    quant: str | None = None
    warmup: int = 1
    repeat: int = 3
    compare: tuple[str, ...] = ()
    threads: int | None = None
    output: Path | None = None
    cache: Path = DEFAULT_CACHE
    seed: int = 0


def run(opts: PerfOptions, progress: bool = True) -> tuple[list[dict], dict, bool]:
    """Measure every case on every engine; returns (rows, run metadata, whether this rank is the
    one that reports) and, on that rank, writes the exports."""
    if opts.repeat < 1 or opts.warmup < 0:
        raise InputError(f"--repeat must be >= 1 and --warmup >= 0, got {opts.repeat}, {opts.warmup}")
    unknown = set(opts.compare) - set(PEERS)
    if unknown:
        raise InputError(f"--compare {' '.join(sorted(unknown))}: peers are {', '.join(PEERS)}")
    if opts.compare and world_from_env() > 1:
        raise InputError("--compare runs the peers on one device: leave it out under torchrun")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    model = shared_checkpoint(opts.model, opts.seed, opts.cache) if opts.compare else opts.model
    longest = max(c.seq_in + c.seq_out for c in opts.cases)
    engine = load(model, dtype=opts.dtype, device=opts.device, quant=opts.quant, seed=opts.seed,
                  max_seq_len=longest)
    limits = roofline.limits(engine.model, engine.device, opts.quant, engine.dtype)
    writes = opts.output is not None and engine.shard.is_main
    meta = {**_metadata(opts, engine, threads, limits), "peers": {}}
    rows: list[dict] = []
    bar = tqdm(total=len(opts.cases) * (1 + len(opts.compare)), desc="perf", unit="run", disable=not progress)

    def record(row: dict | None) -> None:
        if row is not None:
            rows.append(row)
            add_derived(rows, engine, limits)
            if writes:
                _export(rows, meta, opts.output)
        bar.update()

    runner, beside = OursRunner(engine), roofline.BandwidthBeside(engine.device)
    for case in opts.cases:
        bar.set_postfix_str(f"{runner.name} {case.key}")
        record(beside.stamp(measure(runner, case, prompt_ids(case, engine.config.vocab_size, opts.seed),
                                    opts.warmup, opts.repeat, engine.device)))
    for name in opts.compare:
        bar.set_postfix_str(name)
        spec = {"name": name, "directory": model, "dtype": opts.dtype, "quant": opts.quant,
                "device": opts.device, "cache": str(opts.cache), "threads": threads, "longest": longest,
                "cases": [dataclasses.asdict(c) for c in opts.cases], "vocab_size": engine.config.vocab_size,
                "seed": opts.seed, "warmup": opts.warmup, "repeat": opts.repeat}  # fmt: skip
        done = bar.n
        result = run_peer(spec, record)
        failed = "" if result.error is None else f": FAILED, {result.error}"
        meta["peers"][name] = result.describe + failed
        bar.update(len(opts.cases) - (bar.n - done))  # the cases a failed peer never reached
    bar.close()
    meta["grid_average"] = grid_average(rows)
    if writes:
        _export(rows, meta, opts.output)
    return rows, meta, engine.shard.is_main


def prompt_ids(case: Case, vocab_size: int, seed: int) -> torch.Tensor:
    """The case's prompt: the same seeded random ids for every engine (ids below 4 are BLOOM's
    special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (case.batch, case.seq_in), generator=generator)


def measure(runner, case: Case, ids: torch.Tensor, warmup: int, repeat: int, device: torch.device) -> dict:
    """One case on one engine: `warmup` runs thrown away, `repeat` timed, and peak memory."""
    for _ in range(warmup):
        runner.arrivals(ids, case.seq_out)
    devices.reset_peak_memory(device)
    runs = [runner.arrivals(ids, case.seq_out) for _ in range(repeat)]
    if any(len(r) != case.seq_out for r in runs):
        raise RuntimeError(f"{runner.name} produced {[len(r) for r in runs]} tokens, expected {case.seq_out}")
    figures = summarize(runs, case.batch)
    return {
        **guide_columns(figures, case.batch, case.seq_in, case.seq_out),
        "engine": runner.name, "case": case.key, **figures,
        "peak_memory_mb": devices.peak_memory_bytes(device) / 2**20,
    }  # fmt: skip


def grid_average(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per engine, the mean over all cases of each figure, as the guide reported 2^5..2^10."""
    df = export.frame(rows)
    numeric = df.drop(columns=["case"]).groupby("engine").mean(numeric_only=True)
    return json.loads(numeric.to_json(orient="index"))


def _export(rows: list[dict], meta: dict, output: Path) -> None:
    df = export.frame(rows)
    stem = output.with_suffix("")
    export.write_csv(df, stem.with_suffix(".csv"))
    export.write_json(df, meta, stem.with_suffix(".json"))
    export.write_plot(df, stem.with_suffix(".png"), f"{meta['model']} {meta['dtype']} "
                      f"{meta['quant'] or ''} tp={meta['tp']} ({meta['machine']['threads']} threads)")


def _metadata(opts: PerfOptions, engine, threads: int, limits: dict) -> dict:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for peer in ("transformers", "ctranslate2"):  # the peers extra: present when a peer may run
        try:
            versions[peer] = importlib.import_module(peer).__version__
        except ImportError:
            pass
    return {
        "model": opts.model, "dtype": opts.dtype, "quant": opts.quant, "tp": engine.shard.world,
        "device": str(engine.device), "warmup": opts.warmup, "repeat": opts.repeat,
        "compare": list(opts.compare), "seed": opts.seed,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": threads, "memory_bandwidth_GBps": limits["bandwidth"] / 1e9,
                    "matmul_peak_GFLOPs": limits["peak_flops"] / 1e9,
                    "weights_on_huge_pages_GB": limits["huge_page_bytes"] / 1e9},
        "versions": versions,
    }  # fmt: skip
