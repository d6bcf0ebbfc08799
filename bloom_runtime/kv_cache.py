"""A preallocated key/value cache: one allocation per generation, none per step.

Keys and values live in `[n_layer, batch, n_head, max_len, head_dim]` buffers.
Left padding aligns every row, so all rows write the same slot at each step and
the attention kernels read a plain slice `[..., :length, :]`.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value storage for `batch` rows of up to `max_len` tokens."""

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
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache can be reused for a generation of this size."""
        return (
            self.batch == batch
            and self.max_len >= length
            and self.keys.dtype == dtype
            and self.keys.device == device
        )

    def update(
        self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `key`/`value` ([B, H, S, D]) at `start` and return all keys/values so far."""
        end = start + key.shape[2]
        self.keys[layer, :, :, start:end].copy_(key)
        self.values[layer, :, :, start:end].copy_(value)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
