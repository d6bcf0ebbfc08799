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
