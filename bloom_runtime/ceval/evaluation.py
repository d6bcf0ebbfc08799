"""Scoring an engine on a C-Eval-layout exam: which questions to ask, in which batches,
resuming from and appending to the run's record."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from tqdm import tqdm

from .. import parallel
from ..embedded import EXAM_DIR
from ..engine import Engine
from ..errors import InputError
from . import report
from .cache import Cache, Prediction
from .dataset import Exam, Question, Subject, load_exam
from .prompts import PROMPTS, fit_shots
from .scoring import ATB_MAX_NEW_TOKENS, letter_ids, score, token_count

# The guide's evaluator fits 5..1 shots into 2000 tokens; C-Eval drops shots down to 0
# to fit the model's context.
METHODS = {"ceval": {"min_shots": 0, "limit": None}, "atb": {"min_shots": 1, "limit": 2000}}


@dataclass(frozen=True)
class Result:
    classes: dict  # what result_classes_acc.json holds
    subjects: pd.DataFrame  # what result_subject_acc.csv holds
    predictions: list[Prediction]


def evaluate(
    engine: Engine,
    dataset: str | os.PathLike | None = None,
    method: str = "ceval",
    shots: int = 5,
    batch: int = 8,
    output_dir: str | os.PathLike | None = None,
    run: dict | None = None,
    force: bool = False,
    subjects: list[str] | None = None,
    progress: bool = True,
) -> Result:
    """Score `engine` on the val split of the C-Eval at `dataset` (default: the embedded exam).

    With `output_dir`, answers are appended to its predictions.jsonl as they come, a rerun
    with the same settings (`run` + method, shots) resumes from it, and the result files are
    written at the end. Under torchrun every rank computes and rank 0 writes.
    """
    if method not in METHODS:
        raise InputError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if not isinstance(shots, int) or shots < METHODS[method]["min_shots"] or shots > 5:
        raise InputError(f"shots {shots!r}: expected {METHODS[method]['min_shots']}..5 for --method {method}")
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch {batch!r}: expected a positive integer")
    if engine.tokenizer is None:
        raise InputError("C-Eval needs a tokenizer: this model has no tokenizer.json")
    exam = load_exam(dataset or EXAM_DIR, subjects=subjects)
    key = {**(run or {}), "method": method, "shots": shots, "split": "val", "subjects": sorted(exam.subjects)}
    writer = output_dir is not None and engine.shard.is_main
    cache = Cache(Path(output_dir), key, force, writer) if output_dir is not None else None
    parallel.agree(engine.shard, None)  # every rank has read the cache before rank 0 appends to it
    predictions = _answer(engine, exam, method, shots, batch, cache, progress and engine.shard.is_main)
    table = report.subject_table(exam.subjects, predictions)
    classes = report.classes_result(table, method, key, [p for p in predictions if not p.fit])
    if writer:
        report.write(Path(output_dir), table, classes, predictions)
    return Result(classes, table, predictions)


def _answer(engine: Engine, exam: Exam, method: str, shots: int, batch: int, cache: Cache | None,
            progress: bool) -> list[Prediction]:
    """Every val question's prediction: cached ones as they are, the rest scored in
    batches of similar length (longest first, so running out of memory shows at once)."""
    done = cache.done if cache is not None else {}
    if done and progress:
        tqdm.write(f"resuming: {len(done)} of {exam.size} answered (from {cache.path})", file=sys.stderr)
    todo, unfit = _prompts(engine, exam, method, shots, done)
    new = list(unfit)
    letters = letter_ids(engine)
    todo.sort(key=lambda item: -item.tokens)
    bar = tqdm(total=len(todo), desc=f"C-Eval ({method})", unit="q", disable=not progress)
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        choices = score(engine, method, [item.prompt for item in chunk], letters)
        scored = [Prediction(item.subject, item.question.id, item.question.answer, c.letter, item.shots,
                             list(c.probs) if c.probs else None, c.output)
                  for item, c in zip(chunk, choices)]
        if cache is not None:
            cache.add(scored)
        new += scored
        bar.update(len(chunk))
    bar.close()
    if cache is not None and unfit:
        cache.add(unfit)
    answered = {**done, **{(p.subject, p.id): p for p in new}}
    return [answered[(name, q.id)] for name, qs in exam.questions.items() for q in qs]


class _Item(NamedTuple):
    subject: str
    question: Question
    prompt: str
    tokens: int
    shots: int


def _prompts(engine: Engine, exam: Exam, method: str, shots: int, done: dict):
    """The prompts to score, and the predictions of questions whose prompt does not fit
    even with the fewest shots (scored wrong, and reported)."""
    build, rule = PROMPTS[method], METHODS[method]
    limit = rule["limit"] or engine.max_seq_len
    limit -= ATB_MAX_NEW_TOKENS if method == "atb" else 0  # room for the generated answer
    todo, unfit = [], []
    for name, questions in exam.questions.items():
        subject, dev = exam.subjects[name], exam.dev[name]
        for q in questions:
            if (name, q.id) in done:
                continue
            fitted = fit_shots(partial(_with_shots, build, subject, dev, q), partial(token_count, engine),
                               min(shots, len(dev)), rule["min_shots"], limit)
            if fitted is None:
                unfit.append(Prediction(name, q.id, q.answer, None, -1))
            else:
                todo.append(_Item(name, q, *fitted))
    return todo, unfit


def _with_shots(build, subject: Subject, dev: list[Question], question: Question, k: int) -> str:
    return build(subject, dev[:k], question)
