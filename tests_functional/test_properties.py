"""Property tests: for any batch shape and padding, each row equals the reference alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_checkpoints import hf_model, save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bloom_runtime as br
from bloom_runtime.agreement import relative_error
from bloom_runtime.tokenizer import left_pad

VOCAB = 123


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = hf_model(seed=31, vocab_size=VOCAB, n_head=6, hidden_size=48)
    return br.load(save(reference, tmp_path_factory.mktemp("prop"))), reference


rows = st.lists(st.lists(st.integers(4, VOCAB - 1), min_size=1, max_size=12), min_size=1, max_size=4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=rows, extra_pad=st.integers(0, 3), new=st.integers(1, 6))
def test_any_left_padded_batch_matches_reference_row_by_row(pair, prompts, extra_pad, new):
    engine, reference = pair
    ids, mask = left_pad(prompts, pad_token_id=3)
    ids, mask = F.pad(ids, (extra_pad, 0), value=3), F.pad(mask, (extra_pad, 0))  # padding in every row
    width = ids.shape[1]
    logits = engine.logits(ids, mask)
    generated = engine.generate(ids, mask, max_new_tokens=new)
    for i, row in enumerate(prompts):
        alone = torch.tensor([row])
        with torch.no_grad():
            ref = reference(input_ids=alone).logits
        assert relative_error(logits[i:i + 1, width - len(row):], ref) <= 1e-5
        assert torch.equal(generated[i], engine.generate(alone, max_new_tokens=new)[0])
