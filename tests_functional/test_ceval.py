"""C-Eval plumbing: reading the official layout, building prompts character for character,
aggregating as the paper does, and resuming from the per-question record."""

from __future__ import annotations

import csv
import json
import shutil

import pandas as pd
import pytest

import bloom_runtime as br
from bloom_runtime import ceval
from bloom_runtime.ceval import cache, report
from bloom_runtime.ceval.dataset import Question, Subject, load_exam, load_split, load_subjects
from bloom_runtime.ceval.prompts import atb_prompt, ceval_prompt, fit_shots
from bloom_runtime.ceval.scoring import first_letter
from bloom_runtime.cli import main
from bloom_runtime.embedded import EXAM_DIR
from bloom_runtime.errors import DatasetError, InputError

HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
SUBJECT = Subject("computer_network", "Computer Network", "计算机网络", "STEM")
Q1 = Question("0", "下列哪个是协议？", ("TCP", "CPU", "RAM", "GPU"), "A")
Q2 = Question("1", "1+1=？", ("1", "2", "3", "4"), "B")


def write_exam(root, rows: dict[str, list[list[str]]], mapping: dict | None = None):
    """A one-subject exam: `rows` maps a split to its data rows (header added)."""
    mapping = mapping or {"computer_network": ["Computer Network", "计算机网络", "STEM"]}
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    for split, data in rows.items():
        (root / "ceval-exam" / split).mkdir(parents=True, exist_ok=True)
        with open(root / "ceval-exam" / split / f"computer_network_{split}.csv", "w", newline="",
                  encoding="utf-8") as f:
            csv.writer(f).writerows([HEADER, *data])
    return root


@pytest.mark.parametrize("build, header, cue", [
    (ceval_prompt, "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。", ("答案：", "答案：")),
    (atb_prompt, "The following are multiple choice questions (with answers) about computer network.",
     ("Answer: ", "Answer:")),
])
def test_prompts_are_built_character_for_character(build, header, cue):
    """C-Eval's answer-only prompt, and the MMLU-style one of the guide's evaluator."""
    expected = (
        f"{header}\n\n"
        f"下列哪个是协议？\nA. TCP\nB. CPU\nC. RAM\nD. GPU\n{cue[0]}A\n\n"
        f"1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n{cue[1]}"
    )
    assert build(SUBJECT, [Q1], Q2) == expected


def test_fit_shots_drops_shots_until_the_prompt_fits():
    build = lambda k: "x" * (10 + 5 * k)  # noqa: E731
    assert fit_shots(build, len, 5, 0, 100) == ("x" * 35, 35, 5)
    assert fit_shots(build, len, 5, 0, 24) == ("x" * 20, 20, 2)
    assert fit_shots(build, len, 5, 1, 12) is None


def test_first_letter_is_the_first_ascii_letter():
    assert first_letter(" B\n\nC") == "B"
    assert first_letter("：答案是 c") == "c"
    assert first_letter("：：") is None


def test_csv_fields_with_commas_quotes_newlines_and_fullwidth_marks(tmp_path):
    tricky = ["0", '他说："A, B"，\n然后？', "甲，乙", '"引号"', "多行\n选项", "（全角）", "C", ""]
    write_exam(tmp_path, {"val": [tricky], "dev": [tricky]})
    (q,) = load_split(tmp_path, "computer_network", "val")
    assert q.question == '他说："A, B"，\n然后？'
    assert q.options == ("甲，乙", '"引号"', "多行\n选项", "（全角）") and q.answer == "C"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "ceval-exam/val/computer_network_val.csv").unlink(),
         "computer_network_val.csv: not found"),
        (lambda root: (root / "subject_mapping.json").unlink(), "subject_mapping.json: not found"),
        (lambda root: (root / "ceval-exam/dev/computer_network_dev.csv").write_text(
            "id,question,A,B,C,answer\n0,q,a,b,c,A\n"), "missing column(s) D"),
        (lambda root: (root / "ceval-exam/val/computer_network_val.csv").write_text(
            "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n7,q,a,b,c,d,E\n"), "row 2 (id 7): answer 'E'"),
        (lambda root: (root / "subject_mapping.json").write_text('{"computer_network": ["x"]}'),
         "expected [English, Chinese, category]"),
        (lambda root: (root / "subject_mapping.json").write_text('{"my_subject": ["Mine", "我的"]}'),
         "'my_subject' has no category"),
        (lambda root: (root / "subject_mapping.json").write_text(
            '{"computer_network": ["CN", "计算机网络", " "]}'), "'computer_network' has an empty category"),
    ],
)
def test_bad_dataset_names_the_file_and_row(tmp_path, damage, message):
    row = ["0", "q", "a", "b", "c", "d", "A", ""]
    root = write_exam(tmp_path, {"val": [row], "dev": [row]})
    damage(root)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_exam(root)


