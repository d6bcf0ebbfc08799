"""C-Eval accuracy of every path, against the thresholds table, and proof the suite can fail.

On the embedded model and exam (480 val questions, 5-shot), each path must reach
its floor and stay within its limits of float32: Avg, answers in agreement, and the
KL and largest change of its A-D probabilities (thresholds.csv). The float32
choices must be transformers' choices; and a broken prompt, a shifted answer token
or a shuffled key must pull the score toward chance. With --model-path and
--ceval-path, the bloom-7b1 rows check the reference guide's figures.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from spawn_ranks import on_every_rank, run_ranks
from thresholds import Threshold, load
from transformers import BloomForCausalLM

import bloom_runtime as br
from bloom_runtime import ceval
from bloom_runtime.agreement import kl_divergence
from bloom_runtime.ceval import evaluation, prompts, scoring
from bloom_runtime.ceval.dataset import LETTERS
from bloom_runtime.config import PRESETS, BloomConfig
from bloom_runtime.embedded import EXAM_DIR, TINY_DIR

pytestmark = pytest.mark.accuracy

TINY = load("tiny")
REAL = load("bloom-7b1")
SABOTAGE_MARGIN = 0.3  # a broken scorer must lose at least this much of Avg
NEAR_TIE = 1e-4  # float32 runtime vs transformers may differ only where top-2 probs are this close


def _evaluate(model, dtype: str, quant: str | None, method: str, dataset=None, device: str = "cpu"):
    engine = br.load(model, dtype=dtype, quant=quant, device=device)
    return ceval.evaluate(engine, dataset, method=method, progress=False)


Figures = tuple[float, list[str | None], torch.Tensor | None]  # Avg, choices, A-D probabilities


def _figures(result) -> Figures:
    preds = result.predictions
    probs = torch.tensor([p.probs for p in preds]) if all(p.probs for p in preds) else None
    return result.classes["Avg"], [p.choice for p in preds], probs


def _tp_rank(dtype: str, quant: str | None, method: str) -> Figures:
    return _figures(_evaluate("tiny", dtype, quant, method))


class Runs:
    """Each path evaluated once per session, on first use: the embedded model on the embedded exam,
    or the checkpoint `model` on the exam `dataset`."""

    def __init__(self, model: Path | str = "tiny", dataset: Path | None = None, device: str = "cpu") -> None:
        self.model, self.dataset, self.device = model, dataset, device
        self.done: dict[tuple, Figures] = {}

    def get(self, key: tuple) -> Figures:
        if key not in self.done:
            _, method, dtype, quant, tp = key
            if tp == 1:
                result = _evaluate(self.model, dtype, quant, method, self.dataset, self.device)
                self.done[key] = _figures(result)
            else:
                value, *others = on_every_rank(run_ranks(_tp_rank, tp, dtype, quant, method))
                assert all(other[1] == value[1] for other in others), "ranks answered differently"
                self.done[key] = value
        return self.done[key]


@pytest.fixture(scope="session")
def runs(device: str) -> Runs:
    return Runs(device=device)


@pytest.fixture(scope="session")
def float32_result():
    return _evaluate("tiny", "float32", None, "ceval")


def distribution_shift(probs: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float]:
    """Mean KL(baseline || probs) over questions, and the largest |p - p_baseline| of any letter."""
    kl = kl_divergence(probs.clamp(min=1e-12).log(), baseline.clamp(min=1e-12).log())
    return kl, float((probs - baseline).abs().max())


def check_against_thresholds(row: Threshold, runs: Runs) -> None:
    accuracy, choices, probs = runs.get(row.key)
    assert accuracy >= row.min_accuracy, f"{row.label}: Avg {accuracy:.4f} < floor {row.min_accuracy}"
    if row.reference is not None:
        assert abs(accuracy - row.reference) <= row.max_drop + 1e-9, (
            f"{row.label}: Avg {accuracy:.4f} vs the published {row.reference} > {row.max_drop}")
    if row.baseline is None:
        return
    baseline, base_choices, base_probs = runs.get(row.baseline)
    if row.max_drop is not None:
        assert abs(accuracy - baseline) <= row.max_drop + 1e-9, (
            f"{row.label}: Avg {accuracy:.4f} vs {baseline:.4f}: moved {abs(accuracy - baseline):.4f}")
    agreement = sum(a == b for a, b in zip(choices, base_choices)) / len(choices)
    print(f"{row.label}: Avg {accuracy:.4f} (baseline {baseline:.4f}), agreement {agreement:.4f}")
    if row.min_agreement is not None:
        assert agreement >= row.min_agreement, f"{row.label}: {agreement:.4f} of answers as the baseline's"
    if row.max_kl is not None or row.max_dp is not None:  # methods without probabilities (atb) set neither
        kl, dp = distribution_shift(probs, base_probs)
        print(f"{row.label}: KL {kl:.2e}, max |dp| {dp:.2e}")
        assert kl <= row.max_kl, f"{row.label}: KL of the A-D probabilities {kl:.2e} > {row.max_kl}"
        assert dp <= row.max_dp, f"{row.label}: largest probability change {dp:.2e} > {row.max_dp}"


@pytest.mark.parametrize("row", TINY, ids=lambda r: r.label)
def test_embedded_path_meets_its_thresholds(row: Threshold, runs: Runs):
    check_against_thresholds(row, runs)


def test_float32_choices_equal_transformers(float32_result):
    """The same prompts through BloomForCausalLM: every choice the same, except at near-ties."""
    exam = ceval.load_exam(EXAM_DIR)
    engine = br.load()
    letters = scoring.letter_ids(engine)
    reference = BloomForCausalLM.from_pretrained(TINY_DIR).eval()
    texts = [prompts.ceval_prompt(exam.subjects[name], exam.dev[name], q)
             for name, qs in exam.questions.items() for q in qs]
    probs = []
    for start in range(0, len(texts), 16):
        ids, mask = engine.tokenizer.encode_batch(texts[start : start + 16])
        with torch.no_grad():
            logits = reference(input_ids=ids, attention_mask=mask).logits[:, -1, letters]
        probs.append(logits.softmax(-1))
    probs = torch.cat(probs)
    ours = float32_result.predictions
    assert len(ours) == len(texts) == 480
    differ = [i for i, p in enumerate(ours) if p.choice != LETTERS[int(probs[i].argmax())]]
    ties = [i for i in differ if float(probs[i].topk(2).values.diff().abs()) < NEAR_TIE]
    assert differ == ties, f"{len(differ) - len(ties)} choices differ from transformers away from ties"
    ours_probs = torch.tensor([p.probs for p in ours])
    assert torch.allclose(ours_probs, probs, atol=5e-5)  # measured: 6.8e-6


def test_shuffled_answer_key_scores_near_chance(float32_result, tmp_path):
    """The same exam with its answer column shuffled, scored by the real scorer, must fall to chance."""
    exam = shutil.copytree(EXAM_DIR, tmp_path / "exam")
    for path in (exam / "ceval-exam" / "val").glob("*.csv"):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        table["answer"] = table["answer"].sample(frac=1.0, random_state=0).to_numpy()
        table.to_csv(path, index=False)
    shuffled = _evaluate("tiny", "float32", None, "ceval", exam).classes["Avg"]
    assert shuffled <= float32_result.classes["Avg"] - SABOTAGE_MARGIN
    assert shuffled <= 0.40


def test_shifted_answer_token_lowers_the_score(float32_result, monkeypatch):
    """Reading the logits of the next letter along (B for A, ...) must not score."""
    real = scoring.letter_ids
    monkeypatch.setattr(evaluation, "letter_ids", lambda engine: [i + 1 for i in real(engine)])
    broken = _evaluate("tiny", "float32", None, "ceval")
    assert broken.classes["Avg"] <= float32_result.classes["Avg"] - SABOTAGE_MARGIN


@pytest.mark.parametrize("template", ["no answer cue", "trailing space"])
def test_wrong_prompt_template_lowers_the_score(float32_result, monkeypatch, template):
    """The two classic template slips: the question not ending in 答案：, and a space after it."""
    def no_cue(subject, shots, question):
        return prompts.ceval_prompt(subject, shots, question).removesuffix("答案：")

    def trailing_space(subject, shots, question):
        return prompts.ceval_prompt(subject, shots, question) + " "

    broken_prompt = {"no answer cue": no_cue, "trailing space": trailing_space}[template]
    monkeypatch.setitem(prompts.PROMPTS, "ceval", broken_prompt)
    broken = _evaluate("tiny", "float32", None, "ceval")
    assert broken.classes["Avg"] <= float32_result.classes["Avg"] - SABOTAGE_MARGIN


# --- a real bloom-7b1 and the real C-Eval, when given ---------------------------------------


@pytest.fixture(scope="session")
def real_inputs(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    model, data = request.config.getoption("--model-path"), request.config.getoption("--ceval-path")
    if model is None or data is None:
        pytest.skip("needs --model-path (bloom-7b1) and --ceval-path (ceval-exam/ + subject_mapping.json)")
    config = BloomConfig.from_json(Path(model) / "config.json")
    preset = PRESETS["bloom-7b1"]
    if (config.hidden_size, config.n_layer) != (preset.hidden_size, preset.n_layer):
        pytest.skip(f"{model} is not bloom-7b1: the guide's figures are for bloom-7b1")
    return Path(model), Path(data)


@pytest.fixture(scope="session")
def real_runs(real_inputs, device: str) -> Runs:
    return Runs(*real_inputs, device=device)


@pytest.mark.parametrize("row", REAL, ids=lambda r: r.label)
def test_bloom_7b1_matches_the_guide(row: Threshold, real_runs: Runs):
    check_against_thresholds(row, real_runs)
