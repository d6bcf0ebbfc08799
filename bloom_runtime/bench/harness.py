"""The latency harness behind `bloom-runtime perf` and `pytest -m perf`.

For every engine (ours, then the peers asked for, each loaded when its turn
comes) and every case (batch, seq_in, seq_out), the same random prompt ids are
generated from, `warmup` runs are thrown away and `repeat` runs are timed.
Results are exported after every case, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import functools
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
from .metrics import guide_columns, summarize
from .peers import DEFAULT_CACHE, PEERS, make_peer, shared_checkpoint
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
    peers = [functools.partial(make_peer, name, Path(model), opts.dtype, opts.quant, opts.device, opts.cache,
                               threads, longest) for name in opts.compare]  # fmt: skip
    limits = roofline.limits(engine.model, engine.device, opts.quant, engine.dtype)
    writes = opts.output is not None and engine.shard.is_main
    meta = _metadata(opts, engine, threads, limits)
    meta["peers"] = {}
    rows: list[dict] = []
    bar = tqdm(total=len(opts.cases) * (1 + len(peers)), desc="perf", unit="run", disable=not progress)
    # Engine by engine, ours first, each peer loaded only when its turn comes: once CTranslate2
    # had run in a process, our decode steps after it were up to 1.4x slower (bloom-560m W8A8,
    # 256 tokens: 59 ms against 42 ms alone).
    for make in [functools.partial(OursRunner, engine), *peers]:
        runner = make()
        if runner.name != OursRunner.name:
            meta["peers"][runner.name] = getattr(runner, "describe", runner.name)
        for case in opts.cases:
            if case.batch > getattr(runner, "max_batch", case.batch):  # said in the metadata's "peers"
                bar.update()
                continue
            ids = torch.randint(4, engine.config.vocab_size, (case.batch, case.seq_in),
                                generator=torch.Generator().manual_seed(opts.seed))  # fmt: skip
            bar.set_postfix_str(f"{runner.name} {case.key}")
            rows.append(_measure(runner, case, ids, opts, engine.device))
            bar.update()
            add_derived(rows, engine, limits)
            if writes:
                _export(rows, meta, opts.output)
        del runner  # a peer's model leaves memory before the next one loads
    bar.close()
    meta["grid_average"] = grid_average(rows)
    if writes:
        _export(rows, meta, opts.output)
    return rows, meta, engine.shard.is_main


def _measure(runner, case: Case, ids: torch.Tensor, opts: PerfOptions, device: torch.device) -> dict:
    for _ in range(opts.warmup):
        runner.arrivals(ids, case.seq_out)
    devices.reset_peak_memory(device)
    runs = [runner.arrivals(ids, case.seq_out) for _ in range(opts.repeat)]
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
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}  # fmt: skip
    try:
        import ctranslate2

        versions["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        pass
    return {
        "model": opts.model, "dtype": opts.dtype, "quant": opts.quant, "tp": engine.shard.world,
        "device": str(engine.device), "warmup": opts.warmup, "repeat": opts.repeat,
        "compare": list(opts.compare), "seed": opts.seed,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": threads, "memory_bandwidth_GBps": limits["bandwidth"] / 1e9,
                    "matmul_peak_GFLOPs": limits["peak_flops"] / 1e9},
        "versions": versions,
    }  # fmt: skip
