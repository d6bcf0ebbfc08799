"""The batching core: a sequence's tokens do not depend on what it was batched with.

Every schedule hypothesis draws (sequences arriving at any step, prefilled alone or together,
before a step or inside its forward, beside others of any prompt and output lengths, some
cancelled at any time) must give each sequence the tokens it gets alone:
- float32: greedy and seeded sampling, identical tokens and finish reasons;
- bfloat16 and W8A8: identical up to the first token where the lone run's two most likely
  tokens are within TIE of each other (rounding may pick either), and, before it, each
  chosen token's log-probability within LOGPROB_TOLERANCE of the lone run's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_checkpoints import hf_model, save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bloom_runtime as br
from bloom_runtime.batching import CANCELLED, Sequence
from bloom_runtime.sampling import GenerationConfig

VOCAB, CONTEXT = 300, 96
# nats. bfloat16 logits of this model reach |8..16|, where bfloat16 steps by 1/16: four steps.
# W8A8 runs in float32 around its int8 GEMMs (row counts change only float rounding).
LOGPROB_TOLERANCE = {"bfloat16": 0.25, "w8a8": 0.05}
TIE = LOGPROB_TOLERANCE  # a token may differ only where the lone run's top two are this close


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(hf_model(seed=31, vocab_size=VOCAB, hidden_size=64, n_head=4, n_layer=3),
                tmp_path_factory.mktemp("batching"))


@pytest.fixture(scope="module")
def engines(checkpoint):
    return {"float32": br.load(checkpoint, max_seq_len=CONTEXT),
            "bfloat16": br.load(checkpoint, dtype="bfloat16", max_seq_len=CONTEXT),
            "w8a8": br.load(checkpoint, quant="w8a8", max_seq_len=CONTEXT)}


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    config: GenerationConfig
    seed: int | None
    arrival: int  # the step before which it is admitted
    together: bool  # prefilled with the others arriving at that step, or alone
    fused: bool  # prefilled inside that step's forward (batch.step(admitting=...)), or before it
    cancel_after: int | None  # evicted once it has this many tokens


@st.composite
def requests(draw) -> Request:
    prompt = tuple(draw(st.lists(st.integers(4, VOCAB - 1), min_size=1, max_size=30)))
    max_new = draw(st.integers(1, 12))
    sample = draw(st.booleans())
    config = GenerationConfig(max_new_tokens=max_new, do_sample=sample, temperature=1.3, top_k=50,
                              eos_token_id=draw(st.sampled_from([None, 7])), logprobs=2)
    cancel = draw(st.one_of(st.none(), st.integers(1, max_new)))
    return Request(prompt, config, draw(st.integers(0, 2**31)) if sample else None,
                   draw(st.integers(0, 8)), draw(st.booleans()), draw(st.booleans()), cancel)


def alone(engine: br.Engine, request: Request) -> Sequence:
    batch = engine.batch(1, 8)
    seq = engine.sequence(list(request.prompt), request.config, request.seed)
    batch.admit([seq])
    while batch.sequences:
        batch.step()
    return seq


def scheduled(engine: br.Engine, schedule: list[Request]) -> list[Sequence]:
    """Run `schedule` through one batch (its cache starting small, so it grows and compacts)."""
    batch = engine.batch(len(schedule), 4)
    seqs = [engine.sequence(list(r.prompt), r.config, r.seed) for r in schedule]
    for step in range(200):
        arriving = [(r, s) for r, s in zip(schedule, seqs) if r.arrival == step]
        together = [s for r, s in arriving if r.together and not r.fused]
        for group in [together] * bool(together) + [[s] for r, s in arriving if not (r.together or r.fused)]:
            batch.admit(group)
        for r, s in zip(schedule, seqs):
            if s in batch.sequences and r.cancel_after is not None and len(s.tokens) >= r.cancel_after:
                batch.evict(s)
        if step > max(r.arrival for r in schedule) and not batch.sequences:
            return seqs
        batch.step(admitting=[s for r, s in arriving if r.fused])
    raise AssertionError("the schedule did not finish in 200 steps")


def check_same(seq: Sequence, solo: Sequence, kind: str) -> None:
    n = len(seq.tokens)
    assert seq.finish_reason == CANCELLED or seq.finish_reason == solo.finish_reason
    if seq.finish_reason == CANCELLED:
        assert n <= len(solo.tokens)
    else:
        assert n == len(solo.tokens)
    for i in range(n):
        if seq.tokens[i] != solo.tokens[i]:
            assert kind != "float32", f"token {i}: {seq.tokens[i]} batched, {solo.tokens[i]} alone"
            (_, first), (_, second) = solo.logprobs[i].top
            assert first - second <= TIE[kind], f"{kind}: token {i} differs with a margin of {first - second}"
            return  # after a tie the histories differ: nothing more to compare
        if kind != "float32":
            gap = abs(seq.logprobs[i].logprob - solo.logprobs[i].logprob)
            assert gap <= LOGPROB_TOLERANCE[kind], f"{kind}: token {i} log-probability off by {gap:.3f}"


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "w8a8"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=st.lists(requests(), min_size=1, max_size=6))
def test_a_sequence_gets_its_lone_tokens_in_any_schedule(engines, kind, schedule):
    engine = engines[kind]
    for request, seq in zip(schedule, scheduled(engine, schedule)):
        check_same(seq, alone(engine, request), kind)


def test_rows_that_leave_cost_nothing_and_the_cache_stays_bounded(engines):
    """400 steps of short sequences (at most 34 tokens) coming and going through 4 rows: the
    columns a step attends over stay under twice the longest possible row (the columns before
    every live row are dropped), where keeping them would grow with every step taken."""
    engine = engines["float32"]
    batch = engine.batch(4, 8)
    g = torch.Generator().manual_seed(0)
    longest = 19 + 15
    for step in range(400):
        while batch.free_rows:
            prompt = torch.randint(4, VOCAB, (int(torch.randint(1, 20, (), generator=g)),), generator=g)
            config = GenerationConfig(max_new_tokens=int(torch.randint(1, 16, (), generator=g)))
            batch.admit([engine.sequence(prompt.tolist(), config, None)])
        batch.step()
        assert batch.end <= 2 * longest + 1, f"step {step}: {batch.end} columns in use"
    assert batch.cache.max_len <= 2 * (2 * longest + 1), f"the cache grew to {batch.cache.max_len} columns"


def test_a_group_prefills_its_own_tokens_not_a_padded_rectangle(engines, monkeypatch):
    """Guards the server's admissions against padding: prompts of 5, 5 and 30 tokens prefill 40
    token rows, not 3 x 30 (a server admits every length; left-padding them cost up to twice the
    prefill), with the lone tokens still (the hypothesis test above checks every schedule)."""
    engine = engines["float32"]
    rows = []
    real = engine.model.forward_segments

    def counting(segments, last_only=False):
        rows.append(sum(segment.tokens for segment in segments))
        return real(segments, last_only)

    monkeypatch.setattr(engine.model, "forward_segments", counting)
    config = GenerationConfig(max_new_tokens=3)
    prompts = [[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], list(range(10, 40))]
    batch = engine.batch(4, 8)
    seqs = [engine.sequence(p, config, None) for p in prompts]
    batch.admit(seqs)
    assert rows == [40]
    late = engine.sequence([4, 5, 6], config, None)
    batch.step(admitting=[late])
    assert rows[-1] == 3 + 3  # three decoding rows and the late prompt's three tokens
    while batch.sequences:
        batch.step()
    monkeypatch.undo()
    for seq, prompt in zip([*seqs, late], [*prompts, [4, 5, 6]]):
        assert seq.tokens == engine.generate(torch.tensor([prompt]), max_new_tokens=3)[0].tolist()


def test_two_live_streams_on_one_engine_do_not_share_a_cache(engines):
    engine = engines["float32"]
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12]])
    expected = engine.generate(a, max_new_tokens=6), engine.generate(b, max_new_tokens=6)
    first, second = engine.stream(a, max_new_tokens=6), engine.stream(b, max_new_tokens=6)
    got = [[], []]
    for x, y in zip(first, second):
        got[0].append(int(x[0]))
        got[1].append(int(y[0]))
    assert got[0] == expected[0][0].tolist() and got[1] == expected[1][0].tolist()


def test_stop_ids_end_a_sequence_and_stop_strings_end_its_text():
    """The core stops on tokens (EOS, stop ids: the token is kept, its finish is "stop"); stop strings
    are text, which generate_text follows, ending the row before the string."""
    engine = br.load("tiny")
    text_prompt = "以下是中国关于计算机网络考试的单项选择题"
    prompt = tuple(engine.tokenizer.encode(text_prompt))
    free = alone(engine, Request(prompt, GenerationConfig(max_new_tokens=12), None, 0, True, False, None))
    assert free.finish_reason == "length"
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=(free.tokens[3],))
    by_id = alone(engine, Request(prompt, config, None, 0, True, False, None))
    assert by_id.tokens == free.tokens[:4] and by_id.finish_reason == "stop"
    text = engine.tokenizer.decode(free.tokens)
    stop = text[len(text) // 2:][:2]
    config = GenerationConfig(max_new_tokens=12, stop=(stop,))
    assert engine.generate_text([text_prompt], generation_config=config) == [text[:text.find(stop)]]
    assert "".join(engine.stream_text(text_prompt, generation_config=config)) == text[:text.find(stop)]


def test_a_sequence_whose_token_cannot_be_chosen_fails_alone(engines, monkeypatch):
    """Row 1's logits turn to NaN: it finishes with an error, and row 0 gets its lone tokens."""
    engine = engines["float32"]
    request = Request((5, 6, 7), GenerationConfig(max_new_tokens=6, do_sample=True, top_p=0.9), 11, 0, True,
                      False, None)
    expected = alone(engine, request)
    forward = engine.model.forward_segments

    def poisoned(segments, **kwargs):
        logits = forward(segments, **kwargs)
        logits[0][1] = float("nan")
        return logits

    batch = engine.batch(2, 8)
    seqs = [engine.sequence(list(request.prompt), request.config, request.seed, key) for key in (0, 1)]
    batch.admit(seqs)
    monkeypatch.setattr(engine.model, "forward_segments", poisoned)
    outputs = batch.step()
    monkeypatch.undo()
    assert [(o.key, o.finish_reason) for o in outputs] == [(0, None), (1, "error")]
    assert outputs[1].token is None and "not finite" in outputs[1].error
    while batch.sequences:
        batch.step()
    assert seqs[0].tokens == expected.tokens and seqs[1].finish_reason == "error"
