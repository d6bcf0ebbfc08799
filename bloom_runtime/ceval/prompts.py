"""The two prompt formats, character for character.

`ceval`: C-Eval's own answer-only prompt (Chinese instruction, `答案：`), scored
from the next-token logits of A/B/C/D. `atb`: the MMLU-style English prompt of
the evaluator the reference guide used, answered by greedy generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .dataset import LETTERS, Question, Subject


def _block(q: Question, answer_label: str, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.options))
    return f"{q.question}{options}\n{answer_label}" + (f"{q.answer}\n\n" if with_answer else "")


def ceval_prompt(subject: Subject, shots: Sequence[Question], question: Question) -> str:
    header = f"以下是中国关于{subject.chinese}考试的单项选择题，请选出其中的正确答案。\n\n"
    return header + "".join(_block(s, "答案：", True) for s in shots) + _block(question, "答案：", False)


def atb_prompt(subject: Subject, shots: Sequence[Question], question: Question) -> str:
    words = subject.name.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {words}.\n\n"
    return header + "".join(_block(s, "Answer: ", True) for s in shots) + _block(question, "Answer:", False)


PROMPTS: dict[str, Callable[[Subject, Sequence[Question], Question], str]] = {
    "ceval": ceval_prompt,
    "atb": atb_prompt,
}


def fit_shots(
    build: Callable[[int], str], count: Callable[[str], int], shots: int, min_shots: int, limit: int
) -> tuple[str, int, int] | None:
    """The prompt with the most shots (from `shots` down to `min_shots`) within `limit`
    tokens, with its token and shot counts; None when even `min_shots` does not fit."""
    for k in range(shots, min_shots - 1, -1):
        prompt = build(k)
        if (tokens := count(prompt)) <= limit:
            return prompt, tokens, k
    return None
