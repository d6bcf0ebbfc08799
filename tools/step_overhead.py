"""What a serving step costs outside the model's forward: the scheduler thread's work per decode
step (`Replica.run`: evictions, sampling, log-probabilities, outputs) minus the forward itself,
for ROWS sequences of 256 new tokens (issue 23's measure).

    python tools/step_overhead.py --model tiny --rows 8 32 --sample
    python tools/step_overhead.py --model random:bloom-560m --dtype bfloat16 --rows 8 32 --sample
"""

from __future__ import annotations

import argparse
import time

import torch

import bloom_runtime as br
from bloom_runtime.sampling import GenerationConfig
from bloom_runtime.serving.scheduler import Plan, Replica, Spec

NEW_TOKENS = 256
PROMPT = list(range(5, 37))  # 32 ids every vocabulary has


def measure(engine: br.Engine, rows: int, config: GenerationConfig) -> tuple[float, float, int]:
    """(ms a step, ms of it in the forward, steps) over the decode steps of `rows` sequences."""
    forward = engine.model.forward_segments
    spent = [0.0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out

    engine.model.forward_segments = timed
    try:
        replica = Replica(engine, rows)
        seeds = range(rows) if config.do_sample else [None] * rows
        replica.run(Plan(admit=[Spec(i, PROMPT, config, seed) for i, seed in enumerate(seeds)]))
        spent[0], steps, start = 0.0, 0, time.perf_counter()
        while replica.batch.sequences:
            replica.run(Plan())
            steps += 1
        total = time.perf_counter() - start
    finally:
        engine.model.forward_segments = forward
    return 1e3 * total / steps, 1e3 * spent[0] / steps, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--sample", action="store_true", help="temperature 0.8, top-p 0.9 (else greedy)")
    parser.add_argument("--logprobs", type=int, default=None, help="ask each token's top-N log-probabilities")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = br.load(args.model, dtype=args.dtype, max_seq_len=len(PROMPT) + NEW_TOKENS)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=args.sample, temperature=0.8,
                              top_p=0.9 if args.sample else 1.0, logprobs=args.logprobs)
    mode = ("sampling (T 0.8, top-p 0.9)" if args.sample else "greedy") + (
        f", logprobs {args.logprobs}" if args.logprobs is not None else "")
    for rows in args.rows:
        step, forward, steps = measure(engine, rows, config)
        print(f"{args.model} {args.dtype}, {rows} rows, {mode}: {step:.2f} ms a step, {forward:.2f} in the "
              f"forward, {step - forward:.2f} outside ({(step - forward) / step:.0%}), {steps} steps")


if __name__ == "__main__":
    main()
