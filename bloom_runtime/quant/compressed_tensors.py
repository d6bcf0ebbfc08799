"""A `QuantSpec` as compressed-tensors' `quantization_config` (config.json), and back.

Each scheme class carries its own description (FORMAT, WEIGHTS, ACTIVATIONS);
reading a config finds the scheme whose description it matches, so checkpoints
that other tools wrote alike load too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import PREFIX
from ..errors import ConfigError
from .schemes import HEADS, LINEARS
from .spec import QuantSpec

HEAD_NAME = "lm_head"  # what compressed-tensors calls the tied head in `ignore`
# compressed-tensors' QuantizationArgs defaults, for descriptions that leave a field out
_DEFAULTS = {"type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}


def to_quantization_config(spec: QuantSpec, model: nn.Module, **provenance: Any) -> dict:
    """`spec` (applied to the float `model`) as a compressed-tensors `quantization_config`."""
    cls = spec.linear_class
    floats = [PREFIX + name for i in spec.float_layers for name in model.block_linears()[i]]
    return {
        "quant_method": "compressed-tensors",
        "format": cls.FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear", "Embedding"] if spec.head else ["Linear"],
                        "weights": cls.WEIGHTS, "input_activations": cls.ACTIVATIONS}
        },
        "ignore": ([] if spec.head else [HEAD_NAME]) + floats,
        "bloom_runtime": {"smoothquant_alpha": spec.alpha, **provenance},
    }


def from_quantization_config(raw: dict, model: nn.Module, source: str) -> QuantSpec:
    """The spec a `quantization_config` describes, for the float skeleton `model`."""
    if raw.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{source}: quantization_config.quant_method {raw.get('quant_method')!r} "
                          "is not supported; expected 'compressed-tensors'")
    try:
        (group,) = raw["config_groups"].values()
        weights, acts = group["weights"], group.get("input_activations")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"{source}: quantization_config needs exactly one config group "
                          "with 'weights'") from None
    found = [name for name, cls in LINEARS.items()
             if _same(cls.WEIGHTS, weights) and _same(cls.ACTIVATIONS, acts)]
    if not found:
        raise ConfigError(f"{source}: no supported scheme has weights {weights} and input activations "
                          f"{acts}; supported: {', '.join(LINEARS)}")
    ignored = set(raw.get("ignore") or [])
    float_layers = tuple(i for i, linears in enumerate(model.block_linears())
                         if any(PREFIX + name in ignored for name in linears))
    head = found[0] if HEAD_NAME not in ignored and found[0] in HEADS else None
    alpha = (raw.get("bloom_runtime") or {}).get("smoothquant_alpha")
    return QuantSpec(found[0], alpha=alpha, float_layers=float_layers, head=head)


def _same(declared: dict | None, given: dict | None) -> bool:
    """Whether a description `given` in a config means the scheme's `declared` one."""
    if declared is None or given is None:
        return declared is given
    return all(given.get(key, _DEFAULTS.get(key)) == value for key, value in declared.items())
