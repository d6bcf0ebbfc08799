"""Real third-party clients against `bloom-runtime serve` on loopback, from their own venv
(tools/install_clients.sh; CI installs it, elsewhere these skip naming it):

- lm-evaluation-harness scores an exam in C-Eval's layout through the server
  (`--model local-completions`: echo + logprobs, the prompt's log-probabilities) exactly as it
  scores it with `--model hf` on the same checkpoint;
- guidellm runs a rate sweep (streamed, `continuous_usage_stats`, `ignore_eos`) with no errors
  and every request's token counts right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_process import ServerProcess

from bloom_runtime.embedded import TINY_DIR

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = Path(os.environ.get("BLOOM_RUNTIME_CLIENTS", ROOT / ".venv-clients")) / "bin"
SUBJECTS = ["computer_network", "law", "advanced_mathematics"]
QUESTIONS = 8  # per subject (lm-eval's --limit)
LOGLIKELIHOOD_TOLERANCE = 1e-4  # nats: float32 through two implementations, ~1e-5 measured
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
RUN_TIMEOUT_S = 600


def client(name: str) -> Path:
    path = CLIENTS / name
    if not path.exists():
        assert not os.environ.get("CI"), f"CI installs {name} (tools/install_clients.sh)"
        pytest.skip(f"{name} is not installed: bash tools/install_clients.sh")
    return path


def run(command: list, cwd: Path) -> str:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, env={**os.environ, **OFFLINE})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--model", "tiny", "--max-batch-size", "8")
    yield process
    assert process.stop() == 0


def lm_eval_samples(lm_eval: Path, model: str, model_args: str, tasks: Path, out: Path) -> dict:
    """Each request's (log-likelihood, is-greedy) and each question's acc, by (task, question)."""
    names = ",".join(f"ceval-local_{subject}" for subject in SUBJECTS)
    run([lm_eval, "--model", model, "--model_args", model_args, "--include_path", tasks, "--tasks", names,
         "--num_fewshot", "5", "--limit", QUESTIONS, "--output_path", out, "--log_samples",
         "--device", "cpu"], cwd=out.parent)
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("samples_")[1].rsplit("_", 1)[0]
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            scores = [(float(ll), is_greedy == "True") for (ll, is_greedy), in row["resps"]]
            samples[task, row["doc_id"]] = (scores, row["acc"])
    return samples


def test_lm_eval_scores_through_the_server_as_through_transformers(server, tmp_path):
    lm_eval = client("lm_eval")
    tasks = tmp_path / "tasks"
    run([sys.executable, ROOT / "tools" / "lm_eval_tasks.py", TINY_DIR / "ceval", tasks], cwd=tmp_path)
    served = lm_eval_samples(
        lm_eval, "local-completions", f"model=tiny,base_url={server.url}/v1/completions,tokenizer={TINY_DIR},"
        "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1,tokenized_requests=True",
        tasks, tmp_path / "served")
    reference = lm_eval_samples(lm_eval, "hf", f"pretrained={TINY_DIR},dtype=float32", tasks, tmp_path / "hf")
    assert len(served) == len(reference) == len(SUBJECTS) * QUESTIONS
    for key, (scores, acc) in reference.items():
        got, got_acc = served[key]
        assert got_acc == acc, key
        assert [greedy for _, greedy in got] == [greedy for _, greedy in scores], key
        gaps = [abs(a - b) for (a, _), (b, _) in zip(got, scores)]
        assert max(gaps) <= LOGLIKELIHOOD_TOLERANCE, (key, gaps)


def test_a_guidellm_rate_sweep_runs_without_errors(server, tmp_path):
    guidellm = client("guidellm")
    report = tmp_path / "sweep.json"
    run([guidellm, "run", "--backend", f"kind=openai_http,target={server.url},model=tiny,"
         "request_format=/v1/completions", "--profile", "kind=sweep,sweep_size=4",
         "--constraint", "kind=max_requests,count=12",
         "--tokenizer", f"kind=huggingface_auto,model={TINY_DIR}",
         "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
         "--output", f"kind=json,path={report}", "--disable-console-interactive"], cwd=tmp_path)
    benchmarks = json.loads(report.read_text())["benchmarks"]
    assert len(benchmarks) == 4
    for benchmark in benchmarks:
        requests = benchmark["requests"]
        assert not requests["errored"] and not requests["incomplete"]
        assert len(requests["successful"]) == 12
        for request in requests["successful"]:
            assert (request["prompt_tokens"], request["output_tokens"]) == (16, 8)
            assert request["output"] and request["info"]["timings"]["token_iterations"] >= 1
