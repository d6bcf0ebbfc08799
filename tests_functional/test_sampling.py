"""Choosing tokens: top-k and top-p at their boundaries, and the generation settings object.

Milliseconds each: the rules are checked on hand-made logits whose probabilities are
exact in binary, so a boundary off by one token shows.
"""

from __future__ import annotations

import pytest
import torch

import bloom_runtime as br
from bloom_runtime import InputError
from bloom_runtime.sampling import GenerationConfig, next_token, top_p_filter

# probabilities 1/2, 1/4, 3/16, 1/16 (ids 1, 3, 0, 2): cumulative 0.5, 0.75, 0.9375, 1, exact in float32
LOGITS = torch.tensor([[0.1875, 0.5, 0.0625, 0.25]]).log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize("top_p, expected", [
    (0.5, {1}),  # the most likely token alone reaches 0.5
    (0.75, {1, 3}),  # exactly at the boundary: 0.5 + 0.25 reaches 0.75, nothing more is needed
    (0.76, {1, 3, 0}),  # just past it: one more token is needed
    (1e-9, {1}),  # at least one token is always kept
])  # fmt: skip
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(top_p_filter(LOGITS, top_p)) == expected


def sorted_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The rule done the plain way: sort the whole row, keep the prefix whose mass before each
    token is under top_p."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_over_a_bloom_vocabulary_keeps_what_a_whole_sort_keeps(top_p):
    """Peaked rows take the nucleus among the top candidates; flat rows (whose nucleus reaches
    past them) are sorted whole. Bug: taking the candidates' nucleus for a flat row too."""
    flat = torch.randn(3, 250880, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([flat, 8 * flat])  # the same logits, sharpened: nuclei of 1 to ~80 tokens
    kept = torch.isfinite(top_p_filter(rows, top_p))
    assert torch.equal(kept, torch.isfinite(sorted_top_p(rows, top_p)))
    assert kept[:3].sum(dim=-1).min() > 1024 and kept[3:].sum(dim=-1).max() < 1024  # both branches ran


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_exactly_k_tokens(k):
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.7, 1.5]])
    draws = {int(next_token(logits, GenerationConfig(do_sample=True, top_k=k, temperature=50.0),
                            torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == set(logits[0].topk(k).indices.tolist())


@pytest.mark.parametrize("logit_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_takes_the_first_maximum_in_the_logits_dtype(logit_dtype):
    logits = torch.randn(3, 250880, generator=torch.Generator().manual_seed(0)).to(logit_dtype)
    logits[0, [7, 250000]] = 100.0  # a tie: the first index wins, as transformers' argmax picks
    logits[1, 250879] = 100.0  # the last vocabulary entry
    chosen = next_token(logits, GenerationConfig(), None)
    assert chosen.tolist()[:2] == [7, 250879]
    assert torch.equal(chosen, logits.float().argmax(dim=-1))


def test_greedy_ignores_sampling_settings_and_says_which():
    config = GenerationConfig(temperature=0.5, top_p=0.9)
    assert int(next_token(LOGITS, config, None)) == 1
    assert config.ignored_sampling_settings() == ["temperature", "top_p"]
    assert GenerationConfig(do_sample=True, temperature=0.5).ignored_sampling_settings() == []


@pytest.mark.parametrize("settings, words", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
])  # fmt: skip
def test_bad_settings_are_named(settings, words):
    with pytest.raises(InputError, match=words):
        GenerationConfig(**settings)


def test_unknown_keyword_is_named():
    with pytest.raises(InputError, match="max_tokens"):
        GenerationConfig().updated(max_tokens=3)


def test_config_object_and_keywords_are_the_same_request():
    engine = br.load()
    ids = torch.tensor([[5, 6, 7, 8]])
    config = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=5, seed=3)
    by_object = engine.generate(ids, generation_config=config)
    assert torch.equal(by_object, engine.generate(ids, max_new_tokens=6, do_sample=True, top_k=5, seed=3))
    # keywords override the object's fields, as in transformers
    assert engine.generate(ids, generation_config=config, max_new_tokens=2).shape == (1, 2)
