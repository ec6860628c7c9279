"""Cost of ElasticLlama's per-context lock on the decode path: ms per generated token of the same greedy
completion through ElasticLlama (every eval/generate step holds the lock) and through plain llama_cpp.Llama,
alternating which goes first, on one model file.

    python bench/bench_lock.py -m models/smollm2-135m-elastic-q4_0.gguf -t 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp  # noqa: E402

from elms_gguf.runtime import ElasticLlama  # noqa: E402


def ms_per_token(llm: llama_cpp.Llama, n: int, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = llm.create_completion("The capital of France is", max_tokens=n, temperature=0.0)
        ts.append((time.perf_counter() - t0) / max(1, out["usage"]["completion_tokens"]) * 1e3)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5, help="completions per round and class (median)")
    args = ap.parse_args(argv)
    locked = ElasticLlama(args.model, n_ctx=256, n_threads=args.threads, verbose=False)
    plain = llama_cpp.Llama(args.model, n_ctx=256, n_threads=args.threads, verbose=False)
    for r in range(args.rounds):
        if r % 2 == 0:  # alternate which goes first
            a = ms_per_token(locked, args.n_predict, args.runs)
            b = ms_per_token(plain, args.n_predict, args.runs)
        else:
            b = ms_per_token(plain, args.n_predict, args.runs)
            a = ms_per_token(locked, args.n_predict, args.runs)
        print(f"round {r + 1}: ElasticLlama {a:.3f} ms/token, llama_cpp.Llama {b:.3f} ms/token, ratio {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
