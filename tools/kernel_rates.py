"""One-row read rates of the kernels a decode step could use, ours beside the libraries users could pick.

A decode step at batch 1 reads every weight once, so a kernel's worth there is the rate at which it
streams a weight it has never seen: each timed call takes the next of enough copies to overflow the
last-level cache (`--megabytes`), as the layers of a model do. Per scheme, on one [N, K] shape:

- bfloat16: F.linear, oneDNN's packed matmul, our chosen native candidate, inductor's max-autotune
  GEMM with frozen weights (`--inductor`: compiles once, ~10 s), zentorch's linear (where importable);
- w8a8: oneDNN's u8 GEMM candidate and ours (float rows quantized inside the call), zentorch's
  dynamic-quantized int8 linear (DA8W8);
- w4a8: ours (groups of 128) and zentorch's DA8W4 (where importable).

zentorch is AMD's plugin; its build must match torch's (`pip install --no-deps zentorch==<torch's>`).
It is measured if importable, and never a dependency. Figures print as GB/s of weight bytes (and
scales) read, the best of `--rounds` interleaved rounds; the read bandwidth of the machine at the same
time prints first, for the ratio.

    python tools/kernel_rates.py --shape 4096 1024 --inductor
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bloom_runtime.bench.roofline import memory_bandwidth
from bloom_runtime.kernels.selection import ROLES, Problem, candidate, selector

DTYPE = torch.bfloat16
GROUP = 128


def zentorch_ops():
    """torch.ops.zentorch once zentorch is imported, or None where it is not installed."""
    if importlib.util.find_spec("zentorch") is None:
        return None
    import zentorch  # noqa: F401  (registers torch.ops.zentorch)
    return torch.ops.zentorch


def weight_bytes(scheme: str, n: int, k: int) -> int:
    """What one row's product of `scheme` reads from our weights: the values, and their scales."""
    return {"dense16": n * k * 2, "w8a8": n * k + n * 4, "w4a8": n * k // 2 + n * (k // GROUP) * 4}[scheme]


def ours(scheme: str, n: int, k: int, copies: int) -> tuple[str, list[Callable], int]:
    """The candidate this machine's probe serves one row of `scheme` with, on `copies` random weights."""
    role = ROLES[scheme]
    group = {"group": GROUP} if scheme == "w4a8" else {}
    problem = Problem.of(scheme, n, k, torch.device("cpu"), DTYPE, **group)
    name = selector().decide(problem).name_for(1)
    calls = []
    for i in range(copies):
        owner = role.sample(problem, 1, torch.Generator().manual_seed(i))[0]
        bound = candidate(scheme, name)(owner).bind(owner)
        calls.append(bound if scheme == "dense16" else (lambda x, b=bound: b(x, None, DTYPE)))
    return f"ours ({name})", calls, weight_bytes(scheme, n, k)


def bf16_peers(n: int, k: int, copies: int, inductor: bool) -> list[tuple[str, list[Callable], int]]:
    weights = [torch.randn(n, k, dtype=DTYPE) * 0.05 for _ in range(copies)]
    nbytes = n * k * 2
    peers = [("F.linear", [lambda x, w=w: F.linear(x, w) for w in weights], nbytes)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    onednn = torch.ops.mkldnn._linear_pointwise
    peers.append(("oneDNN packed", [lambda x, p=p: onednn(x, p, None, "none", [], "") for p in packed],
                  nbytes))
    if inductor:
        peers.append(("inductor max-autotune", inductor_linears(weights), nbytes))
    zen = zentorch_ops()
    if zen is not None:
        prepacked = [zen.zentorch_weight_prepack_for_linear(w) for w in weights]
        linear = zen.zentorch_linear_unary
        peers.append(("zentorch linear", [lambda x, p=p: linear(x, p, None, is_weight_prepacked=True)
                                          for p in prepacked], nbytes))
    return peers


def inductor_linears(weights: list[torch.Tensor]) -> list[Callable]:
    """The first weight frozen into a module compiled with inductor's GEMM templates in the autotune (a
    compile per weight would take minutes: it runs in cache, a bound above what it would stream)."""
    import torch._inductor.config as config
    config.freezing, config.max_autotune, config.max_autotune_gemm_backends = True, True, "CPP,ATEN"

    class Linear(torch.nn.Module):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    return [torch.compile(Linear(weights[0]).eval())]


def zentorch_int8_peer(scheme: str, n: int, k: int, copies: int) -> list[tuple[str, list[Callable], int]]:
    """zentorch's dynamic-quantized linear: int8 weights with a scale per output (DA8W8), or int4 ones,
    two to a byte (low nibble first), with a scale per group of GROUP inputs (DA8W4) as ours has."""
    zen = zentorch_ops()
    if zen is None:
        return []
    low, scale_shape, name = (-128, (n,), "DA8W8") if scheme == "w8a8" else (-8, (k // GROUP, n), "DA8W4")
    weights, scales = [], []
    for _ in range(copies):
        w = torch.randint(low, -low, (n, k), dtype=torch.int8)
        weights.append(zen.zentorch_weight_prepack_for_dynamic_qlinear(w) if scheme == "w8a8"
                       else ((w[:, 1::2] << 4) | (w[:, ::2] & 15)).contiguous())
        scales.append(torch.rand(*scale_shape) * 1e-2 + 1e-3)
    prepacked = scheme == "w8a8"
    calls = [lambda x, w=w, s=s: zen.zentorch_dynamic_qlinear(x, w, s, None, is_weight_prepacked=prepacked)
             for w, s in zip(weights, scales)]
    return [(f"zentorch {name}", calls, sum(t.numel() * t.element_size() for t in (weights[0], scales[0])))]


def rate(calls: list[Callable], nbytes: int, x: torch.Tensor, reps: int) -> float:
    """GB/s of `nbytes` a call, over `reps` calls cycling through the copies (best of the timed passes)."""
    cycle = itertools.cycle(calls)
    start = time.perf_counter()
    for _ in range(reps):
        next(cycle)(x)
    return nbytes * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 1024], metavar=("N", "K"))
    parser.add_argument("--megabytes", type=int, default=256, help="weight bytes cycled per kernel")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inductor", action="store_true", help="also inductor's GEMM (in cache)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, k = args.shape
    x = torch.randn(1, k, dtype=DTYPE)
    bandwidth = memory_bandwidth(torch.device("cpu"))
    print(f"read bandwidth now: {bandwidth / 1e9:.1f} GB/s; {n}x{k}, 1 row, {args.threads} threads")
    for scheme, bytes_per in (("dense16", 2), ("w8a8", 1), ("w4a8", 0.5)):
        copies = max(1, int(args.megabytes * 2**20 / (n * k * bytes_per)))
        entries = [ours(scheme, n, k, copies)]
        entries += bf16_peers(n, k, copies, args.inductor) if scheme == "dense16" else \
            zentorch_int8_peer(scheme, n, k, copies)
        best = {name: 0.0 for name, _, _ in entries}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, calls, nbytes in entries:
                    best[name] = max(best[name], rate(calls, nbytes, x, reps=max(len(calls), 64)))
        for name, calls, nbytes in entries:
            where = "from DRAM" if len(calls) > 1 else "in cache"
            print(f"  {scheme:8s} {name:36s} {best[name]:6.1f} GB/s {where} ({nbytes / 1e6:.1f} MB a weight)")


if __name__ == "__main__":
    main()
