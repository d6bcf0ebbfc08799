"""BLOOM hyper-parameters: read from a Hugging Face `config.json`, or from a preset.

It holds the network's shape only: how a checkpoint is deployed (cut for tensor
parallelism, quantized) is read beside it from the same file, by layout.py.

Published BLOOM configs spell the same field several ways (`n_embed` in
bloom-7b1, `hidden_size` in newer saves; `num_attention_heads` or `n_head`), so
the reader accepts every alias and the dataclass holds one canonical name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

# canonical name -> spellings found in published config.json files, first wins
_ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embed"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
}


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """The shape of a BLOOM network and the token ids generation needs."""

    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    seq_length: int = 2048

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "seq_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head:
            raise ConfigError(
                f"config: hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"config: layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> BloomConfig:
        """Build from a `config.json` mapping; `source` names the file in errors."""
        if raw.get("model_type", "bloom") != "bloom":
            raise ConfigError(f"{source}: model_type is {raw['model_type']!r}, expected 'bloom'")
        values: dict[str, Any] = {}
        for name, spellings in _ALIASES.items():
            found = [s for s in spellings if s in raw]
            if not found:
                raise ConfigError(f"{source}: missing key {' or '.join(spellings)!r}")
            values[name] = raw[found[0]]
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in values}
        for name, default in defaults.items():
            value = raw.get(name, default)
            values[name] = default if value is None else value
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {str(err).removeprefix('config: ')}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> BloomConfig:
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` mapping that both this runtime and `transformers` read."""
        out = dataclasses.asdict(self)
        out.update(model_type="bloom", architectures=["BloomForCausalLM"])
        return out


def read_json(path: str | Path) -> dict[str, Any]:
    """A config.json as a mapping, or a `ConfigError` naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


# The published shapes (https://huggingface.co/bigscience). 176b is for `info` only.
PRESETS: dict[str, BloomConfig] = {
    "bloom-560m": BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "bloom-1b1": BloomConfig(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16),
    "bloom-1b7": BloomConfig(vocab_size=250880, hidden_size=2048, n_layer=24, n_head=16),
    "bloom-3b": BloomConfig(vocab_size=250880, hidden_size=2560, n_layer=30, n_head=32),
    "bloom-7b1": BloomConfig(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32),
    "bloom-176b": BloomConfig(vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112),
}
INFO_ONLY_PRESETS = frozenset({"bloom-176b"})


def preset(name: str) -> BloomConfig:
    """The config of a published BLOOM size, by name (`bloom-560m` … `bloom-176b`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
