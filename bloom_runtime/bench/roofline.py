"""How close a latency is to what the machine allows.

Decode is bound by memory: every step reads all weights (and the KV cache), so
next-token latency >= bytes / bandwidth. Prefill is bound by arithmetic:
first-token latency >= FLOPs / peak. Both limits are measured on this machine
once per run, with the run's dtype and thread count.
"""

from __future__ import annotations

import time

import torch

from ..model import Bloom


def _best_seconds(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Read bandwidth in bytes/s: the best time to sum a buffer much larger than the caches."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    seconds = _best_seconds(lambda: float(x.sum()))
    return x.numel() * 4 / seconds


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Dense matmul FLOP/s in `dtype` (int8: torch._int_mm) on an n x n x n product."""
    if dtype == torch.int8:
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)
        seconds = _best_seconds(lambda: torch._int_mm(a, a).sum().item())
    else:
        a = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_seconds(lambda: (a @ a).sum().item())
    return 2 * n**3 / seconds


def weight_bytes(model: Bloom) -> int:
    """Bytes one decode step reads: every parameter once (the tied head reads the embedding)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(model: Bloom, batch: int, length: int) -> int:
    """Bytes of cached keys and values a step attends over."""
    cfg, elem = model.config, model.ln_f.weight.element_size()
    return 2 * cfg.n_layer * batch * length * cfg.hidden_size * elem


def prefill_flops(model: Bloom, batch: int, seq_in: int) -> float:
    """FLOPs to run a prompt: 2 per weight per token (block linears, and the head for the last
    token), plus causal attention (q.k and p.v over half the square)."""
    cfg = model.config
    h = cfg.hidden_size
    linear = 12 * h * h * cfg.n_layer
    head = cfg.vocab_size * h
    attention = 2 * 2 * cfg.n_layer * seq_in * seq_in * h / 2
    return batch * (2 * linear * seq_in + 2 * head + attention)
