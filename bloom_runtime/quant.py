"""INT8 linears and the recipes that make them: W8A16 (weight-only) and W8A8.

Weights are int8, symmetric, one scale per output channel. Activations are
either left in float (W8A16) or quantized to int8 (W8A8): per token at run
time ("dynamic"), or per tensor with a scale from calibration ("static"),
optionally asymmetric with a zero point ("static-asym", the Ascend modelslim
recipe). W8A8 multiplies int8 by int8 into int32 with `torch._int_mm`, then
rescales once: no float matmul on dequantized weights.

SmoothQuant (Xiao et al. 2023) moves activation outliers into the weights:
x W^T = (x / s)(W s)^T with s_j = max|x_j|^alpha / max|W_j|^(1-alpha). For the
two projections fed by a LayerNorm (query_key_value, dense_h_to_4h) 1/s folds
into that LayerNorm's gain and bias, so smoothing costs nothing at run time.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .calibration import collect
from .errors import ConfigError, InputError
from .kernels import int8_matmul, weight_only_matmul

QUANT_NAMES = ("w8a8", "w8a8-static", "w8a16")
ACTIVATIONS = ("dynamic", "static", "static-asym")
LINEARS = ("self_attention.query_key_value", "self_attention.dense",
           "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")  # fmt: skip
# LayerNorm -> the projection it feeds, where SmoothQuant can fold its scales.
SMOOTHABLE = {"input_layernorm": "self_attention.query_key_value",
              "post_attention_layernorm": "mlp.dense_h_to_4h"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how. `activation` is None for weight-only (W8A16)."""

    activation: str | None = "dynamic"
    alpha: float | None = 0.5  # SmoothQuant migration strength; None = no smoothing
    float_layers: tuple[int, ...] = ()  # blocks kept entirely in float
    int8_head: bool = False  # the tied embedding/head in weight-only int8 too

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise InputError(f"activation {self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"alpha must be in [0, 1], got {self.alpha}")

    @property
    def scheme(self) -> str:
        return "w8a16" if self.activation is None else "w8a8"

    @property
    def needs_calibration(self) -> bool:
        return self.activation in ("static", "static-asym") or (
            self.activation is not None and self.alpha is not None
        )

    @classmethod
    def from_name(cls, name: str) -> QuantSpec:
        """The spec behind `load(quant=...)`: w8a8, w8a8-static, w8a16."""
        if name == "w8a16":
            return cls(activation=None, alpha=None, int8_head=True)
        if name == "w8a8":
            return cls(activation="dynamic")
        if name == "w8a8-static":
            return cls(activation="static")
        raise InputError(f"quant {name!r}: expected one of {', '.join(QUANT_NAMES)}")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], float32 scale [out, 1])."""
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinear(nn.Module):
    """W8A16: y = x (q * scale)^T + b, with the weight kept in int8.

    Parameter names and shapes are compressed-tensors': `weight` int8 [out, in],
    `weight_scale` float32 [out, 1].
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = weight_only_matmul(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """W8A8: int8 activations times int8 weights, accumulated in int32.

    `input_scale` None means per-token dynamic scales; otherwise one static
    scale, and with `input_zero_point` an asymmetric one. The zero point's
    contribution, zp * sum_k q[n, k], is subtracted from the int32 sums.

    `reduce_absmax`, when set (by parallel.py on row-parallel ranks, which each
    see a slice of a token), makes per-token scales span the whole token, so
    tensor-parallel runs quantize exactly as a single device does.
    """

    reduce_absmax = None
    _row_sums: torch.Tensor | None = None

    def _weight_row_sums(self) -> torch.Tensor:
        """sum_k q[n, k] in int32, computed on first use: re-summing the weight every call
        would read it twice per matmul. Computed lazily because checkpoints assign the
        weight after construction; inference never changes it."""
        if self._row_sums is None:
            self._row_sums = self.weight.sum(dim=1, dtype=torch.int32)
        return self._row_sums

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | None = None,
        input_zero_point: torch.Tensor | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.input_scale = None if input_scale is None else nn.Parameter(input_scale.float(), False)
        self.input_zero_point = (
            None if input_zero_point is None else nn.Parameter(input_zero_point, requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.input_scale is None:
            absmax = flat.abs().amax(dim=1, keepdim=True)
            if self.reduce_absmax is not None:
                absmax = self.reduce_absmax(absmax)
            scale = absmax.clamp(min=1e-8) / 127.0
        else:
            scale = self.input_scale
        q = torch.round(flat / scale)
        if self.input_zero_point is not None:
            q = q + self.input_zero_point.float()
        q = q.clamp(-128, 127).to(torch.int8)
        acc = int8_matmul(q, self.weight.t())
        if self.input_zero_point is not None:
            acc = acc - self.input_zero_point.int() * self._weight_row_sums()
        y = acc.float() * (scale * self.weight_scale.view(-1))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def static_input_params(
    low: torch.Tensor, high: torch.Tensor, asymmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor (scale, zero point) from calibrated activation min/max."""
    if not asymmetric:
        return (torch.maximum(low.abs(), high.abs()).clamp(min=1e-8) / 127.0).reshape(1), None
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = ((high - low).clamp(min=1e-8) / 255.0).reshape(1)
    zero_point = (-128 - torch.round(low / scale)).clamp(-128, 127).to(torch.int8).reshape(1)
    return scale, zero_point


def smooth_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|x|^alpha / max|W|^(1-alpha)."""
    w_max = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def fold_smoothing(norm: nn.LayerNorm, linear: nn.Linear, factors: torch.Tensor) -> None:
    """Divide the LayerNorm's output by `factors` and multiply the linear's inputs by them."""
    f = factors.to(norm.weight.device)
    norm.weight.div_(f.to(norm.weight.dtype))
    norm.bias.div_(f.to(norm.bias.dtype))
    linear.weight.mul_(f.to(linear.weight.dtype)[None, :])


def quantized_linear_names(n_layer: int, spec: QuantSpec) -> list[str]:
    """Module names of the linears `spec` turns into int8 (all but the float layers')."""
    return [f"h.{i}.{linear}" for i in range(n_layer) if i not in spec.float_layers for linear in LINEARS]


def ignored_names(n_layer: int, spec: QuantSpec) -> list[str]:
    """What stays float, named as compressed-tensors' `ignore` names it."""
    head = [] if spec.int8_head else ["lm_head"]
    return head + [f"transformer.h.{i}.{linear}" for i in spec.float_layers for linear in LINEARS]


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, calib_ids: torch.Tensor | None) -> None:
    """Smooth (if asked and safe), calibrate, and swap the block linears for int8 ones, in place.

    Smoothing is skipped when the config puts the residual after the LayerNorm:
    there the LayerNorm's output is also the residual, so its scales cannot move.
    """
    config = model.config
    for layer in spec.float_layers:
        if not 0 <= layer < config.n_layer:
            raise InputError(f"float layer {layer} is outside the model's {config.n_layer} layers")
    targets = quantized_linear_names(config.n_layer, spec)
    if spec.needs_calibration and calib_ids is None:
        raise InputError(f"{spec}: needs calibration data")
    post_ln_residual = config.apply_residual_connection_post_layernorm
    if spec.activation is not None and spec.alpha is not None and not post_ln_residual:
        _smooth(model, spec, calib_ids)
    stats = {}
    if spec.activation in ("static", "static-asym"):
        stats = collect(model, calib_ids, targets)
    replace_linears(model, spec, lambda name, linear: _int8_module(linear, spec, stats.get(name)))
    if spec.int8_head:
        embedding = model.word_embeddings
        embedding.to_int8(*quantize_weight(embedding.weight), compute_dtype=embedding.weight.dtype)


def _smooth(model: nn.Module, spec: QuantSpec, calib_ids: torch.Tensor) -> None:
    blocks = [i for i in range(model.config.n_layer) if i not in spec.float_layers]
    names = [f"h.{i}.{linear}" for i in blocks for linear in SMOOTHABLE.values()]
    stats = collect(model, calib_ids, names)
    for i in blocks:
        block = model.h[i]
        for norm_name, linear_name in SMOOTHABLE.items():
            linear = block.get_submodule(linear_name)
            factors = smooth_factors(stats[f"h.{i}.{linear_name}"].channel_absmax, linear.weight, spec.alpha)
            fold_smoothing(getattr(block, norm_name), linear, factors)


def _int8_module(linear: nn.Linear, spec: QuantSpec, stats) -> nn.Module:
    weight, scale = quantize_weight(linear.weight)
    bias = linear.bias
    if spec.activation is None:
        return Int8WeightOnlyLinear(weight, scale, bias)
    if stats is None:
        return Int8Linear(weight, scale, bias)
    input_scale, zero_point = static_input_params(stats.low, stats.high, spec.activation == "static-asym")
    return Int8Linear(weight, scale, bias, input_scale, zero_point)


def int8_skeleton(linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    """An empty int8 module shaped like `linear`, for a quantized checkpoint to fill."""
    out_f, in_f = linear.weight.shape
    weight = torch.empty(out_f, in_f, dtype=torch.int8)
    scale = torch.empty(out_f, 1)
    if spec.activation is None:
        return Int8WeightOnlyLinear(weight, scale, linear.bias)
    static = spec.activation in ("static", "static-asym")
    zero_point = torch.empty(1, dtype=torch.int8) if spec.activation == "static-asym" else None
    return Int8Linear(weight, scale, linear.bias, torch.empty(1) if static else None, zero_point)


def replace_linears(model: nn.Module, spec: QuantSpec, make) -> None:
    """Swap every linear `spec` quantizes for `make(name, linear)`."""
    modules = dict(model.named_modules())
    for name in quantized_linear_names(model.config.n_layer, spec):
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name], attr, make(name, modules[name]))


def to_quantization_config(spec: QuantSpec, n_layer: int, **provenance) -> dict:
    """`spec` as a compressed-tensors `quantization_config` for config.json."""
    activations = None
    if spec.activation is not None:
        activations = {
            "num_bits": 8, "type": "int", "symmetric": spec.activation != "static-asym",
            "strategy": "token" if spec.activation == "dynamic" else "tensor",
            "dynamic": spec.activation == "dynamic",
        }  # fmt: skip
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized" if spec.activation is None else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear", "Embedding"] if spec.int8_head else ["Linear"],
                        "weights": weights, "input_activations": activations}
        },
        "ignore": ignored_names(n_layer, spec),
        "bloom_runtime": {"smoothquant_alpha": spec.alpha, **provenance},
    }


