#!/usr/bin/env bash
# Populate third_party/llama.cpp from the pinned llama-cpp-python sdist (PyPI) and apply patches/*.patch.
#
#   tools/fetch_llama.sh            fetch (if needed), extract, patch; no-op when up to date
#   tools/fetch_llama.sh --force    start again from the pristine sdist
#
# The sdist is cached in third_party/dist/. third_party/ is git-ignored: never commit it.
# A stamp file records the sdist hash and the hash of every patch; when it matches, nothing is touched,
# so the persistent build dir stays valid and rebuilds stay incremental.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="0.3.36"
COMMIT="0c1e570"
SDIST_NAME="llama_cpp_python-${VERSION}.tar.gz"
SDIST_SHA256="$(cat "$ROOT/tools/llama-cpp-python.sha256")"
TP="$ROOT/third_party"
DIST="$TP/dist"
SRC="$TP/llama-cpp-python"     # the whole sdist (the Python package is installed from here)
LLAMA="$TP/llama.cpp"          # symlink to $SRC/vendor/llama.cpp
STAMP="$TP/.patched-stamp"
PY="${PYTHON:-python3}"

force=0
[[ "${1:-}" == "--force" ]] && force=1

mkdir -p "$DIST"
if [[ ! -f "$DIST/$SDIST_NAME" ]]; then
    echo "fetch_llama: downloading $SDIST_NAME from PyPI"
    # --no-build-isolation: pip would otherwise build a whole isolated toolchain just to read the metadata
    "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==${VERSION}" -d "$DIST" >/dev/null
fi
echo "$SDIST_SHA256  $DIST/$SDIST_NAME" | sha256sum -c --quiet - || {
    echo "fetch_llama: checksum mismatch for $DIST/$SDIST_NAME" >&2; exit 1; }

want="$(
    { echo "$SDIST_SHA256"; for p in "$ROOT"/patches/*.patch; do if [[ -e "$p" ]]; then sha256sum "$p"; fi; done; } \
    | sha256sum | cut -d' ' -f1
)"
if [[ $force == 0 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -d "$SRC/vendor/llama.cpp/src" ]]; then
    exit 0
fi

echo "fetch_llama: extracting and patching llama.cpp (commit $COMMIT)"
# extract outside any git worktree: inside one (e.g. this repository), `git apply` resolves paths against
# that repository's root and silently skips the whole patch
tmp="$(mktemp -d "${TMPDIR:-/tmp}/elms-llama.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$DIST/$SDIST_NAME" -C "$tmp"
new="$tmp/llama_cpp_python-${VERSION}"
grep -q "$COMMIT" "$new/CHANGELOG.md" || { echo "fetch_llama: sdist does not reference commit $COMMIT" >&2; exit 1; }
# the sdist ships .git gitlinks for a shallow clone; drop them so git apply works on plain files
rm -rf "$new/.git" "$new/vendor/llama.cpp/.git"

for p in "$ROOT"/patches/*.patch; do
    [[ -e "$p" ]] || continue
    if ! (cd "$new/vendor/llama.cpp" && GIT_CEILING_DIRECTORIES="$tmp" git apply --check --whitespace=nowarn "$p" \
            && GIT_CEILING_DIRECTORIES="$tmp" git apply --whitespace=nowarn "$p"); then
        echo "fetch_llama: patch $(basename "$p") does not apply to llama.cpp $COMMIT" >&2
        exit 1
    fi
    # belt and braces: every file the patch names must now differ from the pristine sdist
    for f in $(grep -E '^\+\+\+ b/' "$p" | cut -c7-); do
        [[ -f "$new/vendor/llama.cpp/$f" ]] || { echo "fetch_llama: $(basename "$p") did not create $f" >&2; exit 1; }
    done
    echo "fetch_llama:   applied $(basename "$p")"
done

# Replace the tree in place with rsync-like semantics: unchanged files keep their mtime, so the
# persistent CMake build only recompiles what the patches changed.
if [[ -d "$SRC" ]]; then
    "$PY" "$ROOT/tools/sync_tree.py" "$new" "$SRC"
else
    mkdir -p "$SRC" && cp -a "$new/." "$SRC/"
fi
ln -sfn "llama-cpp-python/vendor/llama.cpp" "$LLAMA"
echo "$want" > "$STAMP"
