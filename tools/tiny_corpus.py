"""Seeded, procedurally generated Chinese and English text for the embedded model.

The embedded tokenizer is trained on it, so it covers what the embedded model is
asked to read: C-Eval style exam prompts (subject names, the instruction line,
options `A.`..`D.`, `答案：`) and plain sentences in both languages.
"""

from __future__ import annotations

import random

SUBJECTS_ZH = [
    "计算机网络", "操作系统", "高等数学", "大学物理", "大学化学", "概率统计", "离散数学",
    "马克思主义基本原理", "毛泽东思想和中国特色社会主义理论体系概论", "思想道德修养与法律基础",
    "中国语言文学", "艺术学", "法学", "逻辑学", "临床医学", "会计", "公务员", "环境影响评价工程师",
    "高中地理", "高中历史", "初中生物", "初中数学", "教师资格", "导游资格",
]  # fmt: skip
WORDS_ZH = [
    "网络", "协议", "数据", "系统", "函数", "方程", "能量", "分子", "历史", "文化", "经济",
    "法律", "社会", "国家", "城市", "河流", "山脉", "计算", "结构", "理论", "实践", "学生",
    "老师", "问题", "答案", "正确", "错误", "选择", "方法", "原理", "过程", "结果", "发展",
]  # fmt: skip
WORDS_EN = [
    "network", "protocol", "data", "system", "function", "equation", "energy", "molecule",
    "history", "culture", "economy", "law", "society", "country", "city", "river", "mountain",
    "theory", "practice", "student", "teacher", "question", "answer", "correct", "method",
]  # fmt: skip


def exam_block(rng: random.Random) -> str:
    """One C-Eval style question with its answer, as the answer-only prompt writes it."""
    subject = rng.choice(SUBJECTS_ZH)
    stem = "".join(rng.choices(WORDS_ZH, k=rng.randint(3, 8)))
    options = ["".join(rng.choices(WORDS_ZH, k=rng.randint(1, 3))) for _ in range(4)]
    lines = [f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。", "", f"{stem}？"]
    lines += [f"{letter}. {text}" for letter, text in zip("ABCD", options)]
    lines.append(f"答案：{rng.choice('ABCD')}")
    return "\n".join(lines) + "\n\n"


def english_block(rng: random.Random) -> str:
    words = rng.choices(WORDS_EN, k=rng.randint(5, 12))
    question = " ".join(words).capitalize()
    options = [" ".join(rng.choices(WORDS_EN, k=2)) for _ in range(4)]
    topic = rng.choice(WORDS_EN)
    lines = [f"The following are multiple choice questions (with answers) about {topic}.", question]
    lines += [f"{letter}. {text}" for letter, text in zip("ABCD", options)]
    lines.append(f"Answer: {rng.choice('ABCD')}")
    return "\n".join(lines) + "\n\n"


def corpus(n_blocks: int, seed: int = 0) -> list[str]:
    """`n_blocks` text blocks, half Chinese exam questions, half English ones."""
    rng = random.Random(seed)
    return [exam_block(rng) if i % 2 == 0 else english_block(rng) for i in range(n_blocks)]