def test_unknown_subject_and_missing_category_from_the_official_table(tmp_path):
    row = ["0", "q", "a", "b", "c", "d", "A", ""]
    root = write_exam(tmp_path, {"val": [row], "dev": [row]}, {"computer_network": ["CN", "计算机网络"]})
    assert load_subjects(root)["computer_network"].category == "STEM"
    with pytest.raises(DatasetError, match="subject\\(s\\) law not in"):
        load_exam(root, subjects=["law"])


def test_the_test_split_may_withhold_answers(tmp_path):
    write_exam(tmp_path, {"test": [["0", "q", "a", "b", "c", "d", "", ""]]})
    assert load_split(tmp_path, "computer_network", "test")[0].answer == ""


def test_categories_average_subjects_and_avg_hard_uses_the_hard_subjects():
    subjects = {
        "college_physics": Subject("college_physics", "CP", "大学物理", "STEM"),  # hard
        "computer_network": Subject("computer_network", "CN", "计算机网络", "STEM"),
        "law": Subject("law", "Law", "法学", "Humanities"),
    }
    preds = ([cache.Prediction("college_physics", str(i), "A", "A", 5) for i in range(1)]
             + [cache.Prediction("computer_network", str(i), "A", "B", 5) for i in range(9)]
             + [cache.Prediction("law", str(i), "A", "A" if i < 2 else "B", 5) for i in range(4)])
    result = report.aggregate(report.subject_table(subjects, preds))
    mean, weighted = result["subject_mean"], result["question_weighted"]
    assert mean["STEM"] == pytest.approx(0.5) and weighted["STEM"] == pytest.approx(0.1)
    assert mean["Avg"] == pytest.approx((1 + 0 + 0.5) / 3) and weighted["Avg"] == pytest.approx(3 / 14)
    assert mean["Avg(Hard)"] == 1.0 and mean["Social Science"] is None


@pytest.fixture
def small_exam(tmp_path):
    """Two subjects of the embedded exam, copied so that tests may damage them."""
    root = tmp_path / "exam"
    shutil.copytree(EXAM_DIR, root)
    return root


