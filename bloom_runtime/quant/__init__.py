"""Quantization: a scheme per module class (int8.py, int4.py), their registry (schemes.py), the recipe
(spec.py), applying it (quantize.py, smoothquant.py), and the compressed-tensors form
(compressed_tensors.py)."""

from .base import QuantizedLinear
from .compressed_tensors import extra_tensors, from_quantization_config, to_quantization_config
from .int4 import Int4WeightOnlyLinear
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
    "HEADS", "LINEARS", "Int4WeightOnlyLinear", "Int8Linear", "Int8StaticAsymLinear", "Int8StaticLinear",
    "Int8TiedEmbedding",
    "Int8WeightOnlyLinear", "QuantSpec", "QuantizedLinear", "extra_tensors", "from_quantization_config",
    "quantize_model",
    "quantize_weight", "quantized_skeleton", "to_quantization_config",
]  # fmt: skip
