"""Could a level read fewer output-head rows? Token-id coverage of the SLO benchmark's apps under a vocabulary cut.

On a model whose output head is a large share of the bytes read per token (Qwen2.5-0.5B: a 151,936 x 896 Q8_0
head, 145 of the 391.5 MB a dense decode step reads), no width level can decode below ~0.37 x the dense TPOT. A
level could skip most of the head if it only scored a subset of the vocabulary. Two ways to pick K tokens:

* ``prefix``: the first K token ids. A row-prefix view of ``output.weight`` is zero-copy, like every other elastic
  view, and the file stays stock -- but only if the tokenizer's ids run roughly by frequency.
* ``frequent``: the K ids most frequent in text the benchmark does not use (the TLM's training texts:
  commonsense_qa / social_i_qa / arc_challenge prompts and CoQA stories). Needs a gathered copy of those rows
  (K x row bytes of extra memory) and an id map to scatter the logits back.

For each app of ``bench_slo.py`` this prints the share of the app's context, question and answer-choice tokens
inside the K kept ids, and the share of answer choices whose every token is kept: a choice with a token outside
cannot be generated (nor scored by log-probability) at such a level.

    python bench/bench_vocab.py models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a GGUF (only its tokenizer is loaded)")
    ap.add_argument("--keep", default="16384,32768,65536", help="vocabulary sizes K to test (default: %(default)s)")
    ap.add_argument("-n", type=int, default=50, help="questions per app (default: %(default)s, bench_slo's seed)")
    args = ap.parse_args(argv)

    import bench_slo
    from elms_gguf import tasks as TK
    from elms_gguf.runtime import llama_cpp

    bench_slo._extra_tasks()
    llm = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    n_vocab = llm.n_vocab()

    def tok(text: str) -> np.ndarray:
        return np.array(llm.tokenize(text.encode(), add_bos=False, special=False), dtype=np.int64)

    counts = np.zeros(n_vocab, dtype=np.int64)
    for text in TK.training_texts():
        np.add.at(counts, tok(text), 1)
    by_freq = np.argsort(-counts, kind="stable")
    print(f"{args.model}: vocabulary {n_vocab}; frequencies from {int(counts.sum())} tokens of the TLM's training "
          f"texts ({int((counts > 0).sum())} distinct ids)")
    print(f"{'app':<11} {'K':>6} {'select':>9} {'context':>8} {'question':>9} {'choices':>8} {'whole choices':>14}")
    for app_name, _ in bench_slo.APPS:
        app = TK.app_prompts(app_name, n_items=args.n, seed=1)
        ctx = tok(app.context)
        q = np.concatenate([tok(app.question(it)) for it in app.items])
        choices = [tok(" " + c) for it in app.items for c in it.choices]
        ch = np.concatenate(choices)
        for k in (int(x) for x in args.keep.split(",")):
            for how in ("prefix", "frequent"):
                kept = np.zeros(n_vocab, dtype=bool)
                if how == "prefix":
                    kept[:k] = True
                else:
                    kept[by_freq[:k]] = True
                whole = np.mean([kept[c].all() for c in choices])
                print(f"{app_name:<11} {k:>6} {how:>9} {kept[ctx].mean():>8.3f} {kept[q].mean():>9.3f} "
                      f"{kept[ch].mean():>8.3f} {whole:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
