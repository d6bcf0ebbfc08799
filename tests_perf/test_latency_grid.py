"""The latency suite: the guide's 2^5..2^10 grid on the embedded model, a reduced grid on
random:bloom-560m, side by side with the peers. Nothing here asserts a time: only what must
hold on any machine (every case present, exports valid, figures consistent with each other,
ratios computed from the same run).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pandas as pd
import pytest

from bloom_runtime.bench import cases, harness
from bloom_runtime.bench.metrics import GUIDE_COLUMNS

pytestmark = pytest.mark.perf
PEERS = ("hf", "ctranslate2", "llamacpp")
SINGLE_SEQUENCE = {"llamacpp"}  # peers that run batch 1 only


@pytest.fixture()
def peers() -> tuple[str, ...]:
    """Every peer; a missing one is a skip that says so, never a grid quietly run without it."""
    for module, install in (("ctranslate2", "pip install -e '.[peers]'"),
                            ("llama_cpp", "tools/install_llamacpp.sh")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({install}): the grid compares every peer")
    return PEERS


def runs_case(engine: str, batch: int) -> bool:
    return batch == 1 or engine not in SINGLE_SEQUENCE


@pytest.fixture(scope="module")
def peer_cache(tmp_path_factory):
    """The peers' conversions, shared by this module's runs and removed after them: bloom-560m's
    GGUF, CTranslate2 and checkpoint files take about 5 GB, which pytest would otherwise keep in
    each of its last three base directories."""
    cache = tmp_path_factory.mktemp("peer-cache")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture()
def run(tmp_path, peer_cache):
    def measure(name, **kwargs):
        opts = harness.PerfOptions(output=tmp_path / f"{name}.csv", cache=peer_cache, **kwargs)
        rows, meta, _ = harness.run(opts, progress=False)
        return opts, rows, meta

    return measure


def check_exports(opts, rows, meta, engines):
    stem = opts.output.with_suffix("")
    csv = pd.read_csv(stem.with_suffix(".csv"))
    assert list(csv.columns[: len(GUIDE_COLUMNS)]) == GUIDE_COLUMNS
    expected = {(e, c.key) for e in engines for c in opts.cases if runs_case(e, c.batch)}
    assert not any("FAILED" in described for described in meta["peers"].values()), meta["peers"]
    assert set(zip(csv["engine"], csv["case"])) == expected
    payload = json.loads(stem.with_suffix(".json").read_text())
    for key in ("model", "dtype", "quant", "tp", "device", "machine", "versions", "grid_average", "results"):
        assert key in payload, key
    assert len(payload["results"]) == len(expected)
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return csv


def check_consistency(csv: pd.DataFrame) -> None:
    for row in csv.to_dict("records"):
        n = row["OutputSeqLen(Decoding)"]
        # e2e = first + (n - 1) * next, by the definitions, up to the spread of the repeats
        predicted = row["mean_ttft_ms"] + (n - 1) * row["mean_tpot_ms"]
        assert math.isclose(row["mean_e2el_ms"], predicted, rel_tol=1e-6), row["case"]
        assert math.isclose(row["mean_itl_ms"], row["mean_tpot_ms"], rel_tol=1e-6), row["case"]
        assert row["median_ttft_ms"] > 0 and row["median_tpot_ms"] > 0
        assert row["memory_bandwidth_GBps"] > 0.1, row  # every engine's case, peers' too (in GB/s, not B/s)
        assert row["p99_itl_ms"] >= row["median_itl_ms"] - 1e-9
        assert math.isclose(row["TimeTotal(s)"] * 1e3, row["median_e2el_ms"])
        assert math.isclose(row["ThroughputE2E(tokens/s)"], row["Batch"] * n / row["TimeTotal(s)"])


def check_ratios(csv: pd.DataFrame, peers) -> None:
    for _, group in csv.groupby("case"):
        ours = group[group.engine == "bloom-runtime"].iloc[0]
        for peer in (p for p in peers if runs_case(p, ours["Batch"])):
            theirs = group[group.engine == peer].iloc[0]
            for figure in ("tpot", "ttft"):
                expected = ours[f"median_{figure}_ms"] / theirs[f"median_{figure}_ms"]
                assert math.isclose(ours[f"ratio_{figure}_vs_{peer}"], expected)
        assert ours["tpot_x_bandwidth_limit"] > 0 and ours["ttft_x_compute_limit"] > 0


def test_full_guide_grid_on_embedded_model_with_peers(run, peers):
    grid = cases.from_ranges([1], (5, 10), (5, 10))
    assert len(grid) == 36
    opts, rows, meta = run("tiny", cases=grid, compare=peers, warmup=0, repeat=2)
    csv = check_exports(opts, rows, meta, ("bloom-runtime", *peers))
    check_consistency(csv)
    check_ratios(csv, peers)
    assert set(meta["grid_average"]) == {"bloom-runtime", *peers}


def test_reduced_grid_on_bloom_560m_with_peers(run, peers):
    grid = cases.from_pairs([1, 2], [32, 64], [8, 8])
    opts, rows, meta = run("560m", model="random:bloom-560m", dtype="bfloat16", cases=grid,
                           compare=peers, warmup=1, repeat=2)
    csv = check_exports(opts, rows, meta, ("bloom-runtime", *peers))
    check_consistency(csv)
    check_ratios(csv, peers)


@pytest.mark.parametrize("quant", ["w8a8", "w4a16"])
def test_low_bit_schemes_on_bloom_560m_with_peers(run, peers, quant):
    """The int8 and int4 paths against CTranslate2 int8 and llama.cpp Q8_0 / Q4_0, batch 1 and 2."""
    grid = cases.from_pairs([1, 2], [32], [8])
    opts, rows, meta = run(quant, model="random:bloom-560m", dtype="bfloat16", quant=quant,
                           cases=grid, compare=peers, warmup=1, repeat=2)
    csv = check_exports(opts, rows, meta, ("bloom-runtime", *peers))
    check_consistency(csv)
    check_ratios(csv, peers)
    kind = "Q8_0" if quant == "w8a8" else "Q4_0"
    assert f"{kind}, batch 1 only; built for: " in meta["peers"]["llamacpp"]


CRASHING_PEER = r"""
import json, os, signal, sys
spec = json.loads(sys.stdin.read())
print(json.dumps({"describe": "a peer built for another CPU"}), flush=True)
os.kill(os.getpid(), signal.SIGILL)
"""


def test_a_peer_that_crashes_is_a_reported_failure_not_a_dead_run(tmp_path, run, monkeypatch):
    """Guards the SIGILL that killed pytest on an AVX2 EPYC (llama.cpp built for AVX-512): the
    peer's process dies, ours and the report live on, and the metadata says what happened."""
    import sys

    from bloom_runtime.bench import isolated

    monkeypatch.setattr(isolated, "CHILD", [sys.executable, "-c", CRASHING_PEER])
    grid = cases.from_pairs([1], [8], [4])
    opts, rows, meta = run("crash", cases=grid, compare=("llamacpp",), warmup=0, repeat=1)
    assert [row["engine"] for row in rows] == ["bloom-runtime"]
    assert meta["peers"]["llamacpp"] == "a peer built for another CPU: FAILED, crashed with SIGILL " \
        "(an instruction this CPU lacks: rebuild it here)"
    assert json.loads((tmp_path / "crash.json").read_text())["peers"] == meta["peers"]


def test_each_case_is_written_when_it_finishes(tmp_path, run, monkeypatch):
    from bloom_runtime.bench import runners

    real = runners.OursRunner.arrivals
    calls = []

    def interrupted(self, ids, seq_out):
        calls.append(ids.shape[1])
        if ids.shape[1] == 64:
            raise KeyboardInterrupt
        return real(self, ids, seq_out)

    monkeypatch.setattr(runners.OursRunner, "arrivals", interrupted)
    grid = cases.from_pairs([1], [32, 64], [4, 4])
    with pytest.raises(KeyboardInterrupt):
        run("cut", cases=grid, warmup=0, repeat=1)
    kept = pd.read_csv(tmp_path / "cut.csv")
    assert list(kept["case"]) == ["b1_in32_out4"]
