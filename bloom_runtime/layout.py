"""How a checkpoint is laid out for deployment, read beside the architecture in config.json.

`tp_size` > 1 marks a checkpoint cut for that many tensor-parallel ranks (`weights
cut`); `quantization_config` marks a quantized one (compressed-tensors form, see
quant/compressed_tensors.py). Both are facts about the files, not the network, so
they live here and `BloomConfig` holds the network's shape only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Layout:
    tp_size: int = 1
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tp_size, int) or isinstance(self.tp_size, bool) or self.tp_size < 1:
            raise ConfigError(f"config: tp_size must be a positive integer, got {self.tp_size!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Layout:
        try:
            return cls(raw.get("tp_size") or 1, raw.get("quantization_config"))
        except ConfigError as err:
            raise ConfigError(f"{source}: {str(err).removeprefix('config: ')}") from None

    @property
    def cut(self) -> bool:
        return self.tp_size > 1

    def to_dict(self) -> dict[str, Any]:
        """The config.json entries that record this layout (none for a plain float checkpoint)."""
        out: dict[str, Any] = {}
        if self.cut:
            out["tp_size"] = self.tp_size
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config
        return out
