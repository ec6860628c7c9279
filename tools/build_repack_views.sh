#!/usr/bin/env bash
# Build tests/native/repack_views.cpp: prefix views of repacked weights vs truncated repacked weights on ggml-cpu.
#
#   tools/build_repack_views.sh                  x86 (this machine), against build/llama/bin's shared libggml*
#   tools/build_repack_views.sh armv8.6-a+i8mm   static aarch64 binary for that -march (run it under qemu-aarch64)
#
# For aarch64 only ggml (ggml-base, ggml-cpu, ggml) is cross-built, static, once per -march, in
# build/aarch64-ggml-<march>: a few minutes the first time, incremental after. Each -march reaches other kernels
# of ggml-cpu's repack.cpp (dotprod: 4x4; i8mm: 4x8 / 8x8; sve: Q4_0 8x8 on 256-bit SVE); the kernel choice is
# made at compile time, so one binary per -march is needed. Prints the binary's path on its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/tests/native/repack_views.cpp"
LLAMA="$ROOT/third_party/llama.cpp"
GGML="$LLAMA/ggml"
export GIT_CEILING_DIRECTORIES="$ROOT/third_party"
JOBS="${JOBS:-$(nproc)}"

if [[ $# == 0 ]]; then
    LIB="${ELMS_LLAMA_LIB_DIR:-$ROOT/build/llama/bin}"
    OUT="$ROOT/build/repack_views"
    g++ -O2 -std=c++17 "$SRC" -I "$GGML/include" -L "$LIB" -lggml -lggml-base -lggml-cpu -Wl,-rpath,"$LIB" -o "$OUT"
    echo "$OUT"
    exit 0
fi

MARCH="$1"
BUILD="$ROOT/build/aarch64-ggml-${MARCH//+/-}"
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build_repack_views: $tool missing (tools/build_aarch64.sh installs it)" >&2; exit 1; }
done
gomp_a="$(aarch64-linux-gnu-gcc -print-file-name=libgomp.a)"
OPENMP=(-DGGML_OPENMP=OFF)
if [[ "$gomp_a" == /* && -f "$gomp_a" ]]; then
    OPENMP=(-DGGML_OPENMP=ON -DOpenMP_gomp_LIBRARY="$(realpath "$gomp_a")")
fi
if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
    GEN=()
    command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
    cmake -S "$LLAMA" -B "$BUILD" "${GEN[@]}" -DCMAKE_TOOLCHAIN_FILE="$ROOT/tools/aarch64-linux-gnu.cmake" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$MARCH" \
        "${OPENMP[@]}" -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >"$BUILD.configure.log" 2>&1 || {
        cat "$BUILD.configure.log" >&2; exit 1; }
fi
cmake --build "$BUILD" --target ggml ggml-base ggml-cpu -j "$JOBS" >/dev/null
libs=("$BUILD"/ggml/src/libggml.a "$BUILD"/ggml/src/libggml-cpu.a "$BUILD"/ggml/src/libggml-base.a)
for l in "${libs[@]}"; do [[ -f "$l" ]] || { echo "build_repack_views: $l missing" >&2; exit 1; }; done
OUT="$BUILD/repack_views"
aarch64-linux-gnu-g++ -O2 -std=c++17 -march="$MARCH" -static "$SRC" -I "$GGML/include" "${libs[@]}" \
    -fopenmp -lpthread -o "$OUT"
echo "$OUT"
