"""The registry of quantization schemes, by the names users pass (`--quant`, `--scheme`).

Adding a scheme: its module class (see base.py) and one line here; a kernel in
a role in kernels/ if none of those fits; tests.
"""

from __future__ import annotations

from . import int4
from .base import QuantizedLinear
from .int8 import (
    Int8DynamicTiedEmbedding,
    Int8Linear,
    Int8StaticAsymLinear,
    Int8StaticLinear,
    Int8TiedEmbedding,
    Int8WeightOnlyLinear,
)

LINEARS: dict[str, type[QuantizedLinear]] = {
    cls.scheme: cls for cls in (Int8Linear, Int8StaticLinear, Int8StaticAsymLinear, Int8WeightOnlyLinear,
                                *int4.LINEARS)
}
# Schemes that also quantize the tied embedding/head by default (`--float-head` keeps it float).
HEADS = {cls.scheme: cls for cls in (Int8TiedEmbedding, Int8DynamicTiedEmbedding, *int4.HEADS)}
