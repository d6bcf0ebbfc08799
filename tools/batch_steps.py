"""Where a saturated server's time goes: `perf serve`'s load run on the batching core, step by step.

Admits `perf serve`'s random requests (all at once) into a `Batch` as the scheduler does (front of
the queue first, while rows are free and the admitted prompts stay within max-batch-tokens), steps
until every request has its tokens, and times each step: the decode steps by how many rows they
ran, the steps that prefilled an admission by its tokens. No HTTP, no detokenizing: what is left is
the model's work, the part a faster kernel or a better schedule can change.

    python tools/batch_steps.py --quant w8a8
"""

from __future__ import annotations

import argparse
import collections
import itertools
import time

import torch

import bloom_runtime as br
from bloom_runtime.bench.serve_load import Job, random_jobs
from bloom_runtime.sampling import GenerationConfig

Step = collections.namedtuple("Step", "rows prefill seconds end")  # running rows, admitted tokens


def run(engine: br.Engine, jobs: list[Job], rows: int, max_batch_tokens: int) -> tuple[list[Step], float]:
    """Every job through one batch of `rows` rows; the steps, and the seconds it took in all."""
    batch = engine.batch(rows, 256)
    waiting, keys = collections.deque(jobs), itertools.count()
    steps, began = [], time.perf_counter()
    while waiting or batch.sequences:
        group, tokens = [], 0
        while waiting and len(group) < batch.free_rows:
            tokens += len(waiting[0].prompt)
            if group and tokens > max_batch_tokens:
                break
            job = waiting.popleft()
            config = GenerationConfig(max_new_tokens=job.output_len)
            group.append(engine.sequence(job.prompt, config, None, next(keys)))
        running = len(batch.sequences)
        start = time.perf_counter()
        batch.step(admitting=group)
        steps.append(Step(running, sum(len(seq.prompt) for seq in group), time.perf_counter() - start,
                          batch.end))
    engine.give_back(batch)
    return steps, time.perf_counter() - began


def report(steps: list[Step], seconds: float, tokens: int) -> None:
    prefills = [s for s in steps if s.prefill]
    decodes = [s for s in steps if not s.prefill]
    print(f"{seconds:.2f} s for {tokens} tokens ({tokens / seconds:.1f} tok/s), {len(steps)} steps: "
          f"{sum(s.seconds for s in prefills):.2f} s in {len(prefills)} with a prefill "
          f"({sum(s.prefill for s in prefills)} prompt tokens), "
          f"{sum(s.seconds for s in decodes):.2f} s in {len(decodes)} decode steps")
    by_rows = collections.defaultdict(list)
    for step in decodes:
        by_rows[step.rows].append(step)
    for rows, group in sorted(by_rows.items()):
        ms = [1e3 * s.seconds for s in group]
        print(f"  {rows} rows: {len(group)} steps, mean {sum(ms) / len(ms):.1f} ms, min {min(ms):.1f}, "
              f"cached columns {sum(s.end for s in group) / len(group):.0f} on average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:bloom-560m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = br.load(args.model, dtype=args.dtype, quant=args.quant)
    jobs = random_jobs(args.num_prompts, args.input_len, args.output_len, engine.config.vocab_size, args.seed,
                       args.random_range_ratio)
    run(engine, jobs[: args.max_batch_size], args.max_batch_size, args.max_batch_tokens)  # warm up
    steps, seconds = run(engine, jobs, args.max_batch_size, args.max_batch_tokens)
    report(steps, seconds, sum(job.output_len for job in jobs))


if __name__ == "__main__":
    main()
