#!/usr/bin/env bash
# The third-party clients the server is tested against, in a venv of their own (.venv-clients),
# as a user would run them beside the server: lm-evaluation-harness (its local-completions model
# against `bloom-runtime serve`, its hf model as the reference) and guidellm (a rate sweep).
# tests_functional/test_serve_clients.py finds them there; CI runs this first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-clients
.venv-clients/bin/pip install -q --upgrade pip
.venv-clients/bin/pip install -q torch==2.13.0  # the CPU build from local disk (lm-eval's hf model)
.venv-clients/bin/pip install -q "lm-eval[api,hf]==0.4.13" "guidellm==0.8.1"
