#!/usr/bin/env bash
# Build the patched llama.cpp (shared libraries + the tools this project drives) into build/llama.
#
#   tools/build_llama.sh [extra cmake -D options]
#
# Offline: no Web-UI download (-DLLAMA_USE_PREBUILT_UI=OFF), no OpenSSL/curl.
# The build dir is persistent: re-running after a patch change recompiles only what changed
# (tools/fetch_llama.sh keeps the mtime of untouched sources).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LLAMA="$ROOT/third_party/llama.cpp"
BUILD="${ELMS_BUILD_DIR:-$ROOT/build/llama}"
JOBS="${JOBS:-$(nproc)}"
TARGETS=(llama llama-cli llama-completion llama-server llama-quantize llama-bench llama-perplexity)

"$ROOT/tools/fetch_llama.sh"

GEN=()
if [[ ! -f "$BUILD/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then
    GEN=(-G Ninja)
fi

NATIVE="${GGML_NATIVE:-ON}"
CFLAGS_EXTRA=""
if [[ "$NATIVE" == "ON" && "$(uname -m)" == "x86_64" ]]; then
    # Some VMs advertise AMX in cpuinfo (so -march=native enables it) without the kernel granting the tile
    # state: the first AMX instruction then dies with SIGILL. AMX only serves BF16/INT8 GEMMs we do not use.
    CFLAGS_EXTRA="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi

# llama.cpp's build-info asks git for a commit: keep it from reporting this repository's commit instead
export GIT_CEILING_DIRECTORIES="$ROOT/third_party"

# configuring an existing build dir is cheap and keeps it incremental
cmake -S "$LLAMA" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE="$NATIVE" \
    -DCMAKE_C_FLAGS="$CFLAGS_EXTRA" \
    -DCMAKE_CXX_FLAGS="$CFLAGS_EXTRA" \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    "$@" >/dev/null
cmake --build "$BUILD" --target "${TARGETS[@]}" -j "$JOBS"
echo "build_llama: binaries and libraries in $BUILD/bin"
