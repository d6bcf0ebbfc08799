"""A `QuantSpec` as compressed-tensors' `quantization_config` (config.json), and back.

Each scheme class carries its own description (FORMAT, WEIGHTS, ACTIVATIONS);
reading a config finds the scheme whose description it matches, so checkpoints
that other tools wrote alike load too.

The tied embedding/head has no single compressed-tensors form: transformers sees
two modules, an `Embedding` (whose input is token ids, never quantized) and the
`lm_head` Linear tied to it. So a quantized head is written as two groups, the
embedding weight-only and `lm_head` with the head's own activations, and its
scale is written a second time under `lm_head.weight_scale` (transformers ties
only `weight`). An int4 head is written in the same form, but transformers 5.24 runs
no packed `Embedding` (it has no `weight`), so only this runtime loads it: other
engines need `--float-head` with int4. Checkpoints from before,
with one group targeting both, still read. Packed (int4) weights also carry their
unpacked shape, `weight_shape`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..checkpoint import PREFIX
from ..errors import ConfigError
from . import int4
from .int8 import Int8TiedEmbedding
from .schemes import HEADS, LINEARS
from .spec import QuantSpec

HEAD_NAME = "lm_head"  # what compressed-tensors calls the tied head in `ignore`
# compressed-tensors' QuantizationArgs defaults, for descriptions that leave a field out
_DEFAULTS = {"type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}


def to_quantization_config(spec: QuantSpec, model: nn.Module, **provenance: Any) -> dict:
    """`spec` (applied to the float `model`) as a compressed-tensors `quantization_config`."""
    cls = spec.linear_class
    floats = [PREFIX + name for i in spec.float_layers for name in model.block_linears()[i]]
    groups = [_group(["Linear"], cls.FORMAT, cls.WEIGHTS, cls.ACTIVATIONS)]
    if spec.head:  # first, so that compressed-tensors matches `lm_head` by name before "Linear"
        head = HEADS[spec.head]
        groups[:0] = [_group([HEAD_NAME], head.FORMAT, head.WEIGHTS, head.ACTIVATIONS),
                      _group(["Embedding"], head.FORMAT, head.WEIGHTS, None)]
    return {
        "quant_method": "compressed-tensors",
        "format": cls.FORMAT,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups)},
        "ignore": ([] if spec.head else [HEAD_NAME]) + floats,
        "bloom_runtime": {"smoothquant_alpha": spec.alpha, **provenance},
    }


def extra_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors compressed-tensors reads that the runtime does not (full names): an int8 tied
    head's scale under `lm_head`'s own name (readers untie the head), and each packed
    weight's unpacked shape."""
    extra = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8TiedEmbedding):
            extra[f"{HEAD_NAME}.weight_scale"] = module.weight_scale.detach().clone()
        if isinstance(module, int4.Int4Weights):
            module.check_storable(name)
            extra[f"{PREFIX}{name}.weight_shape"] = torch.tensor([module.int4_scales().shape[0],
                                                                  module.in_features])
    return extra


def _group(targets: list[str], fmt: str, weights: dict, activations: dict | None) -> dict:
    return {"targets": targets, "format": fmt, "weights": weights, "input_activations": activations}


def from_quantization_config(raw: dict, model: nn.Module, source: str) -> QuantSpec:
    """The spec a `quantization_config` describes, for the float skeleton `model`."""
    if raw.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{source}: quantization_config.quant_method {raw.get('quant_method')!r} "
                          "is not supported; expected 'compressed-tensors'")
    groups = _groups_by_target(raw, source)
    if "Linear" not in groups:
        raise ConfigError(f"{source}: quantization_config has no config group targeting 'Linear'")
    linear = _scheme(LINEARS, groups["Linear"], source)
    ignored = set(raw.get("ignore") or [])
    float_layers = tuple(i for i, linears in enumerate(model.block_linears())
                         if any(PREFIX + name in ignored for name in linears))
    head = None
    if HEAD_NAME not in ignored and (HEAD_NAME in groups or "Embedding" in groups):
        head = _scheme(HEADS, groups.get(HEAD_NAME, groups["Linear"]), source)
    alpha = (raw.get("bloom_runtime") or {}).get("smoothquant_alpha")
    return QuantSpec(linear, alpha=alpha, float_layers=float_layers, head=head)


def _groups_by_target(raw: dict, source: str) -> dict[str, dict]:
    try:
        return {target: group for group in raw["config_groups"].values() for target in group["targets"]
                if group["weights"] is not None}
    except (KeyError, TypeError, AttributeError):
        raise ConfigError(f"{source}: quantization_config needs config groups with 'targets' "
                          "and 'weights'") from None


def _scheme(registry: dict[str, type], group: dict, source: str) -> str:
    """The name of the scheme in `registry` whose description `group` matches."""
    weights, acts = group["weights"], group.get("input_activations")
    for name, cls in registry.items():
        if _same(cls.WEIGHTS, weights) and _same(cls.ACTIVATIONS, acts):
            return name
    raise ConfigError(f"{source}: no supported scheme has weights {weights} and input activations "
                      f"{acts}; supported: {', '.join(registry)}")


def _same(declared: dict | None, given: dict | None) -> bool:
    """Whether a description `given` in a config means the scheme's `declared` one."""
    if declared is None or given is None:
        return declared is given
    return all(given.get(key, _DEFAULTS.get(key)) == value for key, value in declared.items())
