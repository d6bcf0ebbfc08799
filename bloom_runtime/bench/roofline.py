"""How close a latency is to what the machine allows.

Decode is bound by memory: every step reads all weights (and the KV cache), so
next-token latency >= bytes / bandwidth. Prefill is bound by arithmetic:
first-token latency >= FLOPs / peak. Both limits are measured on this machine
once per run, with the run's dtype and thread count. Under tensor parallelism
every count is this rank's: bytes from the loaded model, FLOPs from a float
skeleton cut the same way.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from .. import hugepages
from ..config import BloomConfig
from ..model import Bloom
from ..parallel import Shard
from ..quant import QuantSpec


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


class BandwidthBeside:
    """The read bandwidth beside each measurement (a perf case, a serving load), the higher of the samples
    just before and just after it (a VM's moves by 2x within minutes): the bandwidth limit a case is held
    to is the one it ran under, and every engine's and server's rows carry theirs, so that two engines'
    times can be read at the bandwidth each had. A sample between two measurements serves both."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = memory_bandwidth(device)

    def stamp(self, row: dict) -> dict:
        """`row`, measured since the last sample, with `memory_bandwidth_GBps`."""
        after = memory_bandwidth(self.device)
        stamped = {**row, "memory_bandwidth_GBps": max(self.before, after) / 1e9}
        self.before = after
        return stamped


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Dense matmul FLOP/s in `dtype` (int8: torch._int_mm) on an n x n x n product."""
    if dtype == torch.int8:
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)
        seconds = _best_seconds(lambda: torch._int_mm(a, a).sum().item())
    else:
        a = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_seconds(lambda: (a @ a).sum().item())
    return 2 * n**3 / seconds


def limits(model: Bloom, device: torch.device, quant: str | None, dtype: torch.dtype) -> dict:
    """This machine's bandwidth and matmul peak (int8 where the scheme quantizes activations),
    and the bytes of `model`'s weights."""
    int8 = quant is not None and QuantSpec.from_name(quant).linear_class.ACTIVATIONS is not None
    return {
        "bandwidth": memory_bandwidth(device),
        "peak_flops": matmul_peak(device, torch.int8 if int8 else dtype),
        "weight_bytes": weight_bytes(model),
        "huge_page_bytes": hugepages.bytes_on_huge_pages(_weights(model)),
    }


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model holds: every parameter once (the tied head reads the embedding), and the
    kernels' buffers (layouts that replaced a parameter, or sit beside a quantized head's)."""
    return sum(t.numel() * t.element_size() for t in _weights(model))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def kv_bytes(model: Bloom, batch: int, length: int) -> int:
    """Bytes of cached keys and values a step attends over (this rank's heads)."""
    cfg, elem = model.config, model.ln_f.weight.element_size()
    return 2 * cfg.n_layer * batch * length * len(model.heads) * cfg.head_dim * elem


def prefill_flops(config: BloomConfig, shard: Shard, batch: int, seq_in: int) -> float:
    """FLOPs to run a prompt: 2 per weight per token (block linears, and the head for the last
    token), plus causal attention (q.k and p.v over half the square), for rank `shard.rank`'s part."""
    linear, head, heads = _rank_counts(config, shard)
    attention = 2 * 2 * config.n_layer * seq_in * seq_in * heads * config.head_dim / 2
    return batch * (2 * linear * seq_in + 2 * head + attention)


@functools.cache
def _rank_counts(config: BloomConfig, shard: Shard) -> tuple[int, int, int]:
    """Block-linear weights, head weights and heads of rank `shard.rank`'s float skeleton (counted
    once: the harness re-derives every case's figures as each case finishes)."""
    from ..loader import skeleton

    part = skeleton(config, shard=shard)
    linear = sum(m.weight.numel() for block in part.block_linears() for m in block.values())
    return linear, part.word_embeddings.weight.numel(), len(part.heads)
