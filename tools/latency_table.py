"""One table and one plot from several `bloom-runtime perf` runs (one per scheme) for the README.

    python tools/latency_table.py docs/latency/bloom-560m-bf16*.json --png docs/latency/summary.png

Each JSON is one perf run (ours and its peers on the same prompts); a row per run and
batch: next-token median ms at each input length, for ours and every peer that ran (with
the read bandwidth sampled beside each case), and first-token ms at the longest input.
Ratios are ours / peer within one run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bloom_runtime.files import replace_atomically
from bloom_runtime.plotting import pyplot

OURS = "bloom-runtime"
TPOT, TTFT = "TimePerToken(ms)", "TimeOfFirstToken(ms)"


def runs(paths: list[Path]) -> pd.DataFrame:
    """All results, one row per (run, engine, case), with the run's scheme and the peer's kind."""
    frames = []
    for path in paths:
        run = json.loads(path.read_text())
        df = pd.DataFrame(run["results"])
        df["scheme"], df["run"] = run["quant"] or run["dtype"], path.stem
        kinds = {engine: _kind(description) for engine, description in run["peers"].items()}
        df["kind"] = [kinds.get(engine, "") for engine in df["engine"]]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _kind(description: str) -> str:
    """The peer's compute type from its description ('... compute_type=int8', '... Q8_0, ...')."""
    for word in description.replace(",", " ").split():
        if word.startswith(("compute_type=", "dtype=")):
            return word.split("=")[1].removeprefix("torch.")
        if word[:2] in ("Q4", "Q8", "BF", "F1", "F3"):
            return word
    return ""


def engine_order(df: pd.DataFrame) -> list[str]:
    return [OURS] + sorted(e for e in df["engine"].unique() if e != OURS)


def markdown(df: pd.DataFrame) -> str:
    names = engine_order(df)
    lengths = sorted(df["InputSeqLen(Encoding)"].unique())
    longest = lengths[-1]
    head = (["run", "scheme", "batch"] + [f"{e} next-token ms" for e in names]
            + [f"first token @{longest} ms" + (f" (ours / {' / '.join(names[1:])})" if names[1:] else "")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (run, scheme, batch), group in df.groupby(["run", "scheme", "Batch"], sort=False):
        cells = [run, scheme, str(batch)]
        for engine in names:
            rows = group[group["engine"] == engine].sort_values("InputSeqLen(Encoding)")
            figures = " / ".join(f"{v:.1f}" for v in rows[TPOT])
            notes = [rows["kind"].iloc[0] if len(rows) else ""] + [bandwidths(rows)]
            notes = ", ".join(note for note in notes if note)
            cells.append(f"{figures} ({notes})" if figures and notes else figures or "-")
        at_longest = group[group["InputSeqLen(Encoding)"] == longest].set_index("engine")[TTFT]
        cells.append(" / ".join(f"{at_longest[e]:.0f}" if e in at_longest else "-" for e in names))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nnext-token ms at input lengths {' / '.join(map(str, lengths))}"


def bandwidths(rows: pd.DataFrame) -> str:
    """The read bandwidth sampled beside each case ('34 / 51 GB/s'), where the run recorded it (perf
    runs before 2026-12-06 did for ours alone)."""
    column = "memory_bandwidth_GBps"
    if column not in rows or rows[column].isna().any():
        return ""
    return " / ".join(f"{v:.0f}" for v in rows[column]) + " GB/s"


def plot(df: pd.DataFrame, path: Path) -> None:
    """Next-token latency averaged over input lengths (and runs of a scheme): a bar per engine,
    grouped by scheme; a panel per batch size."""
    plt = pyplot()
    batches = sorted(df["Batch"].unique())
    colors = {engine: f"C{i}" for i, engine in enumerate(engine_order(df))}  # the same in every panel
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mean = df[df["Batch"] == batch].groupby(["scheme", "engine"], sort=False)[TPOT].mean().unstack()
        mean = mean[[e for e in colors if e in mean.columns]]
        mean.plot.bar(ax=ax, rot=0, color=colors)
        ax.set_title(f"batch {batch}: next-token latency, mean over input lengths")
        ax.set_ylabel("ms (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="perf JSON files")
    parser.add_argument("--png", type=Path, help="also write the bar chart here")
    args = parser.parse_args()
    df = runs(args.runs)
    print(markdown(df))
    if args.png:
        plot(df, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
