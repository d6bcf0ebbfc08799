"""Writing a latency run: CSV (the guide's columns first), JSON, a PNG plot, a terminal table.

Each writer replaces its file through a temporary one, so a run interrupted
mid-write still leaves the last complete export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .. import files
from ..files import replace_atomically
from ..plotting import pyplot
from .metrics import GUIDE_COLUMNS

ID_COLUMNS = ["engine", "case"]
TABLE_COLUMNS = ["engine", "Batch", "InputSeqLen(Encoding)", "OutputSeqLen(Decoding)",
                 "TimeOfFirstToken(ms)", "TimePerToken(ms)", "p99_itl_ms", "peak_memory_mb"]  # fmt: skip


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a table whose columns start with the guide's, then ours in a stable order."""
    df = pd.DataFrame(rows)
    rest = [c for c in df.columns if c not in GUIDE_COLUMNS + ID_COLUMNS]
    return df[GUIDE_COLUMNS + ID_COLUMNS + rest]


def write_csv(df: pd.DataFrame, path: Path) -> None:
    replace_atomically(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(df: pd.DataFrame, meta: dict, path: Path) -> None:
    files.write_json(path, {**meta, "results": json.loads(df.to_json(orient="records"))})


def write_plot(df: pd.DataFrame, path: Path, title: str) -> None:
    """Latency vs seq_in, one panel per figure, one line per (engine, seq_out, batch)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, column in zip(axes, ("TimeOfFirstToken(ms)", "TimePerToken(ms)")):
        for (engine, seq_out, batch), group in df.groupby(["engine", "OutputSeqLen(Decoding)", "Batch"]):
            group = group.sort_values("InputSeqLen(Encoding)")
            ax.plot(group["InputSeqLen(Encoding)"], group[column], marker="o",
                    label=f"{engine} out={seq_out} b={batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def table(df: pd.DataFrame) -> str:
    ratios = [c for c in df.columns if c.startswith("ratio_")]
    columns = [c for c in TABLE_COLUMNS if c in df.columns] + ratios
    return df[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}")
