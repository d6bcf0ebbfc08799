"""The outer products' weight layout (variant.h's `outer`): blocks of 32 output columns.

Block b holds weight rows 32b .. 32b + 31 as lines of one 32-bit unit of inputs per row
(2 bfloat16 or 4 int8), line p's unit c holding row 32b + c's inputs U p .. U p + U - 1, zeros
past the last row and input. A line is what one broadcast activation unit multiplies: 16 rows
a vector, two vectors a line. The blocks replace the weight (held once), and give back the
whole of it (`unblock`: `state_dict`) or any of its rows (`block_rows`: a tied head's lookups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32  # weight rows (output columns) of a block: variant.h's OUT_NB
UNIT_BYTES = 4  # what one lane of a vector takes from an activation row


def _unit(weight: torch.Tensor) -> int:
    return UNIT_BYTES // weight.element_size()


def outer_blocks(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] weight of 2-byte or 1-byte elements as blocks [ceil(N / 32), ceil(K / U), 32 U]."""
    n, k = weight.shape
    unit = _unit(weight)
    pad = (0, -k % unit, 0, -n % BLOCK)
    padded = F.pad(weight, pad) if any(pad) else weight.contiguous()  # F.pad copies even adding nothing
    lines = padded.shape[1] // unit
    return padded.view(-1, BLOCK, lines, unit).transpose(1, 2).reshape(-1, lines, BLOCK * unit)


def unblock(blocks: torch.Tensor, outputs: int, inputs: int) -> torch.Tensor:
    """`outer_blocks`'s weight back: [outputs, inputs]."""
    unit = blocks.shape[2] // BLOCK
    rows = blocks.view(blocks.shape[0], blocks.shape[1], BLOCK, unit).transpose(1, 2)
    return rows.reshape(-1, unit * blocks.shape[1])[:outputs, :inputs].contiguous()


def block_rows(blocks: torch.Tensor, inputs: int, ids: torch.Tensor) -> torch.Tensor:
    """The weight's rows `ids` (any shape) from its blocks: [*ids.shape, inputs]."""
    flat = ids.reshape(-1)
    unit = blocks.shape[2] // BLOCK
    lines = blocks.view(blocks.shape[0], blocks.shape[1], BLOCK, unit)
    picked = lines[flat // BLOCK, :, flat % BLOCK]  # [len(ids), lines, unit]
    return picked.reshape(len(flat), -1)[:, :inputs].view(*ids.shape, inputs)


class OuterBlocked:
    """A kernel mixin: the owner's weight laid out as blocks at load, in place of it (held once);
    `state_dict` (`restore`) and a tied head's lookups (`rows`) read it back from them."""

    drops = ("weight",)
    lookups = True

    def __init__(self, owner) -> None:
        super().__init__(owner)
        self.outputs, self.inputs = owner.weight.shape
        self.register_buffer("blocks", outer_blocks(owner.weight.detach()), persistent=False)

    def restore(self, name: str) -> torch.Tensor:
        return unblock(self.blocks, self.outputs, self.inputs)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows `ids` (any shape): [*ids.shape, inputs]."""
        return block_rows(self.blocks, self.inputs, ids)
