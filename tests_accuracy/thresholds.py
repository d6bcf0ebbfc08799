"""The thresholds table (thresholds.csv), so that limits live in one place, not in test code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

TABLE = Path(__file__).parent / "thresholds.csv"


def _number(value: str) -> float | None:
    return float(value) if value != "" else None


@dataclass(frozen=True)
class Threshold:
    """One path's limits; a limit left empty in the table is not checked (None)."""

    model: str
    method: str
    dtype: str
    quant: str | None
    tp: int
    baseline_path: str | None  # "method/dtype" of the float tp=1 path this one is compared with
    reference: float | None  # a published Avg (the guide's), checked within max_drop
    min_accuracy: float
    max_drop: float | None
    max_kl: float | None
    max_dp: float | None
    min_agreement: float | None

    @property
    def baseline(self) -> tuple | None:
        if self.baseline_path is None:
            return None
        method, dtype = self.baseline_path.split("/")
        return (self.model, method, dtype, None, 1)

    @property
    def key(self) -> tuple:
        return (self.model, self.method, self.dtype, self.quant, self.tp)

    @property
    def label(self) -> str:
        return f"{self.model}-{self.method}-{self.dtype}-{self.quant or 'float'}-tp{self.tp}"


def load(model: str) -> list[Threshold]:
    df = pd.read_csv(TABLE, comment="#", dtype=str, keep_default_na=False)
    rows = [Threshold(r.model, r.method, r.dtype, r.quant or None, int(r.tp), r.baseline or None,
                      _number(r.reference), float(r.min_accuracy), _number(r.max_drop), _number(r.max_kl),
                      _number(r.max_dp), _number(r.min_agreement))
            for r in df.itertuples() if r.model == model]
    for row in rows:
        if row.baseline == row.key:
            raise ValueError(f"{TABLE}: {row.label} is its own baseline, which checks nothing")
    return rows
