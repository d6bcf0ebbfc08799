"""A load generator for any OpenAI-compatible completions server, measured as `vllm bench serve`
measures: random token-id prompts, lengths L or drawn in [L(1-r), L(1+r)] (vLLM's
`--random-range-ratio` r), `ignore_eos` so every request makes exactly the tokens it asks for,
Poisson arrivals at a request rate (or all at once under a concurrency cap), every response
streamed, and vLLM's figures from the client's clock.

Bounded: `num_prompts` requests, each with a timeout; a request that fails or times out is
counted as failed, never waited on forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import statistics
import time

import httpx

REQUEST_TIMEOUT_S = 600


@dataclasses.dataclass
class Outcome:
    """One request as the client saw it (times in seconds from its send)."""

    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Job:
    prompt: list[int]
    output_len: int


def random_jobs(count: int, input_len: int, output_len: int, vocab_size: int, seed: int,
                range_ratio: float = 0.0) -> list[Job]:
    """`count` requests of random ids (avoiding the first 4, BLOOM's special tokens), input and
    output lengths uniform in [L(1-r), L(1+r)] (at least 1 and 2), as vLLM's random dataset."""
    rng = random.Random(seed)

    def length(mean: int, least: int) -> int:
        return max(least, rng.randint(round(mean * (1 - range_ratio)), round(mean * (1 + range_ratio))))

    return [Job([rng.randrange(4, vocab_size) for _ in range(length(input_len, 1))], length(output_len, 2))
            for _ in range(count)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int
               ) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    outcome = Outcome(ok=False, prompt_tokens=len(prompt))
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                outcome.error = f"HTTP {reply.status_code}: {(await reply.aread()).decode()[:200]}"
                return outcome
            async for line in reply.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                if data.get("usage"):
                    outcome.output_tokens = data["usage"]["completion_tokens"]
                if not data.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    outcome.ttft = now - start
                else:
                    outcome.itl.append(now - last)
                last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        outcome.error = f"{type(err).__name__}: {err}"
        return outcome
    outcome.latency = time.perf_counter() - start
    outcome.output_tokens = outcome.output_tokens or chunks  # a server without usage: a chunk a token
    outcome.ok = outcome.output_tokens == output_len
    if not outcome.ok:
        outcome.error = f"{outcome.output_tokens} tokens instead of {output_len}"
    return outcome


def arrival_gaps(count: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait after each of `count` sends: a Poisson process of `rate` requests a second
    (exponential gaps of mean 1/rate), or all at once for an infinite rate."""
    rng = random.Random(seed)
    return [rng.expovariate(rate) if math.isfinite(rate) else 0.0 for _ in range(count)]


async def _run(url: str, model: str, jobs: list[Job], rate: float, max_concurrency: int | None,
               seed: int) -> tuple[list[Outcome], float]:
    gate = asyncio.Semaphore(max_concurrency or len(jobs))
    # A connection per request: llama-server closes idle keep-alive connections, and a request
    # sent on one it has just closed fails with "Server disconnected" (seen under CI).
    limits = httpx.Limits(max_connections=max_concurrency or len(jobs), max_keepalive_connections=0)

    async def send(client: httpx.AsyncClient, job: Job) -> Outcome:
        async with gate:
            return await _one(client, url, model, job.prompt, job.output_len)

    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        tasks = []
        for job, gap in zip(jobs, arrival_gaps(len(jobs), rate, seed)):
            tasks.append(asyncio.create_task(send(client, job)))
            if gap:
                await asyncio.sleep(gap)
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - start


def run_load(url: str, model: str, jobs: list[Job], rate: float = math.inf,
             max_concurrency: int | None = None, seed: int = 0) -> dict:
    """Send every job to `url` at `rate` requests/s (inf: all at once) and summarise."""
    outcomes, duration = asyncio.run(_run(url, model, jobs, rate, max_concurrency, seed))
    return summary(outcomes, duration) | {"request_rate": rate, "max_concurrency": max_concurrency}


def summary(outcomes: list[Outcome], duration: float) -> dict:
    """vLLM's serving figures: throughputs and mean / median / p99 of ttft, tpot, itl, e2el in ms."""
    done = [o for o in outcomes if o.ok]
    output = sum(o.output_tokens for o in done)
    result = {"completed": len(done), "failed": len(outcomes) - len(done), "duration_s": duration,
              "request_throughput": len(done) / duration, "output_throughput": output / duration,
              "total_token_throughput": (output + sum(o.prompt_tokens for o in done)) / duration,
              "errors": sorted({o.error for o in outcomes if o.error})[:5]}
    samples = {"ttft_ms": [o.ttft for o in done], "e2el_ms": [o.latency for o in done],
               "tpot_ms": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1],
               "itl_ms": [gap for o in done for gap in o.itl]}
    for name, values in samples.items():
        values = sorted(1000 * v for v in values)
        result[f"mean_{name}"] = statistics.fmean(values) if values else math.nan
        result[f"median_{name}"] = statistics.median(values) if values else math.nan
        result[f"p99_{name}"] = _percentile(values, 99) if values else math.nan
    return result


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy.percentile (vLLM's) does."""
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
