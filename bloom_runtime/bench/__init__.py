"""The latency harness behind `bloom-runtime perf` and `pytest -m perf`.

For every case (batch, seq_in, seq_out) and every engine (ours, then the peers
asked for), the same random prompt ids are generated from, `warmup` runs are
thrown away and `repeat` runs are timed. Results are exported after every case,
so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

from .. import device as devices
from ..engine import ModelSource, load, parse_dtype
from ..errors import InputError
from ..parallel import world_from_env
from . import export, roofline
from .cases import Case
from .metrics import guide_columns, summarize
from .runners import PEERS, CTranslate2Runner, HFRunner, OursRunner

DEFAULT_CACHE = Path.home() / ".cache" / "bloom-runtime" / "peers"


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


def run(opts: PerfOptions, progress: bool = True) -> tuple[list[dict], dict]:
    """Measure every case on every engine; returns (rows, run metadata) and writes the exports."""
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
    model = _same_checkpoint(opts) if opts.compare else opts.model
    engine = load(model, dtype=opts.dtype, device=opts.device, quant=opts.quant, seed=opts.seed,
                  max_seq_len=max(c.seq_in + c.seq_out for c in opts.cases))
    runners = [OursRunner(engine)] + [_peer(name, Path(model), opts, threads) for name in opts.compare]
    limits = _limits(engine, opts)
    meta = _metadata(opts, engine, threads, limits)
    meta["peers"] = {r.name: getattr(r, "describe", r.name) for r in runners[1:]}
    rows: list[dict] = []
    bar = tqdm(total=len(opts.cases) * len(runners), desc="perf", unit="run", disable=not progress)
    for case in opts.cases:
        ids = torch.randint(4, engine.config.vocab_size, (case.batch, case.seq_in),
                            generator=torch.Generator().manual_seed(opts.seed))  # fmt: skip
        for runner in runners:
            bar.set_postfix_str(f"{runner.name} {case.key}")
            rows.append(_measure(runner, case, ids, opts, engine.device))
            bar.update()
        _add_derived(rows, engine, limits)
        if opts.output is not None and engine.shard.rank == 0:
            _export(rows, meta, opts.output)
    bar.close()
    meta["grid_average"] = grid_average(rows)
    if opts.output is not None and engine.shard.rank == 0:
        _export(rows, meta, opts.output)
    return rows, meta


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


def _add_derived(rows: list[dict], engine, limits: dict) -> None:
    """Per row of ours: roofline multiples, and ratios ours/peer for the same case."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["engine"]] = row
    for engines in by_case.values():
        ours = engines.get(OursRunner.name)
        if ours is None:
            continue
        b, s_in, s_out = ours["Batch"], ours["InputSeqLen(Encoding)"], ours["OutputSeqLen(Decoding)"]
        step_bytes = limits["weight_bytes"] + roofline.kv_bytes(engine.model, b, s_in + s_out // 2)
        ours["tpot_x_bandwidth_limit"] = ours["median_tpot_ms"] / (step_bytes / limits["bandwidth"] * 1e3)
        flops = roofline.prefill_flops(engine.model, b, s_in)
        ours["ttft_x_compute_limit"] = ours["median_ttft_ms"] / (flops / limits["peak_flops"] * 1e3)
        for name, peer in engines.items():
            if name == OursRunner.name:
                continue
            ours[f"ratio_ttft_vs_{name}"] = ours["median_ttft_ms"] / peer["median_ttft_ms"]
            ours[f"ratio_tpot_vs_{name}"] = ours["median_tpot_ms"] / peer["median_tpot_ms"]
            ours[f"ratio_throughput_vs_{name}"] = ours["output_throughput"] / peer["output_throughput"]


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


def _limits(engine, opts: PerfOptions) -> dict:
    compute = torch.int8 if opts.quant in ("w8a8", "w8a8-static") else parse_dtype(opts.dtype)
    return {
        "bandwidth": roofline.memory_bandwidth(engine.device),
        "peak_flops": roofline.matmul_peak(engine.device, compute),
        "weight_bytes": roofline.weight_bytes(engine.model),
    }


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


def _same_checkpoint(opts: PerfOptions) -> str:
    """A directory every engine can load: the model itself, or a random preset written once to the cache."""
    source = ModelSource.resolve(opts.model)
    if source.directory is not None:
        if source.quant_spec is not None or source.config.tp_size > 1:
            raise InputError("--compare needs a float, uncut checkpoint (peers load it as given)")
        return str(source.directory)
    target = opts.cache / f"{opts.model.replace(':', '-')}-seed{opts.seed}"
    if not (target / "config.json").is_file():
        _materialize(opts.model, opts.seed, target)
    return str(target)


def _materialize(model: str, seed: int, target: Path) -> None:
    """Write a random preset as a float32 HF checkpoint (like the preset, with no tokenizer)."""
    from ..weights import staged_output, write_checkpoint

    engine = load(model, dtype="float32", seed=seed)
    with staged_output(target, [], force=True) as staging:
        write_checkpoint(engine, staging, None)
    del engine


def _peer(name: str, directory: Path, opts: PerfOptions, threads: int):
    torch_device = devices.resolve(opts.device)
    if name == "hf":
        return HFRunner(directory, parse_dtype(opts.dtype), torch_device)
    compute = "int8" if opts.quant else str(parse_dtype(opts.dtype)).removeprefix("torch.")
    return CTranslate2Runner(directory, opts.cache / _fingerprint(directory), compute, threads, torch_device)


def _fingerprint(directory: Path) -> str:
    """A cache key that changes when the checkpoint's files do (names, sizes, times)."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"{directory.name}-{hashlib.sha256(repr(stats).encode()).hexdigest()[:12]}"
