"""C-Eval in its official layout: `ceval-exam/{dev,val,test}/<subject>_<split>.csv`
plus `subject_mapping.json`, read and validated so that a bad file fails loudly
(file and row named) before any model time is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import DatasetError

LETTERS = "ABCD"
# C-Eval's categories, reported first under these keys; an exam in C-Eval's layout may bring
# its own (FinEval, domain exams), reported beside them under their own names.
CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")
REQUIRED_COLUMNS = ("id", "question", "A", "B", "C", "D")

# The C-Eval paper's category of each of its 52 subjects: some published copies of
# subject_mapping.json leave the category out, and this fills it in.
OFFICIAL_CATEGORY = {
    **dict.fromkeys([
        "computer_network", "operating_system", "computer_architecture", "college_programming",
        "college_physics", "college_chemistry", "advanced_mathematics", "probability_and_statistics",
        "discrete_mathematics", "electrical_engineer", "metrology_engineer", "high_school_mathematics",
        "high_school_physics", "high_school_chemistry", "high_school_biology", "middle_school_mathematics",
        "middle_school_biology", "middle_school_physics", "middle_school_chemistry", "veterinary_medicine",
    ], "STEM"),
    **dict.fromkeys([
        "college_economics", "business_administration", "marxism", "mao_zedong_thought",
        "education_science", "teacher_qualification", "high_school_politics", "high_school_geography",
        "middle_school_politics", "middle_school_geography",
    ], "Social Science"),
    **dict.fromkeys([
        "modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
        "chinese_language_and_literature", "art_studies", "professional_tour_guide", "legal_professional",
        "high_school_chinese", "high_school_history", "middle_school_history",
    ], "Humanities"),
    **dict.fromkeys([
        "civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
        "urban_and_rural_planner", "accountant", "fire_engineer",
        "environmental_impact_assessment_engineer", "tax_accountant", "physician",
    ], "Other"),
}  # fmt: skip
# C-Eval Hard: the eight subjects the paper averages as Avg(Hard).
HARD = frozenset({
    "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
    "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics",
})  # fmt: skip


@dataclass(frozen=True)
class Subject:
    name: str
    english: str
    chinese: str
    category: str


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"; "" where the split withholds answers (test)
    explanation: str = ""


def load_subjects(root: str | Path) -> dict[str, Subject]:
    """`subject_mapping.json`: subject -> [English name, Chinese name, category?]."""
    path = Path(root) / "subject_mapping.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found (C-Eval needs subject_mapping.json beside ceval-exam/)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: expected an object of subject -> [English, Chinese, category]")
    return {name: _subject(path, name, entry) for name, entry in raw.items()}


def _subject(path: Path, name: str, entry: object) -> Subject:
    if not (isinstance(entry, list) and len(entry) in (2, 3) and all(isinstance(x, str) for x in entry)):
        raise DatasetError(f"{path}: subject {name!r}: expected [English, Chinese, category], got {entry!r}")
    category = entry[2] if len(entry) == 3 else OFFICIAL_CATEGORY.get(name)
    if category is None:
        raise DatasetError(f"{path}: subject {name!r} has no category and is not a C-Eval subject")
    if not category.strip():
        raise DatasetError(f"{path}: subject {name!r} has an empty category")
    return Subject(name, entry[0], entry[1], category)


def split_path(root: str | Path, subject: str, split: str) -> Path:
    return Path(root) / "ceval-exam" / split / f"{subject}_{split}.csv"


def load_split(root: str | Path, subject: str, split: str) -> list[Question]:
    """One subject's questions in file order; answers are required except in `test`."""
    path = split_path(root, subject, split)
    if not path.is_file():
        raise DatasetError(f"{path}: not found (subject {subject!r}, split {split!r})")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DatasetError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in REQUIRED_COLUMNS + (() if split == "test" else ("answer",)) if c not in df]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return [_question(path, row_no, row, split) for row_no, row in enumerate(df.to_dict("records"), 1)]


def _question(path: Path, row_no: int, row: dict, split: str) -> Question:
    answer = row.get("answer", "").strip()
    if (answer or split != "test") and answer not in tuple(LETTERS):
        raise DatasetError(f"{path}: row {row_no} (id {row['id']}): answer {answer!r} is not A, B, C or D")
    return Question(row["id"], row["question"], tuple(row[c] for c in LETTERS), answer,
                    row.get("explanation", ""))


@dataclass(frozen=True)
class Exam:
    subjects: dict[str, Subject]
    dev: dict[str, list[Question]]
    questions: dict[str, list[Question]]  # the scored split

    @property
    def size(self) -> int:
        return sum(map(len, self.questions.values()))


def load_exam(root: str | Path, split: str = "val", subjects: list[str] | None = None) -> Exam:
    """Every subject's dev shots and `split` questions, validated up front."""
    if not Path(root).is_dir():
        raise DatasetError(f"{root}: no such directory (expected ceval-exam/ and subject_mapping.json in it)")
    mapping = load_subjects(root)
    if not (Path(root) / "ceval-exam").is_dir():
        raise DatasetError(f"{Path(root) / 'ceval-exam'}: not found (unzip ceval-exam.zip under {root})")
    names = subjects or list(mapping)
    unknown = [n for n in names if n not in mapping]
    if unknown:
        raise DatasetError(f"subject(s) {', '.join(unknown)} not in {Path(root) / 'subject_mapping.json'}")
    chosen = {n: mapping[n] for n in names}
    dev = {n: load_split(root, n, "dev") for n in names}
    questions = {n: load_split(root, n, split) for n in names}
    if split == "test" and any(not q.answer for qs in questions.values() for q in qs):
        raise DatasetError("the test split withholds answers; score the val split")
    return Exam(chosen, dev, questions)
