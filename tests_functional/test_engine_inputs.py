"""Generation semantics (EOS, sampling, seeds) and every kind of bad input → InputError."""

from __future__ import annotations

import pytest
import torch
from hf_checkpoints import hf_model, save
from random_batches import left_padded_batch

import bloom_runtime as br
from bloom_runtime import InputError

VOCAB = 97


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = save(hf_model(seed=21, vocab_size=VOCAB), tmp_path_factory.mktemp("engine"))
    return br.load(directory, max_seq_len=64)


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch(VOCAB, [8, 3, 6], seed=22)


def test_rows_hold_pad_after_their_eos(engine, batch):
    ids, mask = batch
    free = engine.generate(ids, mask, max_new_tokens=20)
    eos = int(free[1, 4])  # pretend the 5th token of row 1 is EOS
    out = engine.generate(ids, mask, max_new_tokens=20, eos_token_id=eos)
    pad = engine.config.pad_token_id
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        if len(hits) == 0:
            assert torch.equal(out[row], free[row])
            continue
        first = int(hits[0])
        assert torch.equal(out[row, : first + 1], free[row, : first + 1])
        assert (out[row, first + 1:] == pad).all()


def test_sampling_is_reproducible_with_a_seed_and_varies_without(engine, batch):
    ids, mask = batch
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    first = engine.generate(ids, mask, seed=7, **kwargs)
    assert torch.equal(first, engine.generate(ids, mask, seed=7, **kwargs))
    assert not torch.equal(first, engine.generate(ids, mask, seed=8, **kwargs))


def test_top_k_1_and_tiny_top_p_are_greedy(engine, batch):
    ids, mask = batch
    greedy = engine.generate(ids, mask, max_new_tokens=10)
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=10, do_sample=True, top_k=1, seed=0), greedy)
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=0),
                       greedy)


def test_top_k_restricts_samples_to_the_k_most_likely(engine):
    ids = torch.tensor([[5, 6, 7]])
    top = engine.logits(ids)[0, -1].topk(3).indices
    draws = {int(engine.generate(ids, max_new_tokens=1, do_sample=True, top_k=3, temperature=5.0, seed=s))
             for s in range(40)}
    assert draws <= set(top.tolist()) and len(draws) > 1


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda e: e.generate(torch.tensor([[5, VOCAB]])), ["token id 97", "vocabulary"]),
        (lambda e: e.generate(torch.tensor([[-1, 5]])), ["token id -1"]),
        (lambda e: e.generate(torch.zeros(1, 0, dtype=torch.long)), ["non-empty"]),
        (lambda e: e.generate(torch.tensor([[1.0, 2.0]])), ["integer"]),
        (lambda e: e.generate(torch.tensor([[5, 6]]), torch.tensor([[0, 0]])), ["no tokens"]),
        (lambda e: e.generate(torch.tensor([[5, 6]]), torch.tensor([[1, 0]])), ["left"]),
        (lambda e: e.generate(torch.tensor([[5, 6]]), torch.tensor([[1, 2]])), ["0 or 1"]),
        (lambda e: e.generate(torch.tensor([[5, 6]]), torch.tensor([[1, 1, 1]])), ["shape"]),
        (lambda e: e.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=5), ["60", "5", "64"]),
        (lambda e: e.logits(torch.ones(1, 65, dtype=torch.long)), ["65", "64"]),
        (lambda e: e.generate(torch.tensor([[5]]), max_new_tokens=0), ["max_new_tokens"]),
        (lambda e: e.generate(torch.tensor([[5]]), do_sample=True, temperature=0.0), ["temperature"]),
        (lambda e: e.generate(torch.tensor([[5]]), do_sample=True, top_p=1.5), ["top_p"]),
        (lambda e: e.generate(torch.tensor([[5]]), do_sample=True, top_k=-1), ["top_k"]),
        (lambda e: e.generate_text(["hi"]), ["tokenizer"]),
    ],
    ids=["id-too-big", "id-negative", "empty", "float-ids", "all-padding", "right-padding", "mask-values",
         "mask-shape", "beyond-cache", "logits-beyond-max", "zero-new", "temperature", "top-p", "top-k",
         "no-tokenizer"],
)  # fmt: skip
def test_bad_input_raises_input_error(engine, call, words):
    with pytest.raises(InputError) as caught:
        call(engine)
    for word in words:
        assert word in str(caught.value)


def test_empty_prompt_text_is_an_input_error():
    engine = br.load("tiny")
    with pytest.raises(InputError, match="prompt 1 is empty"):
        engine.generate_text(["fine", ""])
    with pytest.raises(InputError, match="non-empty list"):
        engine.generate_text([])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dtype="int4"), ["int4", "float32"]),
        (dict(device="tpu"), ["tpu", "cpu, cuda"]),
        (dict(model="random:bloom-9b"), ["bloom-9b", "bloom-560m"]),
        (dict(model="random:bloom-176b"), ["too large"]),
    ],
)
def test_bad_load_arguments(kwargs, words):
    with pytest.raises(br.BloomRuntimeError) as caught:
        br.load(**kwargs)
    for word in words:
        assert word in str(caught.value)


def test_missing_accelerator_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(InputError, match="no cuda device"):
        br.load(device="cuda")
