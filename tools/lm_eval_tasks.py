"""lm-evaluation-harness tasks for an exam in C-Eval's official layout, read from local files.

lm-eval's own `ceval-valid` tasks load `ceval/ceval-exam` from the Hugging Face hub; these read
`DATA/ceval-exam/{val,dev}/<subject>_{val,dev}.csv` instead (any exam in that layout, the
embedded one included), with lm-eval's C-Eval prompt, choices and 5 first-n dev shots, and a
group `ceval-local` over them. The exam is read and validated by bloom_runtime.ceval.dataset
and written beside the tasks as JSON lines of strings (lm-eval's CSV reader types each file's
columns on its own, and a val file whose options are all numbers then clashes with its dev).

    python tools/lm_eval_tasks.py DATA TASKS_DIR
    lm_eval --model local-completions --include_path TASKS_DIR --tasks ceval-local --num_fewshot 5 \
        --model_args model=NAME,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=MODEL_DIR,...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bloom_runtime.ceval.dataset import LETTERS, load_split, load_subjects
from bloom_runtime.errors import BloomRuntimeError
from bloom_runtime.files import staged_output

GROUP = "ceval-local"
# lm-eval's C-Eval task (lm_eval/tasks/ceval/_default_ceval_yaml), but for local CSV files.
TASK = {
    "validation_split": "val",
    "fewshot_split": "dev",
    "fewshot_config": {"sampler": "first_n"},
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 2.0},
}


def write_tasks(data: Path, staging: Path, final: Path) -> None:
    """One task per subject (its val and dev questions as JSON lines) and the group, written in
    `staging`, naming their data where it will be: in `final`."""
    subjects = load_subjects(data)
    for name, subject in subjects.items():
        files = {}
        for split in ("val", "dev"):
            rows = [{"question": q.question, **dict(zip(LETTERS, q.options)), "answer": q.answer}
                    for q in load_split(data, name, split)]
            files[split] = str(final / f"{name}_{split}.jsonl")
            _write(staging / f"{name}_{split}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                              for row in rows))
        description = f"以下是中国关于{subject.chinese}的单项选择题，请选出其中的正确答案。\n\n"
        task = {"task": f"{GROUP}_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                "description": description, **TASK}
        _write(staging / f"{GROUP}_{name}.yaml", json.dumps(task, ensure_ascii=False, indent=1) + "\n")
    group = {"group": GROUP, "task": [f"{GROUP}_{name}" for name in subjects],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": False}]}
    _write(staging / f"_{GROUP}.yaml", json.dumps(group, indent=1) + "\n")  # YAML is a superset of JSON


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the exam: DATA/ceval-exam/... and DATA/subject_mapping.json")
    parser.add_argument("output", type=Path, help="a new directory for the task files")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args()
    try:
        with staged_output(args.output, [args.data], force=args.force) as staging:
            write_tasks(args.data, staging, args.output.resolve())
    except BloomRuntimeError as err:
        print(f"lm_eval_tasks: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.output}: the tasks of group {GROUP}")


if __name__ == "__main__":
    main()
