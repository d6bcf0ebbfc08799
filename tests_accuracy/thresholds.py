"""The thresholds table (thresholds.csv), so that limits live in one place, not in test code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

TABLE = Path(__file__).parent / "thresholds.csv"


@dataclass(frozen=True)
class Threshold:
    model: str
    method: str
    dtype: str
    quant: str | None
    tp: int
    baseline_dtype: str
    min_accuracy: float
    max_drop: float

    @property
    def baseline(self) -> tuple:
        """The path this one is compared with: same model and method, float, tp 1."""
        return (self.model, self.method, self.baseline_dtype, None, 1)

    @property
    def key(self) -> tuple:
        return (self.model, self.method, self.dtype, self.quant, self.tp)

    @property
    def label(self) -> str:
        return f"{self.model}-{self.method}-{self.dtype}-{self.quant or 'float'}-tp{self.tp}"


def load(model: str) -> list[Threshold]:
    df = pd.read_csv(TABLE, comment="#", dtype={"quant": str}, keep_default_na=False)
    return [Threshold(r.model, r.method, r.dtype, r.quant or None, int(r.tp), r.baseline_dtype,
                      float(r.min_accuracy), float(r.max_drop))
            for r in df.itertuples() if r.model == model]
