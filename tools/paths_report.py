"""Agreement of every runtime path with float32 on one device: the figures behind INT8 and TP.

    python tools/paths_report.py --model tiny
    torchrun --standalone --nproc_per_node 2 tools/paths_report.py --model random:bloom-560m

For each dtype (float32, bfloat16, float16) and INT8 scheme (w8a8, w8a8-static,
w8a16) at this world size, against float32 at tp=1 on the same weights and
prompts: top-1 agreement over real tokens, max |error| over the logit scale,
mean KL(float32 || path), and whether 32 greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests_functional"))
from compare import left_padded_batch, relative_error, top1_agreement  # noqa: E402

import bloom_runtime as br  # noqa: E402
from bloom_runtime import parallel  # noqa: E402

PATHS = [("float32", None), ("bfloat16", None), ("float16", None),
         ("float32", "w8a8"), ("float32", "w8a8-static"), ("bfloat16", "w8a16")]  # fmt: skip


def kl(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    log_p, log_q = ref.log_softmax(-1), ours.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1)[mask.bool()].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    world = parallel.world_from_env()
    reference = br.load(args.model, tp=1)
    ids, mask = left_padded_batch(reference.config.vocab_size, [48, 32, 17, 48], seed=0)
    ref_logits, ref_tokens = reference.logits(ids, mask), reference.generate(ids, mask, max_new_tokens=32)
    del reference
    rows = []
    for dtype, quant in PATHS:
        engine = br.load(args.model, dtype=dtype, quant=quant)
        logits = engine.logits(ids, mask)
        same = torch.equal(engine.generate(ids, mask, max_new_tokens=32), ref_tokens)
        rows.append((dtype, quant or "-", world, top1_agreement(logits, ref_logits, mask),
                     relative_error(logits, ref_logits, mask), kl(logits, ref_logits, mask), same))
        del engine
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model {args.model}: each path vs float32 tp=1")
        print("| dtype | quant | tp | top-1 | max err / scale | KL | 32 greedy tokens identical |")
        print("|---|---|---|---|---|---|---|")
        for d, q, tp, top1, err, k, same in rows:
            print(f"| {d} | {q} | {tp} | {top1:.4f} | {err:.2e} | {k:.2e} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
