"""Text as tokens come (detokenize.py): equal to decoding the whole sequence, never taken back,
cut before the first stop string, and in constant work per token.

Token ids are drawn from the embedded tokenizer's whole vocabulary, its single bytes included,
so characters split across tokens (and bytes that never make one) are met.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import bloom_runtime as br
from bloom_runtime.detokenize import Detokenizer

TOKENIZER = br.load("tiny").tokenizer
VOCAB = TOKENIZER.vocab_size
# the embedded model's tokenizer has byte tokens: "中" is three of them, split across tokens below
SPLIT = [TOKENIZER._tok.token_to_id(c) for c in ("ä", "¸", "Ń")]
tokens = st.lists(st.one_of(st.integers(0, VOCAB - 1), st.sampled_from(SPLIT)), min_size=1, max_size=40)


def feed(text: Detokenizer, ids: list[int]) -> list[str]:
    """Feed `ids` one by one; the visible text after each."""
    seen = []
    for token in ids:
        if text.add(token):
            break
        seen.append(text.visible)
    return seen


def test_a_character_split_across_tokens_appears_once_whole():
    assert TOKENIZER.decode(SPLIT) == "中"
    text = Detokenizer(TOKENIZER.decode)
    assert feed(text, SPLIT) == ["", "", "中"]


@settings(max_examples=300, deadline=None)
@given(ids=tokens)
def test_the_text_is_the_whole_decode_and_is_never_taken_back(ids):
    text = Detokenizer(TOKENIZER.decode)
    seen = feed(text, ids)
    final = text.flush()
    assert final == TOKENIZER.decode(ids)
    for before, after in zip(seen, seen[1:] + [final]):
        assert after.startswith(before)


@settings(max_examples=300, deadline=None)
@given(ids=tokens, data=st.data())
def test_the_text_ends_before_the_first_stop_string(ids, data):
    whole = TOKENIZER.decode(ids)
    if not whole:
        return
    start = data.draw(st.integers(0, len(whole) - 1))
    stop = whole[start:start + data.draw(st.integers(1, 4))]
    other = data.draw(st.text(min_size=1, max_size=3))
    text = Detokenizer(TOKENIZER.decode, (other, stop))
    seen = feed(text, ids)
    final = text.flush()
    cut = min(i for i in (whole.find(stop), whole.find(other)) if i >= 0)
    assert text.stopped and final == whole[:cut]
    assert all(final.startswith(shown) for shown in seen)  # nothing of a stop string was shown


def test_a_long_sequence_costs_constant_work_per_token():
    """Bug: re-decoding the whole text each token (quadratic in its length)."""
    decoded = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return TOKENIZER.decode(ids)

    ids = TOKENIZER.encode("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。" * 40)
    text = Detokenizer(decode, ("没有",))
    feed(text, ids)
    assert text.flush() == TOKENIZER.decode(ids)
    assert max(decoded) <= 4, f"a decode of {max(decoded)} tokens for one new token"


def test_an_eos_is_no_text_and_ends_nothing_by_itself():
    """Bug: decoding cut at the first EOS, so with ignore_eos the text stopped while tokens went on."""
    hello, world = TOKENIZER.encode("中国"), TOKENIZER.encode("网络")
    eos = TOKENIZER.eos_token_id
    assert TOKENIZER.decode(hello + [eos] + world) == "中国网络"
    text = Detokenizer(TOKENIZER.decode)
    feed(text, hello + [eos] + world)
    assert text.flush() == "中国网络"