def spec_from_quantization_config(raw: dict, n_layer: int, source: str) -> QuantSpec:
    """Read back what `to_quantization_config` wrote (and what other tools write alike)."""
    if raw.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{source}: quantization_config.quant_method {raw.get('quant_method')!r} "
                          "is not supported; expected 'compressed-tensors'")
    try:
        (group,) = raw["config_groups"].values()
        weights, acts = group["weights"], group.get("input_activations")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"{source}: quantization_config needs exactly one config group "
                          "with 'weights'") from None
    if (weights.get("num_bits"), weights.get("strategy"), weights.get("symmetric")) != (8, "channel", True):
        raise ConfigError(f"{source}: only int8 symmetric per-channel weights are supported, got {weights}")
    if acts is None:
        activation = None
    elif acts.get("dynamic"):
        activation = "dynamic"
    else:
        activation = "static" if acts.get("symmetric", True) else "static-asym"
    ignored = set(raw.get("ignore", []))
    float_layers = tuple(i for i in range(n_layer) if f"transformer.h.{i}.{LINEARS[0]}" in ignored)
    alpha = raw.get("bloom_runtime", {}).get("smoothquant_alpha")
    return QuantSpec(activation=activation, alpha=alpha, float_layers=float_layers,
                     int8_head="lm_head" not in ignored)
