"""Tensor parallelism over `torch.distributed` (Megatron-style), launched by `torchrun`.

Per rank r of n:
- `query_key_value`, `dense_h_to_4h` are column-parallel: whole heads / a
  slice of the 4h columns (HF's per-head [n_head, 3, head_dim] layout makes a
  head's q, k and v rows contiguous, so a rank's heads are one row block);
- `dense`, `dense_4h_to_h` are row-parallel: a slice of the input columns,
  then one all-reduce; the bias lives on rank 0 only (zeros elsewhere), so it
  is added once;
- the tied embedding is vocab-parallel: the vocabulary is padded with zero rows
  to a multiple of n, each rank looks up its own ids (all-reduce), and the head
  gathers every rank's logits and drops the padding, so results never change;
- each rank's ALiBi slopes are its slice of the global slopes.

The same rules cut tensors (`shard_tensor`) and predict the shapes a cut
checkpoint must hold (`shard_shape`), so the two cannot disagree.
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
from .model import Bloom, TiedEmbedding

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
COLUMN = ("self_attention.query_key_value", "mlp.dense_h_to_4h")
ROW = ("self_attention.dense", "mlp.dense_4h_to_h")
TIMEOUT_ENV = "BLOOM_RUNTIME_DIST_TIMEOUT"  # seconds a rank waits for the others (default 300)


@dataclasses.dataclass(frozen=True)
class Shard:
    rank: int
    world: int


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


def _rule(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    if module == "word_embeddings":
        return "vocab"
    if module.endswith(COLUMN) and leaf != "input_scale" and leaf != "input_zero_point":
        return "column"
    if module.endswith(ROW):
        return {"weight": "row", "bias": "bias-once"}.get(leaf, "replicate")
    return "replicate"


def shard_shape(name: str, shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    rule = _rule(name)
    if rule == "column":
        return (shape[0] // world, *shape[1:])
    if rule == "row":
        return (shape[0], shape[1] // world)
    if rule == "vocab":
        return (-(-shape[0] // world), shape[1])
    return shape


def shard_tensor(name: str, tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Rank `shard.rank`'s part of a full tensor (a copy, contiguous)."""
    rank, world = shard.rank, shard.world
    rule = _rule(name)
    if rule == "column":
        return tensor.chunk(world, dim=0)[rank].clone()
    if rule == "row":
        return tensor.chunk(world, dim=1)[rank].clone()
    if rule == "bias-once":
        return tensor.clone() if rank == 0 else torch.zeros_like(tensor)
    if rule == "vocab":  # padding rows are zero (with scale 1, so int8 scales stay valid)
        rows = -(-tensor.shape[0] // world)
        fill = 1.0 if name.endswith("weight_scale") else 0.0
        padded = F.pad(tensor, (0, 0, 0, rows * world - tensor.shape[0]), value=fill)
        return padded[rank * rows : (rank + 1) * rows].clone()
    return tensor


def shard_state(state: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    return {name: shard_tensor(name, t, shard) for name, t in state.items()}


class VocabParallelEmbedding(TiedEmbedding):
    """Rows [start, start + rows) of the (padded) vocabulary on this rank."""

    def __init__(self, rows: int, hidden_size: int, start: int, vocab_size: int) -> None:
        super().__init__(rows, hidden_size)
        self.start, self.vocab_size = start, vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = super().forward(local.masked_fill(outside, 0))
        out = out.masked_fill(outside[..., None], 0.0)
        dist.all_reduce(out)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        local = super().logits(x)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def shard_skeleton(model: Bloom, shard: Shard) -> None:
    """Give a meta-device model the shapes of rank `shard.rank`'s part, before loading it."""
    with torch.device("meta"):
        _shard_skeleton(model, shard)


def _shard_skeleton(model: Bloom, shard: Shard) -> None:
    config, world = model.config, shard.world
    for block in model.h:
        block.self_attention.n_head = config.n_head // world
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(COLUMN + ROW):
                for leaf in ("weight", "bias"):
                    shape = shard_shape(f"{name}.{leaf}", getattr(module, leaf).shape, world)
                    setattr(module, leaf, nn.Parameter(torch.empty(shape)))
    rows = -(-config.vocab_size // world)
    model.word_embeddings = VocabParallelEmbedding(rows, config.hidden_size, shard.rank * rows,
                                                   config.vocab_size)


def attach_collectives(model: Bloom) -> None:
    """All-reduce the outputs of the row-parallel linears (after any int8 swap).

    A row-parallel W8A8 linear with per-token scales also takes the max over
    ranks of each token's |x|, so its scales are those of the whole token.
    """
    for block in model.h:
        for module in (block.self_attention.dense, block.mlp.dense_4h_to_h):
            module.register_forward_hook(_all_reduce_output)
            if getattr(module, "input_scale", "static") is None:
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
