"""The cases of a latency run: (batch, seq_in, seq_out), as the guide's performance mode chose them."""

from __future__ import annotations

import dataclasses
import itertools

from ..errors import InputError


@dataclasses.dataclass(frozen=True, order=True)
class Case:
    batch: int
    seq_in: int
    seq_out: int

    @property
    def key(self) -> str:
        return f"b{self.batch}_in{self.seq_in}_out{self.seq_out}"


def from_ranges(batches: list[int], in_range: tuple[int, int], out_range: tuple[int, int]) -> list[Case]:
    """Cartesian grid over 2^a..2^b input and output lengths (inclusive), per batch size."""
    ins, outs = (_powers(r, flag) for r, flag in ((in_range, "in"), (out_range, "out")))
    return [Case(b, i, o) for b, i, o in itertools.product(_positive(batches), ins, outs)]


def from_pairs(batches: list[int], ins: list[int], outs: list[int]) -> list[Case]:
    """Zipped (seq_in, seq_out) pairs, per batch size."""
    if len(ins) != len(outs):
        raise InputError(f"--seqlen-in-pair has {len(ins)} values but --seqlen-out-pair has {len(outs)}")
    _positive(ins + outs, "sequence lengths")
    return [Case(b, i, o) for b in _positive(batches) for i, o in zip(ins, outs)]


def _powers(exponents: tuple[int, int], which: str) -> list[int]:
    low, high = exponents
    if not 0 <= low <= high <= 16:
        raise InputError(f"--seqlen-{which}-range {low} {high}: need 0 <= A <= B <= 16 (2^A..2^B)")
    return [2**e for e in range(low, high + 1)]


def _positive(values: list[int], what: str = "batch sizes") -> list[int]:
    if not values or any(v < 1 for v in values):
        raise InputError(f"{what} must be positive integers, got {values}")
    return values
