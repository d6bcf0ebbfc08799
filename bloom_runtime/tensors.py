"""What each parameter is in a checkpoint: how it is validated and cast, and how tensor
parallelism splits it.

Every module whose parameters a checkpoint holds declares them in a class-level
`STORED` table (leaf name -> `Stored`). The loader derives the tensors a
checkpoint must hold from a skeleton model and these tables, `parallel.py` cuts
them by the axes named here, and nothing else in the package spells a tensor's
name or shape.
"""

from __future__ import annotations

import dataclasses

from torch import nn

# How a stored tensor is checked and cast: a float parameter (cast to the model's dtype),
# an integer payload (kept as stored: int8 weights and zero points, packed int4 words),
# or a quantization scale (float32, finite, > 0).
FLOAT, INT, SCALE = "float", "int", "scale"
# The axes a split can cut: a linear's outputs, its inputs, or the vocabulary rows.
OUT, IN, VOCAB = "out", "in", "vocab"


@dataclasses.dataclass(frozen=True)
class Stored:
    """One parameter as a checkpoint holds it.

    `axes` names each dimension (OUT, IN, VOCAB or None). `summed` marks a term
    added after the matmul (a bias): where tensor parallelism all-reduces the
    outputs, one rank holds it and the others zeros, so it is added once.
    """

    kind: str = FLOAT
    axes: tuple[str | None, ...] = ()
    summed: bool = False


REPLICATED = Stored()


def declarations(model: nn.Module) -> dict[str, tuple[Stored, str | None]]:
    """Every parameter of `model` by name: its declaration and its module's tensor-parallel split."""
    return {f"{prefix}{'.' if prefix else ''}{leaf}": (stored(module, leaf), getattr(module, "split", None))
            for prefix, module in model.named_modules() for leaf, _ in module.named_parameters(recurse=False)}


def stored(module: nn.Module, leaf: str) -> Stored:
    """The declaration of `module.<leaf>`; parameters of undeclared modules (LayerNorms) are
    float and replicated on every rank."""
    return getattr(module, "STORED", {}).get(leaf, REPLICATED)
