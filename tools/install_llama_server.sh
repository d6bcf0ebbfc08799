#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the serving peer of `bloom-runtime perf serve`) from the same
# pinned llama.cpp source that llama-cpp-python 0.3.36 vendors (tools/install_llamacpp.sh), so the
# GGUF the latency suite writes is read by the version it was checked against. Native build with
# AMX left out where present, as in install_llamacpp.sh (and for the same reason). Installs the
# binary as $VIRTUAL_ENV/bin/llama-server (or $1). About 6 minutes on 2 cores.
set -euo pipefail
dest="${1:-${VIRTUAL_ENV:?activate the project venv or pass a destination path}/bin/llama-server}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==0.3.36"
tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
no_amx=""
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
cmake -S "$work"/llama_cpp_python-0.3.36/vendor/llama.cpp -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null
cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
install -m 755 "$work/build/bin/llama-server" "$dest.tmp"
mv "$dest.tmp" "$dest"
"$dest" --version 2>&1 | head -2
