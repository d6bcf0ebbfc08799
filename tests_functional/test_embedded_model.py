"""The embedded model is a real checkpoint: transformers reads it, tools/ remakes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compare import relative_error
from safetensors.torch import load_file
from transformers import BloomForCausalLM

import bloom_runtime as br
from bloom_runtime.engine import TINY_DIR

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


def test_make_tiny_reproduces_the_shipped_files(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny.py"), "--output", str(out)],
                   check=True, capture_output=True)
    shipped, remade = load_file(TINY_DIR / "model.safetensors"), load_file(out / "model.safetensors")
    assert shipped.keys() == remade.keys()
    assert all(torch.equal(shipped[k], remade[k]) for k in shipped)
    assert (out / "tokenizer.json").read_text() == (TINY_DIR / "tokenizer.json").read_text()
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny.py"), "--output", str(out)],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "--force" in again.stderr


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_generate_text_runs_in_every_dtype(name):
    texts = br.load(dtype=name).generate_text(["以下是中国关于计算机网络考试的单项选择题"], max_new_tokens=4)
    assert len(texts) == 1 and isinstance(texts[0], str)
