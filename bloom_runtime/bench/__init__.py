"""The latency harness behind `bloom-runtime perf` and `pytest -m perf`: cases.py (the grid),
runners.py (ours and the peers), peers.py (their shared checkpoint and caches), metrics.py
(TTFT/TPOT/ITL), roofline.py and derived.py (limits and ratios), export.py (CSV/JSON/PNG),
harness.py (the run loop)."""
