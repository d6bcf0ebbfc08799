"""The llama.cpp peer runs the same network: our GGUF, read by llama.cpp, generates what we do.

A wrong tensor name or a fused QKV left in BLOOM's per-head order would still run,
just as another model: greedy tokens in float32 catch it. The quantized files must
be of the type the run asks for (Q8_0 for int8, Q4_0 for int4), or the comparison
would be with another setting.
"""

from __future__ import annotations

import pytest
import torch
from hf_checkpoints import hf_model, save

import bloom_runtime as br
from bloom_runtime.bench.llamacpp import GGUF, LlamaCppRunner
from bloom_runtime.embedded import TINY_DIR

pytest.importorskip("llama_cpp", reason="the llama.cpp peer is installed by tools/install_llamacpp.sh")
gguf = pytest.importorskip("gguf")


def greedy(runner: LlamaCppRunner, ids: torch.Tensor, n: int) -> list[int]:
    tokens = []
    for token in runner.llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
        tokens.append(token)
        if len(tokens) == n:
            return tokens


def test_llamacpp_generates_our_greedy_tokens_from_our_gguf(tmp_path):
    """In float32 (in bfloat16 both sides round differently and part at near-ties)."""
    ids = torch.randint(5, 1500, (1, 20), generator=torch.Generator().manual_seed(1))
    ours = br.load("tiny").generate(ids, max_new_tokens=16)[0].tolist()
    runner = LlamaCppRunner(TINY_DIR, tmp_path, "float32", None, threads=2, max_tokens=64)
    assert greedy(runner, ids, 16) == ours
    prompts = []  # each timed run must evaluate its prompt: llama-cpp-python reuses a cached prefix
    real = runner.llm.eval
    runner.llm.eval = lambda tokens: prompts.append(len(tokens)) or real(tokens)
    assert [len(runner.arrivals(ids, 5)) for _ in range(2)] == [5, 5]
    assert prompts.count(ids.shape[1]) == 2, prompts


@pytest.mark.parametrize("quant, kind", [("w8a8", "Q8_0"), ("w4a16", "Q4_0")])
def test_quantized_runs_use_the_matching_llamacpp_type(tmp_path, quant, kind):
    checkpoint = save(hf_model(seed=5, n_head=4, hidden_size=128, n_layer=2, vocab_size=1001), tmp_path / "f")
    runner = LlamaCppRunner(checkpoint, tmp_path / "cache", "bfloat16", quant, threads=2, max_tokens=64)
    reader = gguf.GGUFReader(tmp_path / "cache" / f"gguf-{kind}" / GGUF)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == kind and types["blk.1.ffn_down.weight"] == kind
    assert f"{kind}, batch 1 only; built for: " in runner.describe
    assert "AVX" in runner.describe or "NEON" in runner.describe  # what the native build uses
