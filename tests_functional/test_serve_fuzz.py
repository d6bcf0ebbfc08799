"""A property-based fuzzer over `/v1/completions`, run against a real server: every field gets
every JSON type (and valid values often enough to reach generation), NaN and infinities,
huge and negative numbers, odd and invalid Unicode, deep and wide nesting, unknown fields,
broken bodies. For each request: no 5xx, an OpenAI error body (short) for any refusal, a
well-formed answer or stream otherwise, and the server healthy. Afterwards it answers a known
request exactly as before. Bounded: `EXAMPLES` requests, each with a timeout, on a context of
`CONTEXT` tokens so that no valid request runs long.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from serve_process import ServerProcess

import bloom_runtime as br
from bloom_runtime.serving.protocol import FIELDS, NEUTRAL, shown

EXAMPLES = 200
CONTEXT = 48
TIMEOUT_S = 60
PROMPT = "以下是中国关于计算机网络考试的单项选择题"
VOCAB = br.load("tiny").config.vocab_size

odd_text = st.text(st.characters(codec=None, categories=None), max_size=12)  # surrogates, controls, ...
numbers = st.one_of(st.integers(-3, 8), st.integers(), st.integers(-(10**400), 10**400),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1e-300, 5e-324, -0.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner,
                                                                                             max_size=3),
                        max_leaves=10)
valid_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=4)
VALID = {  # values a client means: enough of them reach generation
    "model": st.just("tiny"),
    "prompt": st.one_of(st.just(PROMPT), text, valid_ids, st.lists(st.one_of(text, valid_ids), min_size=1,
                                                                  max_size=3)),
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 3), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 2 * VOCAB), "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(text, st.lists(text, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1)),
    "ignore_eos": st.booleans(), "echo": st.booleans(), "stream": st.booleans(), "n": st.integers(1, 4),
    "logprobs": st.integers(0, 5), "user": text,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}),
    **{name: st.sampled_from(neutral) for name, neutral in NEUTRAL.items()},
}
assert set(VALID) == FIELDS | set(NEUTRAL)
# Values that broke servers before, drawn as often as any (hypothesis favours simple values).
# Two stand for what a Python object cannot be written as: 1e400 (JSON reads it as infinity)
# and nesting deeper than any parser recurses; `requests` writes them in.
OVERFLOW, DEEP = "\x00 1e400", "\x00 deep"
RAW = {json.dumps(OVERFLOW).encode(): b"1e400", json.dumps(DEEP).encode(): b"[" * 5000 + b"]" * 5000}
NASTY = [math.nan, math.inf, -math.inf, 1e-300, 5e-324, -0.0, 1e308, 10**400, -(10**400), 10**4000, 2**63,
         2**64, -1, 0, 1, True, False, None, "", "\ud800", "\udfff x", "x" * 5000, "中" * 3000, [], {}, [[]],
         [None], {"a": 1}, ["\ud800"], [-1], [10**30], [2**63], [[-5]], OVERFLOW, DEEP, [DEEP]]
HOSTILE = st.one_of(st.sampled_from(NASTY), anything)
FUZZED: list[int] = []  # the fuzzer's statuses, for the check that it reaches both sides


@st.composite
def bodies(draw) -> dict:
    """A request a client means, half the time with up to two fields given hostile values, and
    maybe a field nobody defines."""
    rest = {name: values for name, values in VALID.items() if name != "prompt"}
    body = draw(st.fixed_dictionaries({"prompt": VALID["prompt"]}, optional=rest))
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2)) if draw(st.booleans()) else []:
        body[name] = draw(HOSTILE)
    if draw(st.integers(0, 9)) == 0:
        body[draw(odd_text)] = draw(anything)
    return body


@st.composite
def requests(draw) -> bytes:
    """A body as a client might send it, or broken: NaN / Infinity as JSON has none, cut short, or
    not an object at all."""
    body = draw(st.one_of(*[bodies()] * 6, anything))
    raw = json.dumps(body, allow_nan=True).encode()
    for stand_in, written in RAW.items():
        raw = raw.replace(stand_in, written)
    return raw[:draw(st.integers(0, len(raw)))] if draw(st.integers(0, 9)) == 0 else raw


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--model", "tiny", "--max-batch-size", "4", "--max-model-len", str(CONTEXT))
    yield process
    assert process.stop() == 0


def known(server: ServerProcess) -> str:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    got = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT_S)
    assert got.status_code == 200, got.text
    return got.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def before(server):
    return known(server)


def check(server: ServerProcess, raw: bytes, health: bool = True, statuses: list[int] | None = None
          ) -> str | None:
    """Send `raw`; what is wrong with the answer, or None: no 5xx, a short OpenAI error body for a
    refusal, a whole stream or answer otherwise, and (`health`) the server still healthy. The
    status is appended to `statuses`."""
    with httpx.stream("POST", server.url + "/v1/completions", content=raw, timeout=TIMEOUT_S,
                      headers={"content-type": "application/json"}) as response:
        content = response.read()
        status, kind = response.status_code, response.headers.get("content-type", "")
    if statuses is not None:
        statuses.append(status)
    if status >= 500:
        return f"{status}: {content[:300]!r}"
    if status != 200:
        error = json.loads(content)["error"]
        if set(error) != {"message", "type", "param", "code"} or not error["message"] or len(content) > 2048:
            return f"a bad error body: {content[:300]!r}"
    elif kind.startswith("text/event-stream"):
        events = [line[6:] for line in content.decode().splitlines() if line.startswith("data: ")]
        if events[-1] != "[DONE]" or any("error" in json.loads(event) for event in events[:-1]):
            return f"a broken stream: {events[-3:]}"
    elif not json.loads(content)["choices"]:
        return f"no choices: {content[:300]!r}"
    if health and httpx.get(server.url + "/health", timeout=10).status_code != 200:
        return "the server is unhealthy after it"
    return None


def test_every_field_takes_every_nasty_value(server, before):
    """Each value of NASTY in each field of an otherwise valid request, streamed every other time."""
    wrong = []
    for i, (name, value) in enumerate((name, value) for name in sorted(VALID) for value in NASTY):
        body = {"prompt": PROMPT, "max_tokens": 1, "stream": bool(i % 2), name: value}
        raw = json.dumps(body, allow_nan=True).encode()
        for stand_in, written in RAW.items():
            raw = raw.replace(stand_in, written)
        problem = check(server, raw, health=False)
        if problem:
            wrong.append(f"{name}={shown(value)}: {problem}")
    assert not wrong, f"{len(wrong)} requests went wrong, the first: " + "; ".join(wrong[:5])
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# No shrinking: against a server it takes many minutes, and the failure names the request anyway.
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=requests())
def test_no_request_breaks_the_server(server, before, raw):
    problem = check(server, raw, statuses=FUZZED)
    assert problem is None, problem


def test_afterwards_a_known_request_answers_as_before(server, before):
    assert known(server) == before
    assert server.metric("bloom_runtime:request_failure_total", reason="error") == 0
    if not FUZZED:
        pytest.skip("the fuzzer did not run in this session (run the module whole)")
    answered = FUZZED.count(200) / len(FUZZED)
    print(f"the fuzzer: {answered:.0%} of {len(FUZZED)} requests answered, the rest refused")
    assert 0.05 <= answered <= 0.95, f"{answered:.0%} answered: the fuzzer reaches one side only"
