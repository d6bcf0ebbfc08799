"""`bloom-runtime perf serve`: a run over real servers (the load generator's own arithmetic is
checked fast, in tests_functional/test_serve_load.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.perf


def perf_serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloom_runtime", "perf", "serve", *args],
                          capture_output=True, text=True, timeout=800, env=env)


def test_a_run_measures_each_server_and_reports_one_that_will_not_start(tmp_path, monkeypatch):
    """Ours, static batching and (where built) llama-server on the embedded model, every request
    complete; vLLM pointed at a missing interpreter is a reported failure, not a dead run."""
    monkeypatch.setenv("BLOOM_RUNTIME_VLLM_PYTHON", str(tmp_path / "no-vllm" / "python"))
    built = shutil.which("llama-server") is not None
    assert built or not os.environ.get("CI"), "CI builds llama-server (tools/install_llama_server.sh)"
    peers = ["static", "vllm"] + ["llama-server"] * built
    out = tmp_path / "serve.json"
    load = ["--num-prompts", "6", "--input-len", "16", "--output-len", "6", "--max-batch-size", "4",
            "--peer-cache", str(tmp_path / "cache")]
    result = perf_serve(*load, "--output", str(out), "--compare", *peers)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    rows = {(r["server"], r["load"]): r for r in payload["results"]}
    for server in {"ours", "static", *peers} - {"vllm"}:
        assert rows[(server, "batch-1")]["completed"] == 4 and rows[(server, "inf")]["completed"] == 6
        assert rows[(server, "inf")]["failed"] == 0 and rows[(server, "inf")]["output_throughput"] > 0
        assert math.isfinite(rows[(server, "inf")]["p99_tpot_ms"])
        assert all(rows[(server, load)]["memory_bandwidth_GBps"] > 0.1 for load in ("batch-1", "inf"))  # GB/s
    assert "install_vllm_cpu.sh" in rows[("vllm", "failed")]["errors"][0]
    assert {v["peer"] for v in payload["verdicts"]} == set(peers) - {"vllm"}
    assert (tmp_path / "serve.csv").is_file() and (tmp_path / "serve.png").is_file()
    assert "output throughput" in result.stdout


def test_a_bad_load_is_one_line_and_status_2(tmp_path):
    result = perf_serve("--request-rate", "0", "--output", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "--request-rate" in result.stderr and "Traceback" not in result.stderr
