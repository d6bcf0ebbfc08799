"""The command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import bloom_runtime as br


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloom_runtime", *args],
                          capture_output=True, text=True, timeout=300)


def test_generate_on_embedded_model_prints_greedy_continuation():
    prompt = "以下是中国关于计算机网络考试的单项选择题"
    result = run("generate", "--max-new-tokens", "6", prompt)
    assert result.returncode == 0, result.stderr
    expected = br.load().generate_text([prompt], max_new_tokens=6)[0]
    assert result.stdout == prompt + expected + "\n"


def test_info_on_7b1_preset_gives_published_parameter_count():
    result = run("info", "--model", "random:bloom-7b1")
    assert result.returncode == 0, result.stderr
    assert "7,069,016,064" in result.stdout  # bigscience/bloom-7b1's parameter count
    assert "n_head: 32" in result.stdout and "bytes[bfloat16]: 14,138,032,128" in result.stdout


def test_user_mistake_is_one_line_on_stderr_with_status_2(tmp_path):
    result = run("generate", "--model", str(tmp_path / "missing"), "hello")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a directory" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_flag_value_exits_2():
    result = run("generate", "--dtype", "int4", "x")
    assert result.returncode == 2 and "int4" in result.stderr
