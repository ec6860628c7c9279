"""Helpers for tests that run GGUFs through the patched llama.cpp (in-process, via llama-cpp-python)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("ELMS_LLAMA_LIB_DIR", ROOT / "build" / "llama" / "bin"))

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0 = 0, 1, 8

# 13 prompt tokens = 2 ubatches of 8 + 5, then greedy decode steps: the KV cache is written and re-read and
# (with reuse on) the single-token graph is reused
PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


def require_runtime() -> None:
    if not (BIN / "libllama.so").exists():
        pytest.skip(f"patched llama.cpp not built ({BIN}); run `make setup`")


def binary(name: str) -> Path:
    p = BIN / name
    if not p.exists():
        pytest.skip(f"{p} not built; run `make setup`")
    return p


@contextlib.contextmanager
def graph_reuse(enabled: bool) -> Iterator[None]:
    """llama.cpp reads LLAMA_GRAPH_REUSE_DISABLE when a context is created."""
    old = os.environ.get("LLAMA_GRAPH_REUSE_DISABLE")
    os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = "0" if enabled else "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LLAMA_GRAPH_REUSE_DISABLE", None)
        else:
            os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = old


def open_llm(path: Path | str, *, flash_attn: bool = True, type_kv: int = GGML_TYPE_F16, reuse: bool = True,
             **kwargs: object):
    """An ElasticLlama (weights repacked where the CPU repacks their type, as stock) set up for exact logit comparisons.

    One thread: with two, stock llama.cpp itself is not bit-reproducible run to run on these tiny random models
    (thread-timing-dependent reduction order flips near-tied greedy tokens), so exact comparisons would flake.
    """
    require_runtime()
    from elms_gguf.runtime import ElasticLlama

    with graph_reuse(reuse):
        return ElasticLlama(str(path), n_ctx=64, n_batch=8, n_ubatch=8, n_threads=1, logits_all=True,
                            flash_attn=flash_attn, type_k=type_kv, type_v=type_kv, verbose=False, **kwargs)


def run_logits(llm, prompt: Sequence[int] = PROMPT, decode_steps: int = 3) -> tuple[np.ndarray, list[int]]:
    """Logits of every position: the prompt in ubatches, then greedy single-token steps."""
    llm.reset()
    llm.eval(list(prompt))
    tokens = list(prompt)
    for _ in range(decode_steps):
        nxt = int(np.argmax(llm.scores[len(tokens) - 1]))
        llm.eval([nxt])
        tokens.append(nxt)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32).copy(), tokens


def logits_of(path: Path | str, *, level: int | None = None, **kwargs: object) -> tuple[np.ndarray, list[int]]:
    llm = open_llm(path, **kwargs)
    try:
        if level is not None:
            llm.set_level(level)
        return run_logits(llm)
    finally:
        llm.close()


def quantize(src: Path, dst: Path, qtype: str) -> Path:
    """Quantize with the patched llama-quantize (K-quant mixes cannot be written from Python)."""
    r = subprocess.run([str(binary("llama-quantize")), str(src), str(dst), qtype], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return dst


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
