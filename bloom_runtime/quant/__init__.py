"""Quantization: a scheme per module class (int8.py), their registry (schemes.py), the recipe
(spec.py), applying it (quantize.py, smoothquant.py), and the compressed-tensors form
(compressed_tensors.py)."""

from .base import QuantizedLinear
from .compressed_tensors import from_quantization_config, head_aliases, to_quantization_config
from .int8 import (
    Int8Linear,
    Int8StaticAsymLinear,
    Int8StaticLinear,
    Int8TiedEmbedding,
    Int8WeightOnlyLinear,
    quantize_weight,
)
from .quantize import quantize_model, quantized_skeleton
from .schemes import HEADS, LINEARS
from .spec import QuantSpec

__all__ = [
    "HEADS", "LINEARS", "Int8Linear", "Int8StaticAsymLinear", "Int8StaticLinear", "Int8TiedEmbedding",
    "Int8WeightOnlyLinear", "QuantSpec", "QuantizedLinear", "from_quantization_config", "head_aliases",
    "quantize_model",
    "quantize_weight", "quantized_skeleton", "to_quantization_config",
]  # fmt: skip
