"""LoRA recovery figures: per level of the default elastic model, with and without its trained adapter.

    python bench/bench_lora.py                                   # train (demo preset) + measure everything
    python bench/bench_lora.py --trained bench/out/lora/smollm2-elastic-lora.gguf   # measure an existing result

Model: ``--model``, else ``/tmp/smollm2-elastic.gguf`` or ``models/smollm2-135m-elastic-q4_0.gguf`` if present,
else ``elms-convert`` with defaults into ``bench/out/lora/``. Prints, and writes to ``bench/out/lora/report.json``:

* training: ``elms-train-lora MODEL -o OUT --preset P`` in a subprocess (``nice -n 10``): wall time, per-level time,
  KD loss before/after, peak RSS of the training process;
* perplexity of every level on the converter's held-out CoQA split (``elms_gguf.calib.build`` defaults, disjoint
  from the training stories), **computed by llama.cpp** (``ElasticLlama``, all logits), with the level's adapter
  (``elms_lora="required"``) and without (``elms_lora="off"``);
* RSS of a serving process (``ElasticLlama`` + one 64-token prompt, fresh subprocess each): the input model,
  the output model with every adapter loaded (dense level and a small level), and the output with adapters off;
* prefill / decode speed per level with and without the level's adapter: ``llama-bench --elms-ratio R`` with
  ``LLAMA_ELMS_LORA`` unset (adapters required) vs ``=off`` (llama-bench has no ``--elms-lora`` flag; the
  variable is what that flag sets), interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from docblock import write_block  # noqa: E402
from elms_gguf.cli import sleep_idle_openmp  # noqa: E402  (loads no OpenMP runtime)

# llama.cpp's CPU backend runs on OpenMP: on a shared machine spinning idle workers make the perplexity passes 2x
# slower. Sleep instead for the quality/memory parts; llama-bench gets the caller's environment unchanged.
_CALLER_OMP = os.environ.get("OMP_WAIT_POLICY")
sleep_idle_openmp()

log = logging.getLogger("bench_lora")
BIN = Path(os.environ.get("ELMS_LLAMA_LIB_DIR", ROOT / "build" / "llama" / "bin"))
PY = sys.executable
CANDIDATES = (Path("/tmp/smollm2-elastic.gguf"), ROOT / "models" / "smollm2-135m-elastic-q4_0.gguf")


def find_model(explicit: str | None, out_dir: Path) -> Path:
    if explicit:
        return Path(explicit)
    for c in CANDIDATES:
        if c.exists():
            return c
    dst = out_dir / "smollm2-elastic.gguf"
    if not dst.exists():
        log.info("no converted model found: running elms-convert with defaults -> %s", dst)
        subprocess.run(["nice", "-n", "10", PY, "-m", "elms_gguf.convert", "-o", str(dst), "--no-progress"], check=True,
                       cwd=ROOT)
    return dst


def train(model: Path, out: Path, preset: str, extra: list[str]) -> dict:
    report = out.with_suffix(".train.json")
    cmd = ["nice", "-n", "10", PY, "-m", "elms_gguf.train_lora", str(model), "-o", str(out), "--preset", preset,
           "--no-progress", "--report-json", str(report), *extra]
    log.info("%s", " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    rep = json.loads(report.read_text())
    rep["wall_seconds"] = time.perf_counter() - t0
    report.write_text(json.dumps(rep, indent=1))
    return rep


def heldout_rows(model: Path):
    """The converter's held-out split (calib.build defaults), tokenized by the model's own BPE."""
    from elms_gguf import calib, contract
    from elms_gguf.model import open_gguf
    from elms_gguf.tokenizer import BPETokenizer

    fields = contract.reader_fields(open_gguf(model))
    tok = BPETokenizer.from_fields(fields, source=str(model))
    cfg = calib.CalibConfig()
    data = calib.build(cfg, tok.encode)
    return data.heldout, data.description


def perplexities(path: Path, rows, *, lora_policy: str, threads: int) -> dict[int, float]:
    """level -> perplexity of ``rows`` computed by llama.cpp (level -1 = dense)."""
    import numpy as np

    from elms_gguf.runtime import ElasticLlama

    n = int(rows.shape[1])
    llm = ElasticLlama(str(path), n_ctx=n, n_batch=n, n_ubatch=n, n_threads=threads, n_threads_batch=threads,
                       logits_all=True, verbose=False, elms_lora=lora_policy)
    out: dict[int, float] = {}
    try:
        for lv in [i.index for i in llm.levels]:
            llm.set_level(lv)
            nll, count = 0.0, 0
            for row in rows.tolist():
                llm.reset()
                llm.eval(row)
                s = np.asarray(llm.scores[: n - 1], dtype=np.float64)
                m = s.max(-1, keepdims=True)
                lse = (m[:, 0] + np.log(np.exp(s - m).sum(-1)))
                nll += float((lse - s[np.arange(n - 1), row[1:]]).sum())
                count += n - 1
            out[lv] = float(np.exp(nll / count))
            log.info("%s lora=%s level %d: ppl %.2f", path.name, lora_policy, lv, out[lv])
    finally:
        llm.close()
    return out


RSS_SNIPPET = r"""
import sys
from elms_gguf.runtime import ElasticLlama
path, policy, ratio, n_ctx = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
llm = ElasticLlama(path, n_ctx=n_ctx, n_threads=2, verbose=False, elms_lora=policy)
if ratio < 1.0:
    llm.set_ratio(ratio)
