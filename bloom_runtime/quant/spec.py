"""`QuantSpec`: what to quantize and how, from a scheme name or the `weights quant` flags."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import InputError
from .base import QuantizedLinear
from .schemes import HEADS, LINEARS

PORTABLE_HEAD = "w8a16"  # int8 rows, weight-only: the head every reader of compressed-tensors runs


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A recipe: the scheme of the block linears, SmoothQuant's strength (None: off), blocks
    kept in float, and the scheme of the tied embedding/head (None: float)."""

    linear: str = "w8a8"
    alpha: float | None = 0.5
    float_layers: tuple[int, ...] = ()
    head: str | None = None

    def __post_init__(self) -> None:
        if self.linear not in LINEARS:
            raise InputError(f"quant {self.linear!r}: expected one of {', '.join(LINEARS)}")
        if self.head is not None and self.head not in HEADS:
            raise InputError(f"head scheme {self.head!r}: expected one of {', '.join(HEADS)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"alpha must be in [0, 1], got {self.alpha}")

    @classmethod
    def from_name(cls, name: str) -> QuantSpec:
        """The default recipe of a scheme, as `load(quant=name)` applies it: its SmoothQuant strength
        (W8A8's 0.5), and the head quantized where the scheme has a head form."""
        if name not in LINEARS:
            raise InputError(f"quant {name!r}: expected one of {', '.join(LINEARS)}")
        return cls(name, alpha=LINEARS[name].SMOOTHQUANT_ALPHA, head=name if name in HEADS else None)

    @classmethod
    def written(cls, name: str) -> QuantSpec:
        """The default recipe `weights quant` writes: `from_name`'s, with a head that other engines
        read (a checkpoint is for them too): where the scheme's own head form is not read
        elsewhere (int4), the weight-only int8 head, as llm-compressor keeps W4A16 heads apart."""
        spec = cls.from_name(name)
        if spec.head is not None and not HEADS[spec.head].READ_ELSEWHERE:
            spec = dataclasses.replace(spec, head=PORTABLE_HEAD)
        return spec

    @property
    def linear_class(self) -> type[QuantizedLinear]:
        return LINEARS[self.linear]

    @property
    def smooths(self) -> bool:
        """SmoothQuant applies: asked for, and the scheme quantizes activations."""
        return self.alpha is not None and self.linear_class.ACTIVATIONS is not None

    @property
    def needs_calibration(self) -> bool:
        return self.smooths or self.linear_class.calibrated

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The block linears this recipe quantizes (all but the float layers'), by name."""
        n_layer = len(model.h)
        for layer in self.float_layers:
            if not 0 <= layer < n_layer:
                raise InputError(f"float layer {layer} is outside the model's {n_layer} layers")
        return {name: module for i, linears in enumerate(model.block_linears())
                if i not in self.float_layers for name, module in linears.items()}
