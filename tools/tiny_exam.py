"""The embedded exam: a seeded, procedurally generated C-Eval in the official layout.

Each subject holds made-up facts ("<entity>的<relation>是<value>"). A fact's
question always lists the same four options in the same order, so knowing the
fact gives the answer letter; what varies is the wording. The train split of
wordings (used for the training text) and the held-out wordings (used for the
val and test CSVs) share their parts but never a whole question, so a val
question's text is never seen in training: the model has to recognise the
fact behind a new sentence.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCD"
# name -> (English, Chinese, category, entity suffix, relations); 3 subjects per category,
# two of them C-Eval Hard. `law` is written without its category, as some published copies are.
SUBJECTS = {
    "computer_network": ("Computer Network", "计算机网络", "STEM",
        "协议", ("默认端口", "所在层", "发明者")),
    "college_physics": ("College Physics", "大学物理", "STEM",
        "定律", ("提出者", "适用条件", "单位")),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM",
        "函数", ("极限", "导数", "定义域")),
    "college_economics": ("College Economics", "大学经济学", "Social Science",
        "效应", ("提出者", "成因", "后果")),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science",
        "山脉", ("所在省", "走向", "气候")),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science",
        "原则", ("目的", "要求", "来源")),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities",
        "条约", ("签订年份", "签订地点", "影响")),
    "law": ("Law", "法学", "Humanities",
        "法条", ("适用对象", "处罚", "效力")),
    "art_studies": ("Art Studies", "艺术学", "Humanities",
        "画派", ("代表人物", "兴起地", "风格")),
    "physician": ("Physician", "医师资格", "Other",
        "综合征", ("病因", "首选药物", "典型症状")),
    "accountant": ("Accountant", "注册会计师", "Other",
        "科目", ("类别", "余额方向", "核算内容")),
    "civil_servant": ("Civil Servant", "公务员", "Other",
        "制度", ("主管部门", "实施年份", "核心内容")),
}  # fmt: skip
VALUE_CHARS = (
    "一二三四五六七八九十百千红黄蓝白黑青紫高低长短大小"
    "新旧强弱快慢冷热正反内外上下前后左右天地人和安平明清"
)
# An entity is one CJK character (one token) and the subject's suffix: the name the model has
# to tie to its answer is then a single token, which a 4-layer model learns in minutes; with
# two-character names it was still near chance after 450 steps.
NAME_RANGE = (0x4E00, 0x9FA5)
PREFIXES = ("", "关于", "下列关于", "已知", "请问", "在考试中，")
SUFFIXES = ("是（　）", "是什么？", "应为下列哪一项？", "正确的是哪一项？", "为（　）", "指的是哪个？")
SPLIT_SIZES = {"dev": 5, "val": 40, "test": 10}
RESERVED = set(VALUE_CHARS + "".join(PREFIXES + SUFFIXES) + "".join(
    "".join(zh + suffix + "".join(relations)) for _, zh, _, suffix, relations in SUBJECTS.values()))


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    options: tuple[str, str, str, str]
    answer: str

    @property
    def value(self) -> str:
        return self.options[LETTERS.index(self.answer)]

    def statement(self) -> str:
        return f"{self.entity}的{self.relation}是{self.value}。"

    def question(self, prefix: int, suffix: int) -> str:
        return f"{PREFIXES[prefix]}{self.entity}的{self.relation}{SUFFIXES[suffix]}"


def held_out(prefix: int, suffix: int) -> bool:
    """One wording in six is held out of training: those are the val/test wordings."""
    return (prefix + suffix) % len(PREFIXES) == 0


def wordings(train: bool) -> list[tuple[int, int]]:
    return [(p, s) for p in range(len(PREFIXES)) for s in range(len(SUFFIXES)) if held_out(p, s) != train]


def make_facts(seed: int) -> dict[str, dict[str, list[Fact]]]:
    """subject -> split -> facts, every entity unique across the exam."""
    rng = random.Random(seed)
    seen: set[str] = set()
    exam = {}
    for name, (*_, suffix, relations) in SUBJECTS.items():
        exam[name] = {split: [_fact(rng, seen, suffix, relations) for _ in range(n)]
                      for split, n in SPLIT_SIZES.items()}
    return exam


def _fact(rng: random.Random, seen: set[str], suffix: str, relations: tuple[str, ...]) -> Fact:
    while (name := chr(rng.randint(*NAME_RANGE))) in seen or name in RESERVED:
        pass
    seen.add(name)
    entity = name + suffix
    values: list[str] = []  # a list, not a set: set order varies with PYTHONHASHSEED
    while len(values) < 4:
        if (value := "".join(rng.sample(VALUE_CHARS, rng.choice((2, 3))))) not in values:
            values.append(value)
    return Fact(entity, rng.choice(relations), tuple(values), rng.choice(LETTERS))


def write_exam(root: Path, facts: dict[str, dict[str, list[Fact]]], seed: int) -> None:
    """The official layout: dev in a training wording; val and test in held-out wordings.
    The test CSVs withhold answers, as C-Eval's do."""
    rng = random.Random(seed + 1)
    train, held = wordings(train=True), wordings(train=False)
    for split in SPLIT_SIZES:
        (root / "ceval-exam" / split).mkdir(parents=True, exist_ok=True)
    mapping = {name: [en, zh] if name == "law" else [en, zh, cat]
               for name, (en, zh, cat, *_) in SUBJECTS.items()}
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
    for name, splits in facts.items():
        for split, rows in splits.items():
            with open(root / "ceval-exam" / split / f"{name}_{split}.csv", "w", newline="",
                      encoding="utf-8") as f:
                out = csv.writer(f)
                out.writerow(["id", "question", *LETTERS, "answer", "explanation"])
                for i, fact in enumerate(rows):
                    wording = rng.choice(train if split == "dev" else held)
                    out.writerow([i, fact.question(*wording), *fact.options,
                                  "" if split == "test" else fact.answer,
                                  fact.statement() if split == "dev" else ""])