def test_interrupted_run_resumes_and_settings_change_is_refused(small_exam, tmp_path):
    engine = br.load()
    out = tmp_path / "out"
    subjects = ["law", "physician"]
    run = {"model": "tiny"}
    full = ceval.evaluate(engine, small_exam, output_dir=out, run=run, subjects=subjects, progress=False)
    lines = (out / cache.FILENAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 80
    (out / cache.FILENAME).write_text("\n".join(lines[:31]) + '\n{"subject": "la', encoding="utf-8")
    resumed = ceval.evaluate(engine, small_exam, output_dir=out, run=run, subjects=subjects, progress=False)
    assert [p.choice for p in resumed.predictions] == [p.choice for p in full.predictions]
    assert resumed.classes == full.classes
    assert len((out / cache.FILENAME).read_text(encoding="utf-8").splitlines()) == 1 + 80
    with pytest.raises(InputError, match="shots: 5 -> 3"):
        ceval.evaluate(engine, small_exam, shots=3, output_dir=out, run=run, subjects=subjects)
    assert cache.diff(out, out) == []


def test_result_files_carry_the_guides_keys(small_exam, tmp_path):
    out = tmp_path / "out"
    ceval.evaluate(br.load(), small_exam, output_dir=out, subjects=["law"], progress=False)
    classes = json.loads((out / "result_classes_acc.json").read_text(encoding="utf-8"))
    assert set(report.GUIDE_KEYS) <= classes.keys()
    assert classes["Humanities"] == classes["Avg"] and classes["STEM"] is None
    subjects = json.loads((out / "result_subject_acc.json").read_text(encoding="utf-8"))
    table = pd.read_csv(out / "result_subject_acc.csv")
    assert list(subjects) == ["law"] and table.loc[0, "accuracy"] == pytest.approx(subjects["law"])
    assert (out / "result_subject_acc.png").read_bytes()[:4] == b"\x89PNG"


def test_any_category_is_reported_under_its_own_name(small_exam, tmp_path):
    """Exams in C-Eval's layout bring their own categories (FinEval, cybersecurity exams)."""
    mapping_path = small_exam / "subject_mapping.json"
    mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
    for name in ("law", "physician"):
        mapping[name] = [mapping[name][0], mapping[name][1], "CyberSecurity"]
    mapping_path.write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    subjects = ["law", "physician", "college_physics"]
    result = ceval.evaluate(br.load(), small_exam, output_dir=out, subjects=subjects, progress=False)
    accuracy = {}  # from the predictions themselves, not from the report's own table
    for name in subjects:
        answers = [p for p in result.predictions if p.subject == name]
        accuracy[name] = sum(p.choice == p.answer for p in answers) / len(answers)
    classes = json.loads((out / "result_classes_acc.json").read_text(encoding="utf-8"))
    assert classes["CyberSecurity"] == pytest.approx((accuracy["law"] + accuracy["physician"]) / 2)
    assert classes["STEM"] == pytest.approx(accuracy["college_physics"])
    assert classes["Humanities"] is None and classes["Other"] is None  # the guide's keys stay
    assert set(pd.read_csv(out / "result_subject_acc.csv")["category"]) == {"CyberSecurity", "STEM"}
    table = report.category_table(classes).splitlines()
    row = next(line for line in table if line.startswith("CyberSecurity"))
    assert f"{classes['CyberSecurity']:.4f}" in row


def test_atb_reports_a_question_that_does_not_fit(small_exam, tmp_path):
    path = small_exam / "ceval-exam/val/law_val.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False).head(3)
    df.loc[1, "question"] = "很长的题目" * 500  # over 2000 tokens even with one shot
    df.to_csv(path, index=False)
    result = ceval.evaluate(br.load(), small_exam, method="atb", subjects=["law"], progress=False)
    assert result.classes["unfit"] == ["law/" + df.loc[1, "id"]]
    unfit = result.predictions[1]
    assert unfit.choice is None and not unfit.fit and not unfit.correct
    assert result.classes["questions"] == 3


def test_precision_cli_prints_the_category_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["precision", "--subjects", "law", "physician", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for key in report.GUIDE_KEYS:
        assert key in printed
    assert (out / "result_classes_acc.json").is_file()


def test_precision_cli_bad_dataset_is_one_line(tmp_path, capsys):
    assert main(["precision", "--dataset-path", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "subject_mapping.json: not found" in err


def test_precision_cli_diff_lists_changed_answers(tmp_path, capsys):
    """Two answers of an earlier run edited by hand: the rerun's --diff must count exactly those."""
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["precision", "--subjects", "law", "--output-dir", str(first)]) == 0
    record = first / "predictions.jsonl"
    key, *answers = [json.loads(line) for line in record.read_text().splitlines()]
    for answer in answers[:2]:
        answer["choice"] = next(letter for letter in "ABCD" if letter != answer["choice"])
    record.write_text("".join(json.dumps(line) + "\n" for line in [key, *answers]))
    capsys.readouterr()
    assert main(["precision", "--subjects", "law", "--output-dir", str(second), "--diff", str(first)]) == 0
    assert f"2 question(s) answered differently from {first}" in capsys.readouterr().out


def test_ceval_drops_shots_to_fit_the_context():
    """With a 150-token context, 5-shot prompts (about 290 tokens) must shed shots, not fail."""
    result = ceval.evaluate(br.load(max_seq_len=150), subjects=["law"], progress=False)
    shots = {p.shots for p in result.predictions}
    assert shots and max(shots) < 5 and min(shots) >= 0 and not result.classes["unfit"]
    engine = br.load(max_seq_len=150)
    exam = ceval.load_exam(EXAM_DIR, subjects=["law"])
    for p in result.predictions[:3]:
        q = next(q for q in exam.questions["law"] if q.id == p.id)
        longer = ceval_prompt(exam.subjects["law"], exam.dev["law"][: p.shots + 1], q)
        assert len(engine.tokenizer.encode(longer)) > 150


@pytest.mark.parametrize("shots", [5, 2])
def test_few_shot_examples_are_the_first_dev_rows_in_file_order(tmp_path, shots):
    """The official prompt takes the dev file's first k rows, in file order. Guards the selection,
    not only the formatter: reversed, sorted by id or shuffled shots were once built into a prompt
    that the formatter test alone could not see."""
    from bloom_runtime.ceval.evaluation import _prompts

    dev = [[str(9 - i), f"例题{i}？", "a", "b", "c", "d", "ABCD"[i % 4], ""] for i in range(5)]  # ids descend
    root = write_exam(tmp_path, {"dev": dev, "val": [["0", "1+1=？", "1", "2", "3", "4", "B", ""]]})
    exam = load_exam(root, "val")
    (item,), unfit = _prompts(br.load(), exam, "ceval", shots, {})
    assert not unfit and item.shots == shots
    in_order = load_split(root, "computer_network", "dev")[:shots]
    assert [q.question for q in in_order] == [f"例题{i}？" for i in range(shots)]
    assert item.prompt == ceval_prompt(exam.subjects["computer_network"], in_order, exam.questions[
        "computer_network"][0])
