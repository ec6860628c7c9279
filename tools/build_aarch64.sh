#!/usr/bin/env bash
# Cross-build the patched llama.cpp tools (llama-completion, llama-cli) for 64-bit ARM Linux (aarch64).
#
#   tools/build_aarch64.sh [--shared] [extra cmake -D options]
#
# Default: fully static executables (-DBUILD_SHARED_LIBS=OFF and -static at link time: glibc, libstdc++ and
# libgomp are linked in), so they run on Raspberry Pi OS (64-bit) and Android/Termux without our libraries and
# without a matching glibc (Android has no glibc at all). Output: build/aarch64/bin.
#   OpenMP: kept ON (ggml's default thread pool, as in the x86 build) by linking the toolchain's libgomp.a
#   (CMake's FindOpenMP would pick libgomp.so, which -static rejects); GGML_OPENMP=OFF only as a fallback.
#   The linker warns that getaddrinfo/getpwuid/dlopen in a static glibc binary need that glibc at run time:
#   only llama.cpp's HTTP download / home-dir cache / dynamic-backend paths call them, never used here.
#   --shared   dynamically linked libllama/libggml + executables in build/aarch64-shared/bin instead (needs the
#              aarch64 glibc/libstdc++/libgomp on the target; run under qemu with -L /usr/aarch64-linux-gnu).
#
# Environment:
#   ARM_ARCH   -march for the ggml CPU backend (default armv8.2-a+dotprod: Raspberry Pi 5, most phones since
#              ~2018). Raspberry Pi 4 / Cortex-A72 lacks dotprod: use ARM_ARCH=armv8-a there (else SIGILL).
#   JOBS       parallel compile jobs (default: nproc)
#   ELMS_AARCH64_BUILD_DIR  build dir (default build/aarch64, build/aarch64-shared with --shared)
#
# Installs the cross toolchain and qemu (Debian/Ubuntu, apt) when missing. Same patched source tree as the
# x86 build (tools/fetch_llama.sh); the build dir is persistent and re-runs are incremental (a no-op re-run
# takes about a second).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LLAMA="$ROOT/third_party/llama.cpp"
TOOLCHAIN="$ROOT/tools/aarch64-linux-gnu.cmake"
JOBS="${JOBS:-$(nproc)}"
ARM_ARCH="${ARM_ARCH:-armv8.2-a+dotprod}"
TARGETS=(llama-completion llama-cli)

shared=0
if [[ "${1:-}" == "--shared" ]]; then
    shared=1
    shift
fi
if [[ $shared == 1 ]]; then
    BUILD="${ELMS_AARCH64_BUILD_DIR:-$ROOT/build/aarch64-shared}"
else
    BUILD="${ELMS_AARCH64_BUILD_DIR:-$ROOT/build/aarch64}"
fi

# ---- toolchain ------------------------------------------------------------------------------------------
PKGS=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static)
need_install=0
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ qemu-aarch64-static; do
    command -v "$tool" >/dev/null 2>&1 || need_install=1
done
if [[ $need_install == 1 ]]; then
    SUDO=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "build_aarch64: need root (or sudo) to install: ${PKGS[*]}" >&2; exit 1; }
        SUDO=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || {
        echo "build_aarch64: apt-get not found; install an aarch64-linux-gnu gcc/g++ and qemu-aarch64-static" >&2; exit 1; }
    echo "build_aarch64: installing ${PKGS[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
fi

# ---- source ---------------------------------------------------------------------------------------------
# fetch_llama.sh downloads the sdist with pip: prefer the project's venv (as tools/setup.sh does)
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then
    export PYTHON="$ROOT/.venv/bin/python"
fi
"$ROOT/tools/fetch_llama.sh"

# ---- configure (skipped when nothing changed; `cmake --build` re-runs it itself if a CMakeLists changes) -
if [[ $shared == 1 ]]; then
    LINK=(-DBUILD_SHARED_LIBS=ON -DCMAKE_EXE_LINKER_FLAGS=)
else
    # -static: one self-contained executable.
    LINK=(-DBUILD_SHARED_LIBS=OFF -DCMAKE_EXE_LINKER_FLAGS=-static)
fi
# OpenMP stays ON (ggml's default thread pool, the same as the x86 build). CMake's FindOpenMP records the
# shared libgomp.so, which `-static` refuses ("attempted static link of dynamic object"): point it at the
# toolchain's libgomp.a instead (static libgomp + static glibc >= 2.34, which has libpthread inside libc.a,
# is fine). Without a libgomp.a, fall back to GGML_OPENMP=OFF (ggml's own pthread thread pool).
OPENMP=(-DGGML_OPENMP=ON)
if [[ $shared == 0 ]]; then
    gomp_a="$(aarch64-linux-gnu-gcc -print-file-name=libgomp.a)"
    if [[ "$gomp_a" == /* && -f "$gomp_a" ]]; then
        OPENMP+=(-DOpenMP_gomp_LIBRARY="$(realpath "$gomp_a")")
    else
        echo "build_aarch64: no static libgomp.a in the cross toolchain: building with GGML_OPENMP=OFF" >&2
        OPENMP=(-DGGML_OPENMP=OFF)
    fi
fi
CMAKE_ARGS=(
    -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN"
    -DCMAKE_BUILD_TYPE=Release
    "${LINK[@]}"
    -DGGML_NATIVE=OFF
    -DGGML_CPU_ARM_ARCH="$ARM_ARCH"
    "${OPENMP[@]}"
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    "$@"
)
GEN=()
if [[ ! -f "$BUILD/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then
    GEN=(-G Ninja)
fi
want="$(printf '%s\n' "$LLAMA" "${CMAKE_ARGS[@]}" | cat - "$TOOLCHAIN" | sha256sum | cut -d' ' -f1)"
STAMP="$BUILD/.elms-configure-stamp"
if [[ ! -f "$BUILD/CMakeCache.txt" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
    mkdir -p "$BUILD"
    rm -f "$STAMP"
    cmake -S "$LLAMA" -B "$BUILD" "${GEN[@]}" "${CMAKE_ARGS[@]}" >"$BUILD/configure.log" 2>&1 || {
        cat "$BUILD/configure.log" >&2; echo "build_aarch64: cmake configure failed" >&2; exit 1; }
    grep -E 'GGML_SYSTEM_ARCH|CPU backend variant|OpenMP' "$BUILD/configure.log" | sed 's/^/build_aarch64: /' || true
    echo "$want" > "$STAMP"
fi

# ---- build ----------------------------------------------------------------------------------------------
cmake --build "$BUILD" --target "${TARGETS[@]}" -j "$JOBS"

echo "build_aarch64: aarch64 binaries in $BUILD/bin (-march=$ARM_ARCH)"
for t in "${TARGETS[@]}"; do
    f="$BUILD/bin/$t"
    [[ -x "$f" ]] || { echo "build_aarch64: $f missing" >&2; exit 1; }
    desc="$(file -b "$f")"
    echo "  $f: $desc"
    [[ "$desc" == *aarch64* || "$desc" == *"ARM aarch64"* ]] || { echo "build_aarch64: $t is not an aarch64 binary" >&2; exit 1; }
    if [[ $shared == 0 && "$desc" != *"statically linked"* ]]; then
        echo "build_aarch64: $t is not statically linked" >&2; exit 1
    fi
done
