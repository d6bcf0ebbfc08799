#!/usr/bin/env bash
# Install the llama.cpp peer (llama-cpp-python, built from source, and gguf) into the active
# environment, built for the CPU it runs on. llama-cpp-python ships no CPU wheels on PyPI, so pip
# compiles llama.cpp (about 4 minutes on 2 cores with the tools below switched off).
#
# The build is native (-march=native: every instruction this CPU has, none it lacks, so it runs
# on an AVX2-only EPYC as on an AVX-512 Xeon), with AMX left out where the CPU has it: quantized
# models crashed at the first AMX instruction on the VMs measured here. llama.cpp's runtime
# choice among CPU variants (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) exists in the pinned
# version, but it builds 14 variants (several times this build) and llama-cpp-python 0.3.36
# neither installs nor loads the variant libraries. --no-cache-dir: pip caches a built wheel
# by version, not by CMAKE_ARGS, so a wheel built on another CPU would come back from the cache.
# Pinned: the GGUF written by bloom_runtime/bench/llamacpp.py was checked against this version.
set -euo pipefail
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
no_amx=""
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DCMAKE_C_FLAGS='${no_amx}' -DCMAKE_CXX_FLAGS='${no_amx}' \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF"
pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
pip install -q "llama-cpp-python==0.3.36" "gguf>=0.10"  # its Python dependencies, and gguf
python -c "import llama_cpp; print('llama.cpp built for:', llama_cpp.llama_print_system_info().decode())"
