"""float32 conformance with `transformers.BloomForCausalLM` on the same weights.

Tolerance: relative error <= 1e-5 of the logit scale (max |reference logit|)
on every real token of left-padded batches; greedy tokens identical. The runtime
runs on --device; with --model-path, a real checkpoint is conformed too.
"""

from __future__ import annotations

import pytest
import torch
from hf_checkpoints import hf_model, save
from random_batches import left_padded_batch

import bloom_runtime as br
from bloom_runtime.agreement import relative_error
from bloom_runtime.kv_cache import KVCache

F32_TOLERANCE = 1e-5

CONFIGS = {
    "1-head": dict(n_head=1, hidden_size=32, vocab_size=250),
    "3-heads-post-ln": dict(n_head=3, hidden_size=48, vocab_size=251,
                            apply_residual_connection_post_layernorm=True),
    "6-heads-3-layers": dict(n_head=6, hidden_size=96, vocab_size=333, n_layer=3),
    "16-heads-post-ln": dict(n_head=16, hidden_size=64, vocab_size=250,
                             apply_residual_connection_post_layernorm=True),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory, reference_device, device):
    """(our engine, the HF reference) loaded from one checkpoint directory."""
    fields = CONFIGS[request.param]
    directory = save(hf_model(**fields), tmp_path_factory.mktemp(request.param))
    reference = type(hf_model()).from_pretrained(directory, dtype=torch.float32).eval()
    return br.load(directory, dtype="float32", device=device), reference.to(reference_device), fields


def reference_logits(reference, ids, mask):
    with torch.no_grad():
        dev = reference.device
        return reference(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.cpu()


def test_float32_logits_match_reference_on_left_padded_batch(pair):
    engine, reference, fields = pair
    ids, mask = left_padded_batch(fields["vocab_size"], [17, 9, 1, 13])
    err = relative_error(engine.logits(ids, mask), reference_logits(reference, ids, mask), mask)
    assert err <= F32_TOLERANCE, f"relative error {err:.2e} > {F32_TOLERANCE:.0e}"


def test_greedy_generation_token_identical_to_reference(pair):
    engine, reference, fields = pair
    ids, mask = left_padded_batch(fields["vocab_size"], [12, 7, 12], seed=1)
    new = 40
    with torch.no_grad():
        dev = reference.device
        expected = reference.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
            min_new_tokens=new, do_sample=False, pad_token_id=3,
        )[:, ids.shape[1]:].cpu()  # fmt: skip
    ours = engine.generate(ids, mask, max_new_tokens=new)
    assert torch.equal(ours.cpu(), expected)


def test_kv_cache_path_equals_full_recompute(pair):
    engine, _, fields = pair
    ids, mask = left_padded_batch(fields["vocab_size"], [10, 6], seed=2)
    total = ids.shape[1]
    model, cfg = engine.model, engine.config
    cache = KVCache(cfg.n_layer, 2, cfg.n_head, total, cfg.head_dim, torch.float32, engine.device)
    prompt = 5
    with torch.inference_mode():
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        steps = [model(ids[:, :prompt], mask[:, :prompt], cache, 0)]
        for pos in range(prompt, total):
            steps.append(model(ids[:, pos:pos + 1], mask[:, :pos + 1], cache, pos))
        cached = torch.cat(steps, dim=1)
        full = model(ids, mask)
    valid = mask.clone()
    assert relative_error(cached, full, valid) <= F32_TOLERANCE


def test_left_padded_row_equals_same_row_alone(pair):
    engine, _, fields = pair
    ids, mask = left_padded_batch(fields["vocab_size"], [15, 4], seed=3)
    batch_logits = engine.logits(ids, mask)
    alone_ids = ids[1:, -4:]
    alone_logits = engine.logits(alone_ids)
    assert relative_error(batch_logits[1:, -4:], alone_logits) <= F32_TOLERANCE
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=12)[1:],
                       engine.generate(alone_ids, max_new_tokens=12))


def test_real_checkpoint_matches_transformers(model_path, device, reference_device):
    """--model-path: the user's checkpoint, float32, against transformers on a short batch."""
    engine = br.load(model_path, dtype="float32", device=device)
    reference = type(hf_model()).from_pretrained(model_path, dtype=torch.float32).eval().to(reference_device)
    ids, mask = left_padded_batch(engine.config.vocab_size, [24, 11], seed=4)
    err = relative_error(engine.logits(ids, mask), reference_logits(reference, ids, mask), mask)
    assert err <= F32_TOLERANCE, f"{model_path}: relative error {err:.2e} > {F32_TOLERANCE:.0e}"
