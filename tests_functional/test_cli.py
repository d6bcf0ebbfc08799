"""The command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

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


def run_with_input(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloom_runtime", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_one_prompt_streams_piece_by_piece_and_joins_to_the_whole():
    """Bug: printing only at the end (or cutting a character in two mid-stream)."""
    engine, prompt = br.load(), "以下是中国关于计算机网络考试的单项选择题"
    pieces = list(engine.stream_text(prompt, max_new_tokens=12))
    assert len(pieces) > 1 and all(piece and "\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == engine.generate_text([prompt], max_new_tokens=12)[0]


def test_several_prompts_are_told_apart_even_with_newlines(tmp_path):
    """Bug: outputs run together; a continuation with a newline looks like two outputs."""
    prompts = ["你好", "答案：", "以下是中国关于计算机网络考试的单项选择题"]
    texts = br.load().generate_text(prompts, max_new_tokens=24)
    assert any("\n" in text for text in texts)  # the case that needs a separator
    from_args = run("generate", "--max-new-tokens", "24", *prompts)
    from_stdin = run_with_input("\n".join(prompts) + "\n\n", "generate", "--max-new-tokens", "24", "-")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts), encoding="utf-8")
    from_file = run("generate", "--max-new-tokens", "24", "--file", str(tmp_path / "prompts.txt"))
    expected = "".join(f"### prompt {i}/3\n{p}{t}\n" for i, (p, t) in enumerate(zip(prompts, texts), 1))
    for result in (from_args, from_stdin, from_file):
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected


def test_prompts_both_on_the_line_and_in_a_file_are_refused(tmp_path):
    (tmp_path / "p.txt").write_text("你好\n", encoding="utf-8")
    result = run("generate", "--file", str(tmp_path / "p.txt"), "你好")
    assert result.returncode == 2 and "not both" in result.stderr


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


def test_version_and_defaults_in_help():
    assert run("--version").stdout.strip() == f"bloom-runtime {br.__version__}"
    for command, default in [("generate", "(default: 32)"), ("precision", "(default: test_result)"),
                             ("perf", "(default: perf_results.csv)"), ("generate", "(default: float32)")]:
        assert default in " ".join(run(command, "--help").stdout.split()), (command, default)


def test_sampling_flags_without_do_sample_warn_and_stay_greedy():
    prompt = "以下是中国关于计算机网络考试的单项选择题"
    result = run("generate", "--max-new-tokens", "4", "--temperature", "0.3", "--top-k", "5", prompt)
    assert result.returncode == 0
    assert result.stderr == ("bloom-runtime: warning: greedy decoding ignores --temperature, --top-k; "
                             "add --do-sample to sample\n")
    assert result.stdout == prompt + br.load().generate_text([prompt], max_new_tokens=4)[0] + "\n"


def test_missing_dataset_directory_is_named_as_such(tmp_path):
    result = run("precision", "--dataset-path", str(tmp_path / "nope"))
    assert result.returncode == 2 and "nope: no such directory" in result.stderr


def test_ctrl_c_during_precision_keeps_answers_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "out"
    record = out / "predictions.jsonl"
    command = [sys.executable, "-m", "bloom_runtime", "precision", "--batch", "1", "--output-dir", str(out)]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # never turns it into KeyboardInterrupt: give the child the default disposition a terminal has.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not record.is_file() or len(record.read_text().splitlines()) < 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    kept = len(record.read_text().splitlines()) - 1  # the first line is the run's settings
    assert proc.returncode == 130
    assert f"interrupted; {kept} answers kept in {out}; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr and 5 <= kept < 480
    again = run("precision", "--output-dir", str(out))  # the batch size is not part of the run's key
    assert again.returncode == 0 and f"resuming: {kept} of 480 answered" in again.stderr


def test_starting_imports_neither_transformers_nor_compressed_tensors():
    """Every command starts by importing bloom_runtime: compressed-tensors (int4 packing) is imported
    where it is used, since importing it imports transformers, 2.6 of the 3.7 s a start took."""
    code = ("import sys, bloom_runtime.cli; "
            "print([m for m in ('transformers', 'compressed_tensors') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
