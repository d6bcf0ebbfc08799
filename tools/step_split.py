"""Where a decode step's time goes: the matrix products against everything else.

Times a decode step of `--batch` rows (greedy, 32 new tokens), then the same step with every kernel call
(the linears and the head) replacing its product by a ready output of the right shape, alternately
in one process so that the machine's slow spells touch both. The second is what a step costs
outside the matmuls: layer norms, attention, GELU, sampling and Python.

    python tools/step_split.py --quant w8a8 --context 32 256
    python tools/step_split.py --batch 8 --context 256        # a server's full batch of decodes
"""

from __future__ import annotations

import argparse
import time

import torch

import bloom_runtime as br
from bloom_runtime.kernels import KernelOwner
from bloom_runtime.sampling import GenerationConfig

NEW_TOKENS = 32


def per_token_ms(engine: br.Engine, ids: torch.Tensor) -> float:
    """(time for NEW_TOKENS + 1 tokens - time for 1) / NEW_TOKENS: the decode steps alone."""
    spans = []
    for tokens in (1, NEW_TOKENS + 1):
        start = time.perf_counter()
        engine.generate(ids, generation_config=GenerationConfig(max_new_tokens=tokens))
        spans.append(time.perf_counter() - start)
    return 1e3 * (spans[1] - spans[0]) / NEW_TOKENS


def without_matmuls(model: torch.nn.Module, batch: int) -> None:
    """Every prepared kernel owner answers a decode call (`batch` rows) with zeros it made once (keyed
    by shape). The blocks run their modules (the fused decode layer calls its products in C++, where
    nothing can answer for them), so what remains is the module path's cost outside the products, an
    upper bound on the fused layer's."""
    for block in model.h:
        block.decode_in_one_call = lambda *args: None
    for owner in model.modules():
        if isinstance(owner, KernelOwner) and owner.decision is not None:
            serve = owner.run_kernel
            ready: dict[tuple, torch.Tensor] = {}

            def run_kernel(dtype, *inputs, serve=serve, ready=ready):
                if inputs[0].shape[0] != batch:
                    return serve(dtype, *inputs)
                out = ready.get(inputs[0].shape)
                if out is None:
                    out = ready[inputs[0].shape] = torch.zeros_like(serve(dtype, *inputs))
                return out
            owner.run_kernel = run_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:bloom-560m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default=None)
    parser.add_argument("--context", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = dict(dtype=args.dtype, quant=args.quant, max_seq_len=max(args.context) + NEW_TOKENS + 1)
    engines = [br.load(args.model, **load), br.load(args.model, **load)]
    without_matmuls(engines[1].model, args.batch)
    for context in args.context:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(4, engines[0].config.vocab_size, (args.batch, context), generator=generator)
        best = [float("inf"), float("inf")]
        for round_ in range(args.rounds + 1):
            for i, engine in enumerate(engines):
                ms = per_token_ms(engine, ids)
                best[i] = min(best[i], ms) if round_ else best[i]  # round 0 warms up
        step, outside = best
        print(f"{args.model} {args.dtype} {args.quant or ''} batch {args.batch} context {context}: "
              f"{step:.1f} ms a step, {outside:.1f} outside the matmuls ({outside / step:.0%})")


if __name__ == "__main__":
    main()
