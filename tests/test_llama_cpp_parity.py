"""The reference forward and the files we write agree with stock llama.cpp (needs a built libllama).

One subprocess (a crash in the C library must not take pytest down) loads each file with llama-cpp-python's
ctypes bindings (third_party/llama-cpp-python) against ``$ELMS_LLAMA_LIB_DIR`` or build/llama/bin, evaluates a
few tokens with an F32 KV cache and returns all logits. Skipped only when the library or the bindings are
missing; a crashing subprocess fails. F32 files only: the comparison is then limited by float32 rounding (~1e-5), not by
quantization.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf

from elms_gguf import contract, model, truncate
from elms_gguf.contract import Level

ROOT = Path(__file__).resolve().parents[1]
BINDINGS = ROOT / "third_party" / "llama-cpp-python"
LIB_DIR = Path(os.environ.get("ELMS_LLAMA_LIB_DIR", ROOT / "build" / "llama" / "bin"))
TOKENS = [1, 5, 9, 100, 200, 30, 7, 260, 270, 3]

_CHILD = r"""
import json, sys, numpy as np
sys.path.insert(0, sys.argv[1])
import llama_cpp
job = json.loads(sys.argv[2])
for path, out in job["files"]:
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)  # GGML_TYPE_F32 cache
    llm.eval(job["tokens"])
    np.save(out, np.array(llm.scores[: len(job["tokens"])], dtype=np.float64))
    print(json.dumps(llm.tokenize(b"hello the world", add_bos=True)))
    del llm
"""


def llama_cpp_logits(paths: list[Path], tmp_path: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    if not (BINDINGS / "llama_cpp" / "llama_cpp.py").is_file() or not (LIB_DIR / "libllama.so").exists():
        pytest.skip(f"needs {BINDINGS} and {LIB_DIR}/libllama.so")
    outs = [tmp_path / f"logits{i}.npy" for i in range(len(paths))]
    job = {"files": [[str(p), str(o)] for p, o in zip(paths, outs)], "tokens": TOKENS}
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(LIB_DIR), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(BINDINGS), json.dumps(job)], env=env,
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:  # a crash of the C library is a failure, not a reason to skip
        pytest.fail(f"llama.cpp subprocess failed (rc {r.returncode}): {r.stderr[-800:]}")
    return [np.load(o) for o in outs], [json.loads(line) for line in r.stdout.splitlines() if line.startswith("[")]


def test_llama_cpp_matches_the_reference_on_dense_and_exported_files(tiny_llama, tiny_qwen2, tiny_elastic_llama, tmp_path):
    anchored = tiny_elastic_llama.spec.levels[0]  # per-layer widths, layer 2 skipped: deci
    half = Level(0.5, [1] * 4, [256] * 4)         # uniform: llama, and qwen2 -> llama with permuted q/k rows
    cases = [(tiny_llama, None, None), (tiny_qwen2, None, None), (tiny_elastic_llama, anchored, 0),
             (tiny_llama, half, half), (tiny_qwen2, half, half), (tiny_qwen2, anchored, anchored)]
    paths, wants = [], []
    for i, (tm, widths, level) in enumerate(cases):
        path = tm.path
        if level is not None:
            path = tmp_path / f"export{i}.gguf"
            truncate.export_static(tm.path, path, level)
        c, w, _ = model.load_gguf(tm.path, dtype=torch.float64)
        paths.append(path)
        wants.append(model.forward(c, w, torch.tensor(TOKENS), widths=widths, dtype=torch.float64).numpy())
    gots, tokenized = llama_cpp_logits(paths, tmp_path)
    archs = [contract.reader_fields(gguf.GGUFReader(p))["general.architecture"] for p in paths]
    assert archs == ["llama", "qwen2", "deci", "llama", "llama", "deci"]
    for p, got, want in zip(paths, gots, wants):
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), p
    # the tiny SPM vocabulary tokenizes: BOS, '▁' (259), 'he' (261), then byte fallback for 'llo'
    assert tokenized[0][:4] == [1, 259, 261, 3 + ord("l")]
