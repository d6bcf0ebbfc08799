"""The embedded model is a real checkpoint: transformers reads it, tools/ remakes it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomForCausalLM

import bloom_runtime as br
from bloom_runtime.agreement import relative_error
from bloom_runtime.embedded import TINY_DIR

ROOT = Path(__file__).parents[1]


def test_embedded_model_matches_transformers_on_a_chinese_prompt():
    engine = br.load()
    ids, mask = engine.tokenizer.encode_batch(["以下是中国关于计算机网络考试的单项选择题", "The answer is"])
    reference = BloomForCausalLM.from_pretrained(TINY_DIR).eval()
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).logits
    assert relative_error(engine.logits(ids, mask), ref, mask) <= 1e-5


def test_tokenizer_round_trips_and_answer_letters_are_single_tokens():
    tokenizer = br.load().tokenizer
    text = "以下是中国关于高等数学考试的单项选择题，请选出其中的正确答案。\nA. 网络\n答案：B"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for letter in "ABCD":
        assert len(tokenizer.encode(letter)) == 1


def _train(out: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_tiny.py"), "--output", str(out),
                           "--steps", str(steps)],
                          capture_output=True, text=True)


def _untrained(vocab_size: int) -> dict[str, torch.Tensor]:
    """The weights train_tiny.py starts from (seed 0), before any step."""
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "tools" / "train_tiny.py")
    sys.path.insert(0, str(ROOT / "tools"))  # it imports tiny_exam beside it
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module.new_model(vocab_size, seed=0).state_dict()


def test_train_tiny_remakes_the_exam_and_tokenizer_and_trains_deterministically(tmp_path):
    """A few steps of tools/train_tiny.py: the exam and tokenizer it writes are the shipped
    ones byte for byte, the checkpoint loads in transformers, the weights moved from where they
    started, and a rerun gives the same weights up to float reduction order: CPU training is not
    bitwise repeatable (one CI run saw two 3-step runs differ by 1.1e-4 at most, 3.6e-9 on
    average), while a change of seed or data order moves every weight by ~1e-3 (the learning
    rate) or more."""
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        done = _train(out, 3)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (first / "tokenizer.json").read_text() == (TINY_DIR / "tokenizer.json").read_text()
    shipped = sorted(p.relative_to(TINY_DIR) for p in (TINY_DIR / "ceval").rglob("*") if p.is_file())
    made = sorted(p.relative_to(first) for p in (first / "ceval").rglob("*") if p.is_file())
    assert made == shipped and len(shipped) == 1 + 3 * 12
    assert all((first / p).read_bytes() == (TINY_DIR / p).read_bytes() for p in shipped)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == load_file(TINY_DIR / "model.safetensors").keys()
    drift = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert drift.mean() <= 1e-6 and drift.max() <= 1e-3
    untrained = _untrained(len(json.loads((first / "tokenizer.json").read_text())["model"]["vocab"]))
    learned = torch.cat([(a[k] - untrained[k]).abs().flatten() for k in a])
    assert learned.mean() >= 1e-3, f"3 steps moved the weights by {learned.mean():.1e} on average"
    BloomForCausalLM.from_pretrained(first)
    again = _train(first, 1)
    assert again.returncode != 0 and "--force" in again.stderr


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_generate_text_runs_in_every_dtype(name):
    texts = br.load(dtype=name).generate_text(["以下是中国关于计算机网络考试的单项选择题"], max_new_tokens=4)
    assert len(texts) == 1 and isinstance(texts[0], str)