llm.eval(list(range(100, 164)))
st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(int(st["VmRSS"].split()[0]) / 1024, int(st["VmHWM"].split()[0]) / 1024)
"""


def rss(path: Path, policy: str, ratio: float, n_ctx: int = 512) -> tuple[float, float]:
    r = subprocess.run([PY, "-c", RSS_SNIPPET, str(path), policy, str(ratio), str(n_ctx)], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    a, b = r.stdout.split()
    return float(a), float(b)


def llama_bench(model: Path, ratio: float, lora: bool, *, threads: int, reps: int, pp: int, tg: int) -> dict[str, list[float]]:
    env = dict(os.environ)
    env.pop("LLAMA_ELMS_LORA", None)
    env.pop("OMP_WAIT_POLICY", None)
    if _CALLER_OMP is not None:
        env["OMP_WAIT_POLICY"] = _CALLER_OMP
    if not lora:
        env["LLAMA_ELMS_LORA"] = "off"
    from bench_speed import llama_bench as run_llama_bench  # bench/ is the script's directory

    return run_llama_bench(model, ratio=ratio, threads=threads, reps=reps, pp=pp, tg=tg, env=env)


def speed_figures(out: Path, levels: list[tuple[int, float]], args: argparse.Namespace) -> dict:
    """llama-bench per level, with / without the level's adapter, in interleaved rounds (median tokens/s)."""
    speed: dict[str, dict[str, list[float]]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for i, r in levels:
            if i < 0:
                continue
            for lora in (True, False):
                key = f"{r:.2f}/{'lora' if lora else 'off'}"
                got = llama_bench(out, r, lora, threads=args.bench_threads, reps=args.reps, pp=args.pp, tg=args.tg)
                for k, v in got.items():
                    speed.setdefault(key, {}).setdefault(k, []).extend(v)
        load.append(os.getloadavg()[0])
    return {"speed": {k: {m: statistics.median(v) for m, v in d.items()} for k, d in speed.items()},
            "speed_setup": {"threads": args.bench_threads, "rounds": args.rounds, "reps": args.reps, "pp": args.pp,
                            "tg": args.tg, "load_avg_1min": load}}


def _cmdline() -> str:
    """This run's command line, without the output-only flags."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--doc",):
            skip = True
            continue
        if a.startswith("--doc=") or a in ("--report-only",):
            continue
        args.append(a)
    return " ".join(["python bench/bench_lora.py", *args])


def _model_id(path: Path) -> str:
    from elms_gguf import contract
    from elms_gguf.model import open_gguf

    return str(contract.reader_fields(open_gguf(path)).get(contract.KEY_MODEL_ID, ""))


def _levels_of(path: Path) -> list[tuple[int, float]]:
    from elms_gguf import contract
    from elms_gguf.model import open_gguf

    spec = contract.read_spec(contract.reader_fields(open_gguf(path)))
    return [(i, lv.ratio) for i, lv in enumerate(spec.levels)] + [(-1, 1.0)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="elastic GGUF (default: see module doc)")
    p.add_argument("--trained", help="an elms-train-lora output to measure (skips training)")
    p.add_argument("--preset", default="demo", help="elms-train-lora preset (default: %(default)s)")
    p.add_argument("--train-args", default="", help="extra elms-train-lora flags, e.g. '--steps 60'")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "lora"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved llama-bench rounds (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="llama-bench -r per round (default: %(default)s)")
    p.add_argument("--pp", type=int, default=128)
    p.add_argument("--tg", type=int, default=32)
    p.add_argument("--bench-threads", type=int, default=1,
                   help="llama-bench -t (default: %(default)s: on a shared machine one thread is the steadiest)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--rss-ctx", default="2048,8192", type=lambda v: [int(x) for x in v.split(",") if x],
                   help="also measure dense vs all-adapters RSS at these n_ctx (default: %(default)s)")
    p.add_argument("--speed-only", action="store_true", help="rerun only the llama-bench figures of OUT_DIR/report.json")
    p.add_argument("--report-only", action="store_true", help="rewrite the doc section from OUT_DIR/report.json")
    p.add_argument("--doc", default=str(ROOT / "docs" / "quality.md"),
                   help="markdown file whose 'LoRA recovery' section is (re)written (default: %(default)s; '' = none)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only or args.speed_only:
        rep = json.loads((out_dir / "report.json").read_text())
        levels = [tuple(x) for x in rep["levels"]] if "levels" in rep else _levels_of(Path(rep["out"]))
        rep.setdefault("model_id", _model_id(Path(rep["out"])))
        if args.speed_only:
            rep.update(speed_figures(Path(rep["out"]), levels, args))
            rep["speed_command"] = _cmdline()
            rep["levels"] = levels
            (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
        rep.setdefault("command", _cmdline())
        print_report(rep, levels)
        if args.doc:
            write_doc(Path(args.doc), doc_section(rep, levels))
        return 0
    report: dict = {"uptime_before": os.getloadavg()}

    if args.trained:
        out = Path(args.trained)
        tj = out.with_suffix(".train.json")
        report["train"] = json.loads(tj.read_text()) if tj.exists() else None
        model = Path(report["train"]["model"]) if report["train"] else Path(args.model or "")
    else:
        model = find_model(args.model, out_dir)
        out = out_dir / (model.stem + "-lora.gguf")
        report["train"] = train(model, out, args.preset, args.train_args.split())
        report["train"]["config"]["preset"] = args.preset + (f" {args.train_args}" if args.train_args else "")
    report["model"], report["out"] = str(model), str(out)
    report["model_id"] = _model_id(out)

    from elms_gguf import contract
    from elms_gguf import lora as L
    from elms_gguf.model import open_gguf

    L.check_level_adapters(out, load=False)  # missing / corrupt adapters: stop here, not in llama.cpp
    spec = contract.read_spec(contract.reader_fields(open_gguf(out)))
    sizes = {i: os.path.getsize(out.parent / lv.lora) for i, lv in enumerate(spec.levels) if lv.lora}
    report["adapter_bytes"] = sizes
    if sizes:
        first = open_gguf(out.parent / spec.levels[min(sizes)].lora).tensors[0]
        report["adapter_type"] = first.tensor_type.name.lower()
        full = {t.name: tuple(int(x) for x in t.shape) for t in open_gguf(out).tensors}
        cut = any(tuple(int(x) for x in t.shape)[t.name.endswith(".lora_b")] < full[t.name[:-7]][t.name.endswith(".lora_b")]
                  for i in sizes for t in open_gguf(out.parent / spec.levels[i].lora).tensors)
        report["adapter_layout"] = "compact" if cut else "padded"

    rows, desc = heldout_rows(model)
    report["heldout"] = desc
    t0 = time.perf_counter()
    with_lora = perplexities(out, rows, lora_policy="required", threads=args.threads)
    without = perplexities(out, rows, lora_policy="off", threads=args.threads)
    report["ppl"] = {"with_lora": with_lora, "without_lora": without, "seconds": time.perf_counter() - t0}

    from elms_gguf.runtime import ElasticLlama

    probe = ElasticLlama(str(out), n_ctx=64, verbose=False, elms_lora="off")
    levels = [(lv.index, lv.ratio) for lv in probe.levels]
    probe.close()
    mid = min((r for i, r in levels if i >= 0), key=lambda r: abs(r - 0.6))
    report["rss_mb"] = {
        "input model, dense": rss(model, "off", 1.0),
        "with all adapters, dense": rss(out, "required", 1.0),
        f"with all adapters, level {mid:.2f}": rss(out, "required", mid),
        f"adapters off, level {mid:.2f}": rss(out, "off", mid),
    }
    # the KV cache grows with the context and the adapters do not: the same pair at longer contexts
    for n_ctx in args.rss_ctx:
        report["rss_mb"][f"input model, dense, n_ctx {n_ctx}"] = rss(model, "off", 1.0, n_ctx)
        report["rss_mb"][f"with all adapters, dense, n_ctx {n_ctx}"] = rss(out, "required", 1.0, n_ctx)

    if not args.skip_speed:
        report.update(speed_figures(out, levels, args))
    report["uptime_after"] = os.getloadavg()
    report["command"] = _cmdline()
    report["levels"] = levels
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    print_report(report, levels)
    if args.doc:
        write_doc(Path(args.doc), doc_section(report, levels))
    return 0


def print_report(rep: dict, levels: list[tuple[int, float]]) -> None:
    tr = rep.get("train") or {}
    by_level = {lv["level"]: lv for lv in tr.get("levels", [])}
    w, wo = rep["ppl"]["with_lora"], rep["ppl"]["without_lora"]
    key = lambda d, i: d.get(i, d.get(str(i)))  # noqa: E731 (JSON keys are strings)
    print(f"model {rep['model']} -> {rep['out']}")
    if tr:
        print(f"training: {tr.get('data')}; data {tr['data_seconds']:.0f} s, teacher {tr['teacher_seconds']:.0f} s, "
              f"total {tr['total_seconds']:.0f} s (wall {tr.get('wall_seconds', 0):.0f} s)")
    print(f"held-out: {rep['heldout']}")
    print("| level | ratio | PPL no LoRA | PPL LoRA | KD before -> after | train s | peak RSS MB | adapter MB |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in levels:
        t = by_level.get(i)
        a = rep["adapter_bytes"].get(i, rep["adapter_bytes"].get(str(i)))
        print(f"| {i} | {r:.2f} | {key(wo, i):.1f} | {key(w, i):.1f} | "
              + (f"{t['kd_before']:.3f} -> {t['kd_after']:.3f} | {t['seconds']:.0f} | {t['peak_rss_mb']:.0f} | "
                 if t else "- | - | - | ")
              + (f"{a / 2**20:.1f} |" if a else "- |"))
    print("| serving process | RSS MB | peak MB |")
    print("|---|---|---|")
    for k, (a, b) in rep["rss_mb"].items():
        print(f"| {k} | {a:.0f} | {b:.0f} |")
    if "speed" in rep:
        print("| ratio | pp t/s LoRA | pp t/s off | tg t/s LoRA | tg t/s off |")
        print("|---|---|---|---|---|")
        for i, r in levels:
            if i < 0:
                continue
            a, b = rep["speed"][f"{r:.2f}/lora"], rep["speed"][f"{r:.2f}/off"]
            pk, tk = [k for k in a if k.startswith("pp")][0], [k for k in a if k.startswith("tg")][0]
            print(f"| {r:.2f} | {a[pk]:.1f} | {b[pk]:.1f} | {a[tk]:.1f} | {b[tk]:.1f} |")
    print(f"load average before {rep['uptime_before']}, after {rep['uptime_after']}")


BEGIN, END = "<!-- lora-recovery:begin (bench/bench_lora.py) -->", "<!-- lora-recovery:end -->"


def write_doc(doc: Path, section: str) -> None:
    write_block(doc, BEGIN, END, section, title='# Quality')


def _num(x: float) -> str:
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def doc_section(rep: dict, levels: list[tuple[int, float]]) -> str:
    tr = rep.get("train") or {}
    cfg = tr.get("config", {})
    by_level = {lv["level"]: lv for lv in tr.get("levels", [])}
    w, wo = rep["ppl"]["with_lora"], rep["ppl"]["without_lora"]
    get = lambda d, i: d.get(i, d.get(str(i)))  # noqa: E731
    dense = get(wo, -1)
    L: list[str] = []
    a = L.append
    a("## LoRA recovery")
    a("")
    a(f"Every level below full width of `{rep['model']}` (`elms.model_id` {rep.get('model_id', '?')}) got its own LoRA from `elms-train-lora` (rank "
      f"{cfg.get('rank')}, alpha {cfg.get('alpha')}, all seven linears of every active block; KL to the dense model's "
      f"top-{cfg.get('topk')} next-token distribution + tail bucket), preset `{cfg.get('preset', 'demo')}`: "
      f"{cfg.get('steps')} steps x {cfg.get('batch')} rows x {cfg.get('seq_len')} tokens per level, lr {cfg.get('lr')}, "
      f"seed {cfg.get('seed')}, on {by_level and next(iter(by_level.values()))['device']}. Training data: "
      f"{tr.get('data')}." + (f" {rep['model_note']}" if rep.get("model_note") else ""))
    a("")
    a(f"Perplexity is computed **by llama.cpp** (`ElasticLlama`, all logits) on {rep['heldout']} -- the converter's "
      "held-out split, disjoint from the training stories. \"LoRA\" loads the output with `elms_lora=\"required\"`, "
      "\"no LoRA\" the same file with `elms_lora=\"off\"`.")
    a("")
    a("```sh")
    a(rep["command"])
    if tr:
        a(f"# which ran: nice -n 10 elms-train-lora {rep['model']} -o {rep['out']} --preset {cfg.get('preset', 'demo')} "
          "--report-json ...")
    a("```")
    a("")
    a("| level | ratio | PPL no LoRA (x dense) | PPL LoRA (x dense) | KD on training rows, before -> after | train time s | "
      "adapter MiB |")
    a("|---|---|---|---|---|---|---|")
    for i, r in levels:
        t = by_level.get(i)
        ab = get(rep["adapter_bytes"], i)
        p0, p1 = get(wo, i), get(w, i)
        a(f"| {i if i >= 0 else 'dense'} | {r:.2f} | {_num(p0)} ({_num(p0 / dense)}x) | {_num(p1)} ({_num(p1 / dense)}x) | "
          + (f"{t['kd_before']:.3f} -> {t['kd_after']:.3f} | {t['seconds']:.0f} |" if t else "- | - |")
          + (f" {ab / 2**20:.1f} |" if ab else " - |"))
    a("")
    if tr:
        peak = max(t["peak_rss_mb"] for t in by_level.values()) if by_level else 0
        a(f"Training wall time {tr.get('wall_seconds', tr['total_seconds']):.0f} s in all: data "
          f"{tr['data_seconds']:.0f} s (story tokenization + the dense model's answers through llama.cpp), teacher "
          f"logits {tr['teacher_seconds']:.0f} s, then the levels above; peak RSS of the training process "
          f"{peak:.0f} MiB. Load average during the run: {rep['uptime_before'][0]:.1f} before, "
          f"{rep['uptime_after'][0]:.1f} after (2 cores shared with other jobs: times are upper bounds).")
        a("")
    a("Reading the table:")
    a("")
    a("* KD is the training objective (top-k + tail KL to the dense model, nats per position) on the first training "
      "rows; PPL is on held-out stories the adapters never saw, computed by llama.cpp with the adapter applied "
      "through the runtime's views.")
    a("* The held-out prose is CoQA like the training prose: part of the PPL gain can be domain fit (the same caveat "
      "as ../shared/research/quality-feasibility.md 5c). The multiple-choice tasks of `bench/bench_quality.py` "
      "(`taylor+lora`) are the out-of-domain check.")
    a("* A level whose non-anchor layers are all skipped (width 0) keeps only the anchors: its LoRA can only adapt "
      "the anchors, hence the huge but still far-from-dense figures at the lowest ratio.")
    dtypes = rep.get("adapter_type", "f32")
    layout = ("stored compact (A/B cut to what each level reads)" if rep.get("adapter_layout") == "compact"
              else "zero-padded to the full weight shapes")
    a(f"* Adapter files are {dtypes.upper()} and {layout}; a level's file holds no tensors for blocks it skips, "
      "hence the smaller files of the lowest levels.")
    a("")
    a("Memory of a serving process (`ElasticLlama`, n_ctx 512 unless stated, one 64-token prompt; fresh process "
      "each; RSS from /proc/self/status), same command:")
    a("")
    a("| process | RSS MiB | peak RSS MiB | vs dense input model |")
    a("|---|---|---|---|")
    for k, (x, y) in rep["rss_mb"].items():
        ctx = k.split("n_ctx ")[1] if "n_ctx " in k else None
        base = rep["rss_mb"].get(f"input model, dense, n_ctx {ctx}" if ctx else "input model, dense")
        a(f"| {k} | {x:.0f} | {y:.0f} | " + (f"{(x / base[0] - 1) * 100:+.0f} % |" if base else "- |"))
    a("")
    if "speed" in rep:
        su = rep.get("speed_setup", {})
        a(f"Speed with and without the level's adapter (`llama-bench -m OUT --elms-ratio R -p {su.get('pp')} -n "
          f"{su.get('tg')} -r {su.get('reps')} -t {su.get('threads')}` with `LLAMA_ELMS_LORA` unset vs `=off`, "
          f"{su.get('rounds')} interleaved rounds, median tokens/s; 1-minute load average during the rounds "
          f"{', '.join(f'{x:.1f}' for x in su.get('load_avg_1min', []))}). The 1.00 row is the full-width level, which "
          "has no adapter: its LoRA/off ratio shows the run-to-run noise.")
        a("")
        a("```sh")
        a(rep.get("speed_command", rep["command"]))
        a("```")
        a("")
        ratios_pp: list[float] = []
        ratios_tg: list[float] = []
        a("| ratio | prefill t/s LoRA | prefill t/s off | LoRA/off | decode t/s LoRA | decode t/s off | LoRA/off |")
        a("|---|---|---|---|---|---|---|")
        for i, r in levels:
            if i < 0:
                continue
            x, y = rep["speed"][f"{r:.2f}/lora"], rep["speed"][f"{r:.2f}/off"]
            pk = [k for k in x if k.startswith("pp")][0]
            tk = [k for k in x if k.startswith("tg")][0]
            a(f"| {r:.2f} | {x[pk]:.1f} | {y[pk]:.1f} | {x[pk] / y[pk]:.2f} | {x[tk]:.1f} | {y[tk]:.1f} | "
              f"{x[tk] / y[tk]:.2f} |")
            if r < 0.999:
                ratios_pp.append(x[pk] / y[pk])
                ratios_tg.append(x[tk] / y[tk])
        a("")
        if ratios_pp:
            g = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
            a(f"Geometric mean over the levels with an adapter: prefill LoRA/off {g(ratios_pp):.2f}, decode "
              f"{g(ratios_tg):.2f}.")
            a("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
