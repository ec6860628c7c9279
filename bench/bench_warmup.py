"""First requests of a fresh serving process vs later ones, by ``ElasticLlama.warmup()`` variant.

Each round starts one fresh process per variant (alternating, so both see the same machine state): load the
model, warm it up (``warmup``: a 32-token prefill at every level, what ``bench_slo.py`` and ``demo_slo`` do) or
not (``none``), switch to a level, then time ``--requests`` prefills of ~``--tokens`` tokens (TTFT) and 4 short
generations (TPOT) from an empty KV cache. Prints, per process, the first request / the median of the later
ones, and the medians over rounds: how much slower than later requests (and than a profile, which is measured
warm) the first request of a fresh process runs.

    python bench/bench_warmup.py --model bench/out/qfull/layerdrop.gguf --rounds 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(model: str, variant: str, threads: int, tokens: int, requests: int, level: float) -> dict:
    from elms_gguf import profile as P
    from elms_gguf.serve import ElasticLlama

    llm = ElasticLlama(model, n_threads=threads, n_ctx=2048, n_batch=512, verbose=False, profile=None)
    t0 = time.perf_counter()
    if variant == "warmup":
        llm.warmup()
    warm_ms = (time.perf_counter() - t0) * 1e3
    llm.set_ratio(level)
    toks = P.filler_tokens(llm, tokens)
    ttft = [P.time_ttft(llm, toks[: tokens - i]) for i in range(requests)]  # a token less each: no prefix reuse
    tpot = [statistics.mean(P.time_tpot(llm, toks[: tokens // 2 - i], 8)) for i in range(4)]
    return {"variant": variant, "warmup_ms": warm_ms, "ttft": ttft, "tpot": tpot}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an elastic GGUF")
    p.add_argument("--variants", default="warmup,none", help="comma-separated: warmup, none (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=400, help="prompt tokens of the timed prefills (default: %(default)s)")
    p.add_argument("--requests", type=int, default=6, help="timed prefills per process (default: %(default)s)")
    p.add_argument("--level", type=float, default=0.8, help="ratio of the level served (default: %(default)s)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.threads, args.tokens, args.requests, args.level)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, "--model", args.model, "--child", v, "--threads", str(args.threads),
                   "--tokens", str(args.tokens), "--requests", str(args.requests), "--level", str(args.level)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            d = json.loads(out)
            rows[v].append(d)
            t, s = d["ttft"], d["tpot"]
            print(f"round {r + 1} {v:6s}: warm-up {d['warmup_ms']:6.0f} ms; TTFT first {t[0]:7.1f} ms = "
                  f"{t[0] / statistics.median(t[1:]):.2f}x the later median {statistics.median(t[1:]):7.1f}; "
                  f"TPOT first {s[0]:5.2f} ms = {s[0] / statistics.median(s[1:]):.2f}x {statistics.median(s[1:]):5.2f}",
                  flush=True)
    print()
    for v, ds in rows.items():
        med = statistics.median
        print(f"{v:6s}: warm-up {med(d['warmup_ms'] for d in ds):.0f} ms; first/later TTFT "
              f"{med(d['ttft'][0] / med(d['ttft'][1:]) for d in ds):.2f}x, TPOT "
              f"{med(d['tpot'][0] / med(d['tpot'][1:]) for d in ds):.2f}x; later TTFT "
              f"{med(med(d['ttft'][1:]) for d in ds):.0f} ms, TPOT {med(med(d['tpot'][1:]) for d in ds):.2f} ms "
              f"(medians over {len(ds)} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
