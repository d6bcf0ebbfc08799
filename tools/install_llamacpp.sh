#!/usr/bin/env bash
# Install the llama.cpp peer (llama-cpp-python, built from source, and gguf) into the active
# environment. llama-cpp-python ships no CPU wheels on PyPI, so pip compiles llama.cpp (about 4
# minutes on 2 cores with the tools below switched off). A native build (-march=native) crashed on
# quantized models at the first AMX instruction on the VMs we measure on, so the build targets
# AVX-512 with VNNI and BF16 explicitly, AMX off: llama.cpp's CPU path as it runs on any AVX-512 Xeon.
# Pinned: the GGUF written by bloom_runtime/bench/llamacpp.py was checked against this version.
set -euo pipefail
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF"
pip install -q "llama-cpp-python==0.3.36" "gguf>=0.10"
