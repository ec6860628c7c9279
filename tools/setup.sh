#!/usr/bin/env bash
# One-shot environment: .venv with pinned Python deps, the patched llama.cpp build, llama-cpp-python bound to it.
#
#   tools/setup.sh          idempotent; re-running only redoes what changed
#
# Everything comes from PyPI (the llama-cpp-python sdist carries llama.cpp) and Debian: no model hub, no GitHub.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
cd "$ROOT"

if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV"
fi

req_stamp="$VENV/.elms-requirements"
want="$(sha256sum "$ROOT/tools/requirements.txt" | cut -d' ' -f1)"
if [[ ! -f "$req_stamp" || "$(cat "$req_stamp")" != "$want" ]]; then
    echo "setup: installing Python requirements"
    "$PY" -m pip install -q --upgrade pip >/dev/null
    # torch==2.13.0 resolves to the local CPU wheel; anything else would pull GBs of CUDA
    "$PY" -m pip install -q -r "$ROOT/tools/requirements.txt"
    # data/model packages: --no-deps, they would otherwise drag in llm / sentence-transformers / torchmetrics
    "$PY" -m pip install -q --no-deps -r "$ROOT/tools/requirements-assets.txt"
    echo "$want" > "$req_stamp"
fi

# llama.cpp: fetch the sdist, apply patches/, build incrementally
PATH="$VENV/bin:$PATH" PYTHON="$PY" "$ROOT/tools/build_llama.sh"

# gguf-py and llama-cpp-python from the same sdist; the Python package is bound to build/llama/bin (no 2nd build)
SDIST="$ROOT/third_party/llama-cpp-python"
stamp="$VENV/.elms-llama-cpp-python"
want="$(cat "$ROOT/third_party/.patched-stamp")"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "setup: installing gguf-py and llama-cpp-python (Python only) from the sdist"
    "$PY" -m pip install -q --no-deps "$SDIST/vendor/llama.cpp/gguf-py"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$PY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$SDIST"
    echo "$want" > "$stamp"
fi
# this project, editable; again whenever pyproject.toml changes (entry points, metadata)
stamp="$VENV/.elms-project"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "setup: installing elms-gguf (editable)"
    "$PY" -m pip install -q --no-deps -e "$ROOT" >"$VENV/.elms-install.log" 2>&1 || {
        cat "$VENV/.elms-install.log" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
pkg="$("$PY" -c 'import importlib.util,os; print(os.path.dirname(importlib.util.find_spec("llama_cpp").origin))')"
mkdir -p "$pkg/lib"
for so in "$ROOT"/build/llama/bin/lib*.so; do
    ln -sfn "$so" "$pkg/lib/$(basename "$so")"
done
"$PY" -c "import elms_gguf.runtime as r; r.lib(); print('setup: llama-cpp-python uses the patched', r._ll._lib._name)"
