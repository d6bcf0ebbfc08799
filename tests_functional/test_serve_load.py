"""The load generator behind `bloom-runtime perf serve`, fast: its figures are vLLM's from the
client's clock (inter-token gaps start after the first token, arrivals are Poisson at the
asked rate), checked against a scripted stream and against numpy, in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import statistics

import httpx
import numpy as np
import pytest

from bloom_runtime.bench.serve_load import Outcome, _one, arrival_gaps, random_jobs, summary

FIRST_S, GAP_S = 0.30, 0.05  # the scripted server: first token after FIRST_S, then one every GAP_S


def test_figures_are_vllms_from_the_clients_clock():
    done = [Outcome(True, 10, output_tokens=5, ttft=0.1 * i, itl=[0.01 * i] * 4, latency=1.0 + i)
            for i in range(1, 8)]
    result = summary(done + [Outcome(False, 10, error="HTTP 500: boom")], duration=4.0)
    assert (result["completed"], result["failed"], result["errors"]) == (7, 1, ["HTTP 500: boom"])
    assert result["output_throughput"] == pytest.approx(35 / 4.0)
    assert result["total_token_throughput"] == pytest.approx((35 + 70) / 4.0)
    tpot = [1000 * (o.latency - o.ttft) / 4 for o in done]  # after the first token, per token
    assert result["mean_tpot_ms"] == pytest.approx(np.mean(tpot))
    assert result["p99_ttft_ms"] == pytest.approx(np.percentile([1000 * o.ttft for o in done], 99))
    assert result["median_itl_ms"] == pytest.approx(np.median([1000 * g for o in done for g in o.itl]))


def scripted(tokens: int) -> httpx.AsyncClient:
    """A client whose server streams `tokens` chunks on a known clock, then usage and [DONE]."""
    async def chunks():
        for i in range(tokens):
            await asyncio.sleep(FIRST_S if i == 0 else GAP_S)
            yield f"data: {json.dumps({'choices': [{'text': 'x', 'index': 0}]})}\n\n".encode()
        yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': tokens}})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_inter_token_gaps_start_after_the_first_token():
    """Bug: the first gap measured from the send (the TTFT counted again as an inter-token gap)."""
    async def measure() -> Outcome:
        async with scripted(6) as client:
            return await _one(client, "http://scripted", "m", [5, 6], 6)

    outcome = asyncio.run(measure())
    assert outcome.ok and outcome.output_tokens == 6
    assert FIRST_S <= outcome.ttft < FIRST_S + 0.2
    assert len(outcome.itl) == 5
    assert all(GAP_S * 0.8 <= gap < GAP_S + 0.15 for gap in outcome.itl), outcome.itl
    assert outcome.latency == pytest.approx(outcome.ttft + sum(outcome.itl), abs=0.05)


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_arrivals_are_poisson_at_the_asked_rate(rate):
    """Bug: sends `rate` seconds apart (1/rate inverted), or evenly spaced. Exponential gaps have
    mean 1/rate and a standard deviation equal to it; 4000 draws put each within 5%."""
    gaps = arrival_gaps(4000, rate, seed=0)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert arrival_gaps(3, float("inf"), seed=0) == [0.0, 0.0, 0.0]


def test_random_jobs_spread_lengths_as_vllms_range_ratio():
    fixed = random_jobs(20, 16, 8, vocab_size=100, seed=1)
    assert {len(j.prompt) for j in fixed} == {16} and {j.output_len for j in fixed} == {8}
    spread = random_jobs(400, 100, 50, vocab_size=100, seed=1, range_ratio=0.5)
    inputs, outputs = [len(j.prompt) for j in spread], [j.output_len for j in spread]
    assert min(inputs) >= 50 and max(inputs) <= 150 and max(inputs) - min(inputs) > 80
    assert min(outputs) >= 25 and max(outputs) <= 75 and all(4 <= t < 100 for j in spread for t in j.prompt)
