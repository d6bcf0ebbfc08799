"""Agreement of every runtime path with float32 on one device: the figures behind INT8, INT4 and TP.

    python tools/paths_report.py --model tiny
    torchrun --standalone --nproc_per_node 2 tools/paths_report.py --model random:bloom-560m

For each dtype (float32, bfloat16, float16) and low-bit scheme (w8a8, w8a8-static,
w8a16, w4a16, w4a16-g32) at this world size, against float32 at tp=1 on the same weights and
prompts: top-1 agreement over real tokens, max |error| over the logit scale,
mean KL(float32 || path), and whether 32 greedy tokens are identical.
"""

from __future__ import annotations

import argparse

import torch

import bloom_runtime as br
from bloom_runtime.agreement import kl_divergence, relative_error, top1_agreement
from bloom_runtime.tokenizer import left_pad

PATHS = [("float32", None), ("bfloat16", None), ("float16", None),
         ("float32", "w8a8"), ("float32", "w8a8-static"), ("bfloat16", "w8a16"),
         ("bfloat16", "w4a16"), ("bfloat16", "w4a16-g32")]  # fmt: skip


def prompts(vocab: int, lengths: list[int], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return left_pad([torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths], pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    reference = br.load(args.model, tp=1)
    ids, mask = prompts(reference.config.vocab_size, [48, 32, 17, 48], reference.config.pad_token_id)
    ref_logits, ref_tokens = reference.logits(ids, mask), reference.generate(ids, mask, max_new_tokens=32)
    del reference
    rows = []
    for dtype, quant in PATHS:
        engine = br.load(args.model, dtype=dtype, quant=quant)
        logits = engine.logits(ids, mask)
        same = torch.equal(engine.generate(ids, mask, max_new_tokens=32), ref_tokens)
        rows.append((dtype, quant or "-", engine.shard.world, top1_agreement(logits, ref_logits, mask),
                     relative_error(logits, ref_logits, mask), kl_divergence(logits, ref_logits, mask), same))
        is_main = engine.shard.is_main
        del engine
    if is_main:
        print(f"model {args.model}: each path vs float32 tp=1")
        print("| dtype | quant | tp | top-1 | max err / scale | KL | 32 greedy tokens identical |")
        print("|---|---|---|---|---|---|---|")
        for d, q, tp, top1, err, k, same in rows:
            print(f"| {d} | {q} | {tp} | {top1:.4f} | {err:.2e} | {k:.2e} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
