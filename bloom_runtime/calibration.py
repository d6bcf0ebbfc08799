"""Calibration for INT8: which text to run, and the activation statistics it yields.

Samples are fixed-length token windows (no padding, so every position counts)
drawn at seeded offsets from a text: the user's file, or the embedded model's
calibration text. A model without a tokenizer (random presets) is calibrated
on seeded random token ids. The same seed gives the same windows, statistics
and scales.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .embedded import CALIBRATION_TEXT
from .errors import InputError
from .tokenizer import Tokenizer


@dataclasses.dataclass
class ActivationStats:
    """What one linear's inputs looked like: per-channel |max|, and overall min and max."""

    channel_absmax: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.channel_absmax = torch.maximum(self.channel_absmax, flat.abs().amax(dim=0))
        self.low = torch.minimum(self.low, flat.min())
        self.high = torch.maximum(self.high, flat.max())


def calibration_ids(
    tokenizer: Tokenizer | None,
    vocab_size: int,
    samples: int,
    seq_len: int = 128,
    seed: int = 0,
    text_path: str | Path | None = None,
) -> torch.Tensor:
    """`samples` windows of `seq_len` token ids [samples, seq_len]."""
    if samples < 1:
        raise InputError(f"calibration samples must be >= 1, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    if tokenizer is None:
        if text_path is not None:
            raise InputError("calibration text needs a model with a tokenizer.json")
        return torch.randint(4, vocab_size, (samples, seq_len), generator=generator)
    path = Path(text_path) if text_path is not None else CALIBRATION_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"calibration data {path}: cannot read ({err})") from None
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise InputError(f"calibration data {path}: {ids.numel()} tokens, need at least {seq_len + 1}")
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def collect(
    model: nn.Module, ids: torch.Tensor, names: list[str], batch: int = 4
) -> dict[str, ActivationStats]:
    """Run `ids` through `model` and record the inputs of the named submodules."""
    modules = dict(model.named_modules())
    stats: dict[str, ActivationStats] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in stats:
                width = x.shape[-1]
                stats[name] = ActivationStats(
                    torch.zeros(width, device=x.device), torch.tensor(0.0, device=x.device),
                    torch.tensor(0.0, device=x.device),
                )  # fmt: skip
            stats[name].update(x)

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    device = next(model.parameters()).device
    try:
        for chunk in tqdm(ids.split(batch), desc="calibrating", unit="batch", leave=False):
            chunk = chunk.to(device)
            model(chunk, torch.ones_like(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return stats
