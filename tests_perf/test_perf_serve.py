"""`bloom-runtime perf serve`: the load generator's figures, and a run over real servers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bloom_runtime.bench.serve_load import Outcome, random_jobs, summary

pytestmark = pytest.mark.perf


def test_figures_are_vllms_from_the_clients_clock():
    done = [Outcome(True, 10, output_tokens=5, ttft=0.1 * i, itl=[0.01 * i] * 4, latency=1.0 + i)
            for i in range(1, 8)]
    result = summary(done + [Outcome(False, 10, error="HTTP 500: boom")], duration=4.0)
    assert (result["completed"], result["failed"], result["errors"]) == (7, 1, ["HTTP 500: boom"])
    assert result["output_throughput"] == pytest.approx(35 / 4.0)
    assert result["total_token_throughput"] == pytest.approx((35 + 70) / 4.0)
    tpot = [1000 * (o.latency - o.ttft) / 4 for o in done]  # after the first token, per token
    assert result["mean_tpot_ms"] == pytest.approx(np.mean(tpot))
    assert result["p99_ttft_ms"] == pytest.approx(np.percentile([1000 * o.ttft for o in done], 99))
    assert result["median_itl_ms"] == pytest.approx(np.median([1000 * g for o in done for g in o.itl]))


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
    assert "install_vllm_cpu.sh" in rows[("vllm", "failed")]["errors"][0]
    assert {v["peer"] for v in payload["verdicts"]} == set(peers) - {"vllm"}
    assert (tmp_path / "serve.csv").is_file() and (tmp_path / "serve.png").is_file()
    assert "output throughput" in result.stdout


def test_a_bad_load_is_one_line_and_status_2(tmp_path):
    result = perf_serve("--request-rate", "0", "--output", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "--request-rate" in result.stderr and "Traceback" not in result.stderr


def test_random_jobs_spread_lengths_as_vllms_range_ratio():
    fixed = random_jobs(20, 16, 8, vocab_size=100, seed=1)
    assert {len(j.prompt) for j in fixed} == {16} and {j.output_len for j in fixed} == {8}
    spread = random_jobs(400, 100, 50, vocab_size=100, seed=1, range_ratio=0.5)
    inputs, outputs = [len(j.prompt) for j in spread], [j.output_len for j in spread]
    assert min(inputs) >= 50 and max(inputs) <= 150 and max(inputs) - min(inputs) > 80
    assert min(outputs) >= 25 and max(outputs) <= 75 and all(4 <= t < 100 for j in spread for t in j.prompt)
