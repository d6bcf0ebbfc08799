"""C-Eval accuracy (`bloom-runtime precision`): the official layout (dataset.py), the official
answer-only prompt and the reference guide's own method (prompts.py, scoring.py), the run's
record (cache.py), scoring an exam (evaluation.py), and the result files as the guide wrote
them (report.py).

    import bloom_runtime as br
    from bloom_runtime.ceval import evaluate
    result = evaluate(br.load(), output_dir="test_result")   # the embedded exam
    print(result.classes["Avg"])
"""

from .cache import diff
from .dataset import load_exam
from .evaluation import METHODS, Result, evaluate

__all__ = ["METHODS", "Result", "diff", "evaluate", "load_exam"]
