"""Accuracy per subject and category, and the files a run leaves in OUTPUT_DIR.

C-Eval averages subjects, not questions: a category's accuracy (and `Avg`) is the
unweighted mean over its subjects. The guide's evaluator (`--method atb`)
weighted by question. Both are written; the guide's keys (`STEM` ... `Avg(Hard)`)
hold the chosen method's own aggregation, and `subject_mean` / `question_weighted`
hold each explicitly.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..files import replace_atomically, write_json
from ..plotting import pyplot
from .cache import Prediction
from .dataset import CATEGORIES, HARD, Subject

GUIDE_KEYS = (*CATEGORIES, "Avg", "Avg(Hard)")
PRIMARY = {"ceval": "subject_mean", "atb": "question_weighted"}
# The chosen aggregation, in words a user knows.
IN_WORDS = {"subject_mean": "each category and Avg average its subjects, as C-Eval does",
            "question_weighted": "each category and Avg count every question once, as the guide's "
                                 "evaluator did"}


def subject_table(subjects: dict[str, Subject], predictions: list[Prediction]) -> pd.DataFrame:
    """One row per subject: questions, correct, unfit, accuracy."""
    df = pd.DataFrame([{"subject": p.subject, "correct": p.correct, "unfit": not p.fit} for p in predictions])
    counts = df.groupby("subject").agg(questions=("correct", "size"), correct=("correct", "sum"),
                                       unfit=("unfit", "sum"))
    rows = [{"subject": name, "english": s.english, "chinese": s.chinese, "category": s.category,
             "hard": name in HARD, **counts.loc[name].to_dict()} for name, s in subjects.items()]
    table = pd.DataFrame(rows)
    table["accuracy"] = table["correct"] / table["questions"]
    return table


def category_names(table: pd.DataFrame) -> list[str]:
    """C-Eval's four categories (kept even when empty, as the guide's keys), then every other
    category the exam brings, in the mapping's order."""
    return [*CATEGORIES, *(c for c in dict.fromkeys(table["category"]) if c not in CATEGORIES)]


def _groups(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    groups = {c: table[table["category"] == c] for c in category_names(table)}
    return {**groups, "Avg": table, "Avg(Hard)": table[table["hard"]]}


def aggregate(table: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """Both aggregations per category, `Avg` and `Avg(Hard)`; None where a group has no subject."""
    subject_mean, weighted = {}, {}
    for key, group in _groups(table).items():
        empty = group.empty
        subject_mean[key] = None if empty else float(group["accuracy"].mean())
        weighted[key] = None if empty else float(group["correct"].sum() / group["questions"].sum())
    return {"subject_mean": subject_mean, "question_weighted": weighted}


def classes_result(table: pd.DataFrame, method: str, run: dict, unfit: list[Prediction]) -> dict:
    both = aggregate(table)
    return {**both[PRIMARY[method]], "aggregation": PRIMARY[method], **both,
            "questions": int(table["questions"].sum()), "unfit": [f"{p.subject}/{p.id}" for p in unfit],
            "run": run}


def write(output: Path, table: pd.DataFrame, classes: dict, predictions: list[Prediction]) -> None:
    """result_classes_acc.json, result_subject_acc.json, result_subject_acc.csv, result_subject_acc.png."""
    subject_acc = dict(zip(table["subject"], table["accuracy"].astype(float)))
    write_json(output / "result_classes_acc.json", classes)
    write_json(output / "result_subject_acc.json", subject_acc)
    replace_atomically(output / "result_subject_acc.csv", lambda tmp: table.to_csv(tmp, index=False))
    replace_atomically(output / "result_subject_acc.png", lambda tmp: _plot(table, classes, tmp))


def _plot(table: pd.DataFrame, classes: dict, path: Path) -> None:
    """Accuracy per subject, coloured by category, with chance (0.25) and Avg drawn across."""
    from matplotlib.patches import Patch

    plt = pyplot()
    names = category_names(table)
    ordered = table.assign(order=table["category"].map(names.index)).sort_values(["order", "subject"])
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    colours = {c: palette[i % len(palette)] for i, c in enumerate(names) if c in set(table["category"])}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(ordered) + 2), 4.5))
    bars = ax.bar(ordered["subject"], ordered["accuracy"], color=[colours[c] for c in ordered["category"]])
    ax.bar_label(bars, fmt="%.2f", fontsize=6)
    chance = ax.axhline(0.25, color="grey", linestyle=":", label="chance (0.25)")
    avg = ax.axhline(classes["Avg"], color="black", linestyle="--", label=f"Avg {classes['Avg']:.3f}")
    handles = [Patch(color=colour, label=category) for category, colour in colours.items()]
    ax.legend(handles=[*handles, chance, avg], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    run = classes["run"]
    setting = " ".join(str(run[k]) for k in ("model", "dtype", "quant") if run.get(k))
    ax.set_title(f"C-Eval, {run.get('method')}: {setting}, tp={run.get('tp', 1)}")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def category_table(classes: dict) -> str:
    """The terminal table: every category, Avg and Avg(Hard), both aggregations."""
    lines = [f"{'':<16}{'subject mean':>14}{'by question':>14}"]
    for key in classes["subject_mean"]:
        values = [classes[agg][key] for agg in ("subject_mean", "question_weighted")]
        lines.append(f"{key:<16}" + "".join(f"{'-' if v is None else f'{v:.4f}':>14}" for v in values))
    return "\n".join(lines)
