"""Where the embedded model, its exam and its calibration text live inside the package."""

from pathlib import Path

TINY_DIR = Path(__file__).parent / "assets" / "tiny"  # the model `load("tiny")` reads
EXAM_DIR = TINY_DIR / "ceval"  # its C-Eval-layout exam (`precision` without --dataset-path)
CALIBRATION_TEXT = TINY_DIR / "calibration.txt"  # default text for INT8 calibration
