"""Speed of elastic levels vs physically truncated GGUFs, and the cost of switching level vs reloading.

For every level of an elastic GGUF this prints, measured side by side with the same patched binary:

* prefill (pp512) and decode (tg128) tokens/s of the level (``llama-bench --elms-ratio``) and of the physically
  truncated GGUF of the same widths (``elms_gguf.truncate.export_static``, loaded by the stock code path), both
  with llama.cpp's defaults, i.e. weights repacked where the CPU repacks their type (``--baseline stock``, the
  default: what a user would run instead; ``--baseline norepack`` runs both with ``--repack 0``), in interleaved
  rounds (median over all samples), and their ratio (target >= 0.95; the full level against the dense file >= 0.97),
  plus the *paired* ratio: the median (and quartiles) of each round's elastic/truncated ratio, the two runs of a
  round back to back with the order alternating, which cancels most of the machine's slow drift;
* the time to switch level in a running process (set level + KV-cache clear) vs loading the truncated GGUF in
  process (model load + context + first decode).

    python bench/bench_speed.py --model models/smollm2-135m-elastic-q4_0.gguf          # a converted model
    python bench/bench_speed.py --synthetic                                          # SmolLM2 + uniform levels

``--synthetic`` adds uniform levels (the widths of ../shared/research/anchor-speeds.md) to the original SmolLM2 GGUF:
speed does not depend on the unit order, so this measures the runtime before/without elms-convert.
Run on a quiet machine (check ``uptime``): 2-vCPU VMs vary +-10-15 % run to run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elms_gguf import contract, model, truncate  # noqa: E402
from elms_gguf.convert import default_model_path  # noqa: E402

log = logging.getLogger("bench_speed")
BIN = Path(os.environ.get("ELMS_LLAMA_LIB_DIR", ROOT / "build" / "llama" / "bin"))


def synthetic_elastic(dst: Path) -> Path:
    """The original SmolLM2 Q4_1 GGUF plus uniform levels KV1/FF384, KV2/FF768, KV3/FF768, full."""
    src = default_model_path()
    cfg, w, source = model.load_gguf(src)
    d = cfg.dims()
    levels = [contract.uniform_level(d, r, kv, ff) for r, kv, ff in ((0.4, 1, 384), (0.6, 2, 768), (0.8, 3, 768))]
    levels.append(contract.uniform_level(d, 1.0, d.n_head_kv, d.n_ff))
    for lv in levels:
        lv.achieved_ratio = contract.level_ratio(d, lv)
    spec = contract.ElasticSpec(levels=levels, model_id="smollm2-synthetic-uniform", importance="none",
                                allocation="uniform-synthetic")
    model.write_gguf(dst, cfg, w, source=source, types=source.tensor_types, spec=spec)
    return dst


def llama_bench(model_path: Path, *, ratio: float | None, threads: int, reps: int, pp: int, tg: int,
                repack: bool = True, env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Per-sample tokens/s of one llama-bench run, keyed pp<N> / tg<N> (``repack``: llama.cpp's default)."""
    cmd = [str(BIN / "llama-bench"), "-m", str(model_path), "-p", str(pp), "-n", str(tg), "-r", str(reps),
           "-t", str(threads), "--repack", "1" if repack else "0", "-o", "json"]
    if ratio is not None:
        cmd += ["--elms-ratio", str(ratio)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {r.stderr[-2000:]}")
    out: dict[str, list[float]] = {}
    for t in json.loads(r.stdout):
        key = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
        out[key] = [float(x) for x in t["samples_ts"]]
    return out


def switch_times(elastic: Path, truncated: Path, level: int, *, n: int = 50) -> tuple[float, float]:
    """Median ms: (set level + KV-cache clear in a live process, load truncated GGUF + context + first decode).

    The first decode after a switch rebuilds the graph for the new widths (no re-reserve): that cost is part of
    every first decode and is not counted on either side."""
    import llama_cpp

    from elms_gguf.runtime import ElasticLlama, lib

    llm = ElasticLlama(str(elastic), n_ctx=2048, n_threads=2, verbose=False)
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    sw = []
    for k in range(n):
        target = level if k % 2 == 0 else -1
        t0 = time.perf_counter()
        lib().llama_set_elastic_level(llm._ctx.ctx, target)
        llama_cpp.llama_memory_clear(mem, False)  # what ElasticLlama.set_level does
        sw.append((time.perf_counter() - t0) * 1e3)
    llm.close()
    loads = []
    for _ in range(5):
        t0 = time.perf_counter()
        m = ElasticLlama(str(truncated), n_ctx=2048, n_threads=2, verbose=False)
        m.eval([1])
        loads.append((time.perf_counter() - t0) * 1e3)
        m.close()
    return statistics.median(sw), statistics.median(loads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="elastic GGUF (default: --synthetic)")
    src.add_argument("--synthetic", action="store_true", help="SmolLM2-135M Q4_1 with uniform levels added")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (elastic, truncated) per level")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench -r per round")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--levels", type=str, default="", help="comma-separated level indices (default: all, the full "
                    "level against the dense file)")
    ap.add_argument("--baseline", choices=("stock", "norepack"), default="stock",
                    help="stock: both runs with llama.cpp's defaults (weights repacked where the CPU repacks their "
                         "type); norepack: both with --repack 0")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    work = Path(tempfile.mkdtemp(prefix="elms-bench-"))
    elastic = args.model or synthetic_elastic(work / "synthetic-elastic.gguf")
    spec = contract.read_spec(contract.reader_fields(model.open_gguf(elastic)))
    if spec is None:
        raise SystemExit(f"{elastic} is not an elastic GGUF")
    idx = [int(x) for x in args.levels.split(",")] if args.levels else list(range(len(spec.levels)))
    repack = args.baseline == "stock"

    rows = []
    for i in idx:
        lv = spec.levels[i]
        trunc = work / f"level{i}.gguf"
        if lv.ratio >= 1.0:
            truncate.strip_elastic(elastic, trunc)  # the full level against the plain dense file
        else:
            truncate.export_static(elastic, trunc, i)
        samples: dict[str, dict[str, list[float]]] = {"el": {}, "tr": {}}
        per_round: dict[str, dict[str, list[float]]] = {"el": {}, "tr": {}}  # each round's median, for paired ratios
        for rnd in range(args.rounds):
            log.info("level %d (ratio %.2f): round %d/%d", i, lv.ratio, rnd + 1, args.rounds)
            pair = [("el", elastic, lv.ratio), ("tr", trunc, None)]
            for who, path, ratio in (pair if rnd % 2 == 0 else pair[::-1]):  # alternate who goes first
                for k, v in llama_bench(path, ratio=ratio, threads=args.threads, reps=args.reps, pp=args.pp,
                                        tg=args.tg, repack=repack).items():
                    samples[who].setdefault(k, []).extend(v)
                    per_round[who].setdefault(k, []).append(statistics.median(v))
        sw_ms, load_ms = switch_times(elastic, trunc, i)
        med = {w: {k: statistics.median(v) for k, v in s.items()} for w, s in samples.items()}
        pp, tg = f"pp{args.pp}", f"tg{args.tg}"
        paired = {k: sorted(e / t for e, t in zip(per_round["el"][k], per_round["tr"][k])) for k in (pp, tg)}
        rows.append((i, lv.ratio, lv.achieved_ratio, med["el"][pp], med["tr"][pp], med["el"][tg], med["tr"][tg],
                     paired[pp], paired[tg], sw_ms, load_ms))

    def quartiles(v: list[float]) -> str:
        q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
        return f"**{statistics.median(v):.3f}** ({q[0]:.2f}-{q[2]:.2f})"

    head = (f"| level | ratio (achieved) | {pp} elastic | {pp} truncated | ratio | paired (IQR) | {tg} elastic "
            f"| {tg} truncated | ratio | paired (IQR) | switch (ms) | reload truncated (ms) |\n"
            f"|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = head + "".join(
        f"| {i} | {r:.2f} ({a if a is None else round(a, 3)}) | {ep:.1f} | {tp:.1f} | {ep / tp:.3f} | {quartiles(ppr)} "
        f"| {eg:.1f} | {tgv:.1f} | {eg / tgv:.3f} | {quartiles(tgr)} | {sw:.3f} | {ld:.1f} |\n"
        for i, r, a, ep, tp, eg, tgv, ppr, tgr, sw, ld in rows)
    cmd = " ".join(["python", "bench/bench_speed.py"] + (argv if argv is not None else sys.argv[1:]))
    uptime = open("/proc/loadavg").read().split()[:3]
    print(f"\n{cmd}\n(baseline {args.baseline}: both runs {'with llama.cpp defaults (repack on)' if repack else 'with --repack 0'}; "
          f"threads {args.threads}, {args.rounds} interleaved rounds x {args.reps} reps, tok/s medians of "
          f"all samples; 'paired': median and quartiles of the per-round elastic/truncated ratios, the two runs of a "
          f"round back to back, alternating which goes first; load average at end {' '.join(uptime)}; "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY') or 'unset'})\n")
    print(table)
    if args.out:
        args.out.write_text(f"`{cmd}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
