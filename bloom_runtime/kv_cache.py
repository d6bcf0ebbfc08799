"""A preallocated key/value cache: allocated when a batch starts or outgrows it, never per step.

Keys and values live in `[n_layer, rows, n_head, columns, head_dim]` buffers. The
running batch (batching.py) keeps its rows right-aligned: every row's tokens end at
the same column, so one decode step writes one column for all rows and attention
reads a plain slice `[..., :length, :]`. A view (`view`) narrows the buffers to some
rows and starts its columns at an offset, so a prefill of newly admitted rows writes
straight into the batch's buffers at the columns where those rows will live.
"""

from __future__ import annotations

import copy

import torch

from . import hugepages
from .kernels import native


class KVCache:
    """Per-layer key/value storage for up to `batch` rows of up to `max_len` tokens."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (n_layer, batch, n_head, max_len, head_dim)
        # on huge pages (CPU): attention streams them every step, as the matmuls do the weights
        self.keys = hugepages.empty(shape, dtype, device)
        self.values = hugepages.empty(shape, dtype, device)
        self.rows = slice(0, batch)
        self.offset = 0  # the buffer column of this view's position 0
        # whether `attend` runs here: the native library, on CPU, bfloat16 or float32 (float16 attention
        # runs in float32, see model.Attention), heads of whole vectors
        self.attends = (native.widest_variant() is not None and device.type == "cpu" and head_dim % 16 == 0
                        and dtype in (torch.bfloat16, torch.float32))

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether these buffers can hold `batch` rows of `length` tokens in this dtype and device."""
        return (
            self.batch >= batch
            and self.max_len >= length
            and self.keys.dtype == dtype
            and self.keys.device == device
        )

    def view(self, rows: slice, offset: int) -> KVCache:
        """The same buffers, narrowed to `rows`, with position 0 at buffer column `offset`."""
        narrowed = copy.copy(self)
        narrowed.rows, narrowed.offset = rows, offset
        return narrowed

    def update(
        self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `key`/`value` ([B, H, S, D]) at position `start` and return all keys/values so far."""
        begin, end = self.offset + start, self.offset + start + key.shape[2]
        keys, values = self.keys[layer, self.rows], self.values[layer, self.rows]
        keys[:, :, begin:end].copy_(key)
        values[:, :, begin:end].copy_(value)
        return keys[:, :, self.offset:end], values[:, :, self.offset:end]

    def attend(self, layer: int, start: int, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One decode step's attention in one native call: the rows' fused projection `qkv` [B, heads * 3
        * head_dim] at position `start` gives its key and value to the cache and its query attends over
        positions 0..start (`bias` [B, heads, 1, start + 1]); returns [B, heads * head_dim]."""
        return torch.ops.bloom_native.cached_attention.default(
            qkv.contiguous(), self.keys, self.values, layer, self.rows.start, self.offset,
            self.offset + start, bias, native.widest_variant())

    def move_columns(self, rows: slice, source: int, target: int, count: int) -> None:
        """Move `count` columns of `rows` from `source` to `target` (the ranges may overlap)."""
        for buffer in (self.keys, self.values):
            moved = buffer[:, rows, :, source:source + count].clone()
            buffer[:, rows, :, target:target + count].copy_(moved)

    def copy_row(self, source: int, target: int, columns: int) -> None:
        """Copy the first `columns` columns of row `source` over row `target`."""
        for buffer in (self.keys, self.values):
            buffer[:, target, :, :columns].copy_(buffer[:, source, :, :columns])

    def clear(self, rows: slice, columns: slice) -> None:
        """Zero a region, so masked attention over it reads finite values (0 * NaN is NaN)."""
        for buffer in (self.keys, self.values):
            buffer[:, rows, :, columns].zero_()

    def grown(self, max_len: int) -> KVCache:
        """A cache of `max_len` columns holding this one's contents."""
        n_layer, batch, n_head, old, head_dim = self.keys.shape
        bigger = KVCache(n_layer, batch, n_head, max_len, head_dim, self.keys.dtype, self.keys.device)
        bigger.keys[:, :, :, :old].copy_(self.keys)
        bigger.values[:, :, :, :old].copy_(self.values)
        return bigger
