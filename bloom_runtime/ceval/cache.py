"""The per-question record of a run (`predictions.jsonl`): what an interrupted run
resumes from, and what two runs are diffed by.

Line 1 is the run's key (model, dtype, quant, tp, method, shots, split); each
further line is one answered question. A run whose key differs from the file's
refuses to mix its answers in, unless told to start over (`force`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from ..files import replace_atomically

FILENAME = "predictions.jsonl"


@dataclass(frozen=True)
class Prediction:
    subject: str
    id: str
    answer: str
    choice: str | None  # None: no letter produced, or the prompt did not fit
    shots: int  # shots in the prompt; -1 where no prompt fit
    probs: list[float] | None = None
    output: str | None = None

    @property
    def correct(self) -> bool:
        return self.choice == self.answer

    @property
    def fit(self) -> bool:
        return self.shots >= 0


def read(path: Path) -> tuple[dict | None, dict[tuple[str, str], Prediction]]:
    """The key and the predictions so far; a half-written last line is ignored."""
    if not path.is_file():
        return None, {}
    lines = path.read_text(encoding="utf-8").splitlines()
    key, done = None, {}
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break  # interrupted mid-write
            raise InputError(f"{path}: line {number + 1} is not JSON; delete it or pass --force") from None
        if number == 0:
            key = record.get("run")
        else:
            pred = Prediction(**record)
            done[(pred.subject, pred.id)] = pred
    return key, done


def answered(directory: Path) -> int:
    """How many questions the record in `directory` holds (0 without one)."""
    return len(read(directory / FILENAME)[1])


class Cache:
    """Predictions of this run: the ones already on disk, and an append-only writer."""

    def __init__(self, directory: Path, key: dict, force: bool, writer: bool) -> None:
        self.path = directory / FILENAME
        old_key, done = read(self.path)
        if old_key is not None and old_key != key and not force:
            raise InputError(
                f"{self.path} holds a run with different settings ({_differences(old_key, key)}); "
                "pass --force to start over, or choose another --output-dir"
            )
        self.done = done if old_key == key else {}
        self.writer = writer
        if writer:  # rewritten whole, so that a half line left by an interrupted run goes
            lines = [{"run": key}, *map(asdict, self.done.values())]
            text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            replace_atomically(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def add(self, predictions: list[Prediction]) -> None:
        for pred in predictions:
            self.done[(pred.subject, pred.id)] = pred
        if self.writer:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in predictions)


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def diff(a: Path, b: Path) -> list[tuple[Prediction, Prediction]]:
    """Questions both runs answered whose choices differ, as (a's, b's) pairs."""
    (_, left), (_, right) = read(a / FILENAME), read(b / FILENAME)
    both = sorted(left.keys() & right.keys())
    return [(left[k], right[k]) for k in both if left[k].choice != right[k].choice]
