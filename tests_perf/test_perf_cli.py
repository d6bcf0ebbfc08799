"""`bloom-runtime perf` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.perf


def perf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloom_runtime", "perf", *args],
                          capture_output=True, text=True, timeout=600)


def test_pairs_write_csv_json_png_and_print_the_grid_average(tmp_path):
    out = tmp_path / "r.json"
    result = perf("--seqlen-in-pair", "16", "32", "--seqlen-out-pair", "4", "8", "--batch", "1", "2",
                  "--repeat", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "average over the grid" in result.stdout and "bloom-runtime" in result.stdout
    payload = json.loads(out.read_text())
    rows = payload["results"]
    cases = {(r["Batch"], r["InputSeqLen(Encoding)"], r["OutputSeqLen(Decoding)"]) for r in rows}
    assert cases == {(1, 16, 4), (1, 32, 8), (2, 16, 4), (2, 32, 8)}
    assert (tmp_path / "r.csv").is_file() and (tmp_path / "r.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["--seqlen-in-pair", "16", "32", "--seqlen-out-pair", "4"], "--seqlen-out-pair has 1"),
    (["--seqlen-in-range", "7", "5"], "2^A..2^B"),
    (["--batch", "0"], "positive"),
    (["--repeat", "0", "--seqlen-in-pair", "8", "--seqlen-out-pair", "2"], "--repeat"),
])  # fmt: skip
def test_bad_grid_is_one_line_and_status_2(tmp_path, args, words):
    result = perf(*args, "--output", str(tmp_path / "x.csv"))
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def _run_json(path, quant, peers, rows):
    """A perf JSON as `bloom-runtime perf` writes it, reduced to what tools/latency_table.py reads."""
    results = [{"engine": e, "Batch": b, "InputSeqLen(Encoding)": s, "TimePerToken(ms)": tpot,
                "TimeOfFirstToken(ms)": ttft} for e, b, s, tpot, ttft in rows]
    path.write_text(json.dumps({"quant": quant, "dtype": "bfloat16", "peers": peers, "results": results}))
    return str(path)


def test_latency_table_puts_each_engines_figures_in_its_column(tmp_path):
    """Guards the README table against a peer's figures landing under another engine, another
    scheme's row or another run's (the runs below differ in every number), and two runs of a
    scheme raising (each run is a row of its own)."""
    int8 = {"ctranslate2": "ctranslate2 4.8.5 compute_type=int8"}
    w8a8 = _run_json(tmp_path / "a.json", "w8a8", int8, [
        ("bloom-runtime", 1, 32, 30.0, 70.0), ("bloom-runtime", 1, 1024, 33.0, 2000.0),
        ("ctranslate2", 1, 32, 40.0, 90.0), ("ctranslate2", 1, 1024, 55.0, 3000.0)])
    again = _run_json(tmp_path / "a2.json", "w8a8", int8, [
        ("bloom-runtime", 1, 32, 31.0, 71.0), ("bloom-runtime", 1, 1024, 34.0, 2100.0),
        ("ctranslate2", 1, 32, 41.0, 91.0), ("ctranslate2", 1, 1024, 56.0, 3100.0)])
    hf = {"hf": "transformers BloomForCausalLM dtype=torch.bfloat16"}
    bf16 = _run_json(tmp_path / "b.json", None, hf, [
        ("bloom-runtime", 8, 32, 61.0, 500.0), ("bloom-runtime", 8, 1024, 99.0, 9000.0),
        ("hf", 8, 32, 150.0, 800.0), ("hf", 8, 1024, 280.0, 12000.0)])
    png = tmp_path / "t.png"
    result = subprocess.run([sys.executable, "tools/latency_table.py", w8a8, again, bf16, "--png", str(png)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == ("| run | scheme | batch | bloom-runtime next-token ms | ctranslate2 next-token ms | "
                        "hf next-token ms | first token @1024 ms (ours / ctranslate2 / hf) |")
    assert "| a | w8a8 | 1 | 30.0 / 33.0 | 40.0 / 55.0 (int8) | - | 2000 / 3000 / - |" in lines
    assert "| a2 | w8a8 | 1 | 31.0 / 34.0 | 41.0 / 56.0 (int8) | - | 2100 / 3100 / - |" in lines
    assert "| b | bfloat16 | 8 | 61.0 / 99.0 | - | 150.0 / 280.0 (bfloat16) | 9000 / - / 12000 |" in lines
    assert png.stat().st_size > 10_000
