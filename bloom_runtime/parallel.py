"""Tensor parallelism over `torch.distributed` (Megatron-style), launched by `torchrun`.

Each module says how it splits (`split`, see model.py) and each parameter which of
its axes are outputs, inputs or vocabulary rows (`STORED`, see tensors.py). Per
rank r of n:
- "column" linears (`query_key_value`, `dense_h_to_4h`) keep a slice of their
  outputs: whole heads, as HF's per-head [n_head, 3, head_dim] layout makes a
  head's q, k and v rows contiguous, or a slice of the 4h columns;
- "row" linears (`dense`, `dense_4h_to_h`) keep a slice of their inputs, then
  one all-reduce; a term added after the matmul (the bias) lives on rank 0 only
  (zeros elsewhere), so it is added once;
- the tied embedding splits by vocabulary: padded with zero rows (scale 1) to a
  multiple of n, each rank looks up its own ids (all-reduce), and the head
  gathers every rank's logits and drops the padding, so results never change;
- each rank computes its heads' share of attention, with their ALiBi slopes.

One function cuts tensors (`shard_tensor`); applied to a meta-device skeleton it
gives the shapes a rank holds, so cutting and shape checks cannot disagree.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import BloomConfig
from .errors import DistributedError
from .model import Bloom
from .quant.base import Scheme
from .tensors import IN, OUT, SCALE, Stored, declarations, stored

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
TIMEOUT_ENV = "BLOOM_RUNTIME_DIST_TIMEOUT"  # seconds a rank waits for the others (default 300)


@dataclasses.dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        """The rank that prints and writes files (one voice under torchrun)."""
        return self.rank == 0


SINGLE = Shard(0, 1)


def world_from_env() -> int:
    """The world size torchrun set, or 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(world: int, device: torch.device) -> Shard:
    """Join (or reuse) the process group of `world` ranks; the backend follows the device."""
    if world == 1:
        return SINGLE
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise DistributedError(f"tp={world} needs torchrun (torchrun --nproc_per_node {world} ...)")
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
        dist.init_process_group(BACKENDS[device.type], timeout=timeout)
        # A group left open at interpreter exit aborts the process (gloo's threads).
        atexit.register(shutdown)
    if dist.get_world_size() != world:
        raise DistributedError(f"tp={world} but {dist.get_world_size()} processes were launched")
    return Shard(dist.get_rank(), world)


def shutdown() -> None:
    """Leave the process group, if one is open."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """One accelerator per rank: `cuda` becomes `cuda:LOCAL_RANK` under torchrun."""
    if device.type != "cpu" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device(device.type, int(os.environ["LOCAL_RANK"]))
    return device


def check_divisible(config: BloomConfig, world: int) -> None:
    if config.n_head % world:
        raise DistributedError(f"tp={world} must divide n_head={config.n_head} (whole heads per rank)")


def vocab_rows(vocab_size: int, world: int) -> int:
    """Rows of the vocabulary on each rank (the last rank's padded)."""
    return -(-vocab_size // world)


def shard_tensor(tensor: torch.Tensor, declared: Stored, split: str | None, shard: Shard) -> torch.Tensor:
    """Rank `shard.rank`'s part of a full tensor (a copy), by its module's `split` and its axes."""
    rank, world = shard.rank, shard.world
    if split is None or world == 1:
        return tensor
    if split == "vocab":  # padding rows are zero, with scale 1 so that int8 scales stay valid
        rows = vocab_rows(tensor.shape[0], world)
        fill = 1.0 if declared.kind == SCALE else 0.0
        padded = F.pad(tensor, (0, 0, 0, rows * world - tensor.shape[0]), value=fill)
        return padded[rank * rows : (rank + 1) * rows].clone()
    axis = {"column": OUT, "row": IN}[split]
    if axis in declared.axes:
        dim = declared.axes.index(axis)
        if tensor.shape[dim] % world:
            raise DistributedError(f"tp={world} does not divide a {split}-parallel tensor of shape "
                                   f"{tuple(tensor.shape)} evenly")
        return tensor.chunk(world, dim=dim)[rank].clone()
    if split == "row" and declared.summed:
        return tensor.clone() if rank == 0 else torch.zeros_like(tensor)
    return tensor


def shard_state(model: nn.Module, state: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    """Rank `shard.rank`'s part of a full state dict of `model`'s structure."""
    rules = declarations(model)
    return {name: shard_tensor(t, *rules[name], shard) for name, t in state.items()}


def shard_skeleton(model: Bloom, shard: Shard) -> None:
    """Give a meta-device model the shapes of rank `shard.rank`'s part, before loading it."""
    if shard.world == 1:
        return
    for module in model.modules():
        split = getattr(module, "split", None)
        if isinstance(module, Scheme):  # schemes with their own rules (int4 groups)
            module.check_split(shard.world)
        for leaf, param in list(module.named_parameters(recurse=False)):
            part = shard_tensor(param.detach(), stored(module, leaf), split, shard)
            setattr(module, leaf, nn.Parameter(part, requires_grad=False))
    per_rank = model.config.n_head // shard.world
    model.heads = range(shard.rank * per_rank, (shard.rank + 1) * per_rank)
    embedding = model.word_embeddings
    embedding.__class__ = _vocab_parallel(type(embedding))
    embedding.rows = vocab_rows(model.config.vocab_size, shard.world)
    embedding.start, embedding.vocab_size = shard.rank * embedding.rows, model.config.vocab_size


class _VocabParallel:
    """Mixed into the embedding's own class (float or quantized): rows [start, start + rows) of
    the padded vocabulary live on this rank."""

    start: int
    rows: int
    vocab_size: int

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = super().forward(local.masked_fill(outside, 0))
        out = out.masked_fill(outside[..., None], 0.0)
        dist.all_reduce(out)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        local = super().logits(x)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def _vocab_parallel(cls: type) -> type:
    return type(f"VocabParallel{cls.__name__}", (_VocabParallel, cls), {})


def attach_collectives(model: Bloom) -> None:
    """All-reduce the outputs of the row-parallel linears (after any quantized swap).

    A row-parallel linear whose activations are scaled per token (its
    compressed-tensors description says strategy "token") also takes the max over
    ranks of each token's |x|, so its scales are those of the whole token.
    """
    for module in model.modules():
        if getattr(module, "split", None) != "row":
            continue
        module.register_forward_hook(_all_reduce_output)
        if isinstance(module, Scheme) and (module.ACTIVATIONS or {}).get("strategy") == "token":
            module.reduce_absmax = _all_reduce_max


def _all_reduce_output(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
    dist.all_reduce(output)


def _all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def shared_seed(seed: int | None, shard: Shard) -> int | None:
    """Ranks must sample the same tokens: without a seed, all take rank 0's random one."""
    if shard.world == 1 or seed is not None:
        return seed
    chosen = [int(torch.randint(0, 2**62, ()))]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def agree(shard: Shard, error: Exception | None) -> None:
    """Raise on every rank if any rank failed, naming the first failing rank and its error.

    Called once loading is done (ok or not), so no rank computes while another
    has given up, and none waits longer than the process group's timeout.
    """
    if shard.world == 1:
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * shard.world
    try:
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    except RuntimeError as err:
        raise DistributedError(f"rank {shard.rank}: lost contact with the other ranks ({err})") from None
    failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
    if failed:
        rank, message = failed[0]
        if error is not None and rank == shard.rank:
            raise error
        raise DistributedError(f"rank {rank} failed: {message}")
