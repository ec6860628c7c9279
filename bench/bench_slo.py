"""End-to-end SLO benchmark: accuracy and SLO attainment of ELMS orchestration vs one-dimensional baselines.

Six "apps" as in the ELMS end-to-end traces (paper §5, item 51), each an instruction + 5 in-context examples (the
compressible part) in front of multiple-choice questions, with a fixed (TTFT, TPOT) SLO as fractions of the dense
model's latency on this device (resolved per request at its full prompt length, against the ``--model`` file's
profile for every mode unless ``--slo-reference own``):

    openbookqa (1.0, 1.0)   arc_easy (0.8, 0.9)   hellaswag* (0.6, 0.8)   boolq* (0.4, 0.7)
    piqa (0.2, 0.6)         sciq (0.2, 0.5)

(* stand-ins for the paper's Octopus API-calling and LlamaTouch apps, which are not available offline; the TLM
is trained on commonsense_qa / social_i_qa / arc_challenge / CoQA, disjoint from these.)

Modes, every request of every app:

* ``dense``       -- the dense model, whole prompt (the "no SLO" reference);
* ``ours``        -- ELMS: the TLM's decision head (:mod:`elms_gguf.decision`, when the TLM has one) guarded by the
  profile, else :func:`elms_gguf.orchestrate.decide` over (level, prompt ratio); TLM compression;
* ``ours_rule``   -- ELMS with the profile rule only (no decision head), to isolate what the head adds;
* ``model_only``  -- elastic model only: the largest level meeting the SLO with the whole prompt (best effort);
* ``prompt_only`` -- prompt compression only (TLM) on the dense model, the largest ratio meeting the SLO;
  (the baselines plan with the same calibrated margins as ``ours``: every policy tries to meet the SLO)
* ``ours_median`` -- ELMS planning on the profile's medians (``slo_quantile=None``: no calibration), to isolate
  what planning for the 0.95 quantile (:class:`elms_gguf.profile.LatencyCalibration`, the default) buys;
* ``ours_q99``    -- ELMS planning for the 0.99 quantile (the same observations as ``ours``);
* ``ours_h10``    -- ELMS planning on medians against 90 % of the SLO (``headroom=0.1``: a fixed margin);
* ``ours_selfinfo`` -- ELMS with the TLM-free scorer (the model's own self-information at its smallest level);
* ``layerdrop``   -- the trivial alternative: a layer-drop model (``elms-convert --allocation layerdrop``, whole
  layers removed in the converter's layer-skip order, levels 0.5..1.0) given by ``--layerdrop``, its largest level
  meeting the SLO with the whole prompt (its own latency profile, ``elms-profile``).

Per request: TTFT is measured from the request's start (planning, scoring, compression, prefill) to the first
token's logits, TPOT over a few greedy tokens; the answer is the choice with the highest mean token
log-probability after ``Answer:`` (cloze, as ELMS). A request *attains* its SLO when both measured TTFT and TPOT
are within it (DistServe-style). The trace figures weight the apps by ``exp(alpha * i)`` (paper: alpha in
{0, 0.25, -0.25}).

    python bench/bench_slo.py --model models/smollm2-135m-elastic-q4_0.gguf --tlm models/tlm-minilm-l1.gguf -n 30 --threads 2
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from elms_gguf import orchestrate as O  # noqa: E402
from elms_gguf import tasks as TK  # noqa: E402
from elms_gguf.profile import SLO  # noqa: E402
from bench_quality import mean_se  # noqa: E402

log = logging.getLogger("bench_slo")

APPS = [("openbookqa", (1.0, 1.0)), ("arc_easy", (0.8, 0.9)), ("hellaswag", (0.6, 0.8)), ("boolq", (0.4, 0.7)),
        ("piqa", (0.2, 0.6)), ("sciq", (0.2, 0.5))]
MODES = ("dense", "ours", "ours_rule", "ours_q99", "ours_median", "ours_h10", "model_only", "prompt_only",
         "ours_selfinfo", "layerdrop")


# --------------------------------------------------------------------------------------------------
# extra apps (hellaswag, boolq) on top of elms_gguf.tasks


def _extra_tasks() -> None:
    if "hellaswag" not in TK.TASKS:
        TK.TASKS["hellaswag"] = TK.Task("hellaswag", "hellaswag/none/validation",
                                        "You are a writing assistant. Continue each everyday scene with the most "
                                        "plausible next sentence.", "hellaswag")
        TK.TASKS["boolq"] = TK.Task("boolq", "boolq/none/validation",
                                    "Read each passage and answer the question about it with yes or no.", "boolq")
    orig = TK._convert

    def convert(kind: str, r: dict):
        if kind == "hellaswag":
            return TK.MCItem(r["ctx"].strip(), tuple(e.strip() for e in r["endings"]), int(r["label"]))
        if kind == "boolq":
            passage = " ".join(r["passage"].split()[:60])
            return TK.MCItem(f"{passage}\n{r['question'].strip()}?", ("no", "yes"), int(bool(r["answer"])))
        return orig(kind, r)

    TK._convert = convert  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------------
# one request


def choice_logprobs(llm, n_prompt: int, choices) -> list[float]:
    """Mean log-probability of every choice's tokens after the first ``n_prompt`` tokens in the KV cache (the last
    prompt token is re-decoded with each choice: llama-cpp-python keeps no prompt logits)."""
    from elms_gguf.runtime import llama_cpp

    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    n_vocab = llm.n_vocab()
    last_tok = int(llm.input_ids[n_prompt - 1])
    out = []
    for ch in choices:
        toks = llm.tokenize((" " + ch).encode(), add_bos=False, special=False)[: max(1, llm.n_batch - 2)]
        seq = [last_tok] + toks
        llama_cpp.llama_memory_seq_rm(mem, 0, n_prompt - 1, -1)
        llm._batch.set_batch(seq, n_past=n_prompt - 1, logits_all=True)
        llm._ctx.decode(llm._batch)
        rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx),
                                     shape=(len(seq), n_vocab))[:-1].astype(np.float64)
        m = rows.max(1)
        lse = np.log(np.exp(rows - m[:, None]).sum(1)) + m
        out.append(float(np.mean(rows[np.arange(len(toks)), toks] - lse)))
    llm._clear_cache()
    return out


class BanEOS:
    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, ids, scores):
        scores[self.eos] = -np.inf
        return scores


def baseline_decision(llm, mode: str, slo: SLO, n_fixed: int, n_c: int, ctx: str, n_decode: int) -> O.Decision | None:
    prof = llm.profile
    levels = [li.index for li in llm.levels if li.index in prof.levels]
    if mode == "dense":
        return _with_slo(O.decide(prof, SLO(), n_fixed=n_fixed, n_compressible=n_c, levels=[-1], n_decode=n_decode),
                         slo, prof, n_fixed + n_c, n_decode)
    if mode in ("model_only", "layerdrop"):
        return O.decide(prof, slo, n_fixed=n_fixed, n_compressible=n_c, levels=levels, best_effort=True,
                        n_decode=n_decode, margin=llm._margin())
    if mode == "prompt_only":
        return O.decide(prof, slo, n_fixed=n_fixed, n_compressible=n_c, levels=[-1], best_effort=True,
                        scorer_ms=llm._scorer_ms([ctx]), min_prompt_ratio=llm.min_prompt_ratio, n_decode=n_decode,
                        margin=llm._margin())
    return None  # ours: the serving path decides


def _with_slo(d: O.Decision, slo: SLO, prof, n_full: int, n_decode: int) -> O.Decision:
    d.slo_ttft_ms, d.slo_tpot_ms = slo.resolve(prof, n_full, n_decode)
    d.feasible = d.predicted_ttft_ms <= d.slo_ttft_ms and d.predicted_tpot_ms <= d.slo_tpot_ms
    return d


def request_tokens(llm, app: TK.AppPrompts, item: TK.MCItem) -> tuple[int, int]:
    """(whole prompt with BOS, compressible context) token counts of this request, as ``run_request`` sends it."""
    return (llm.count_tokens(app.context + "\n\n" + app.question(item), add_bos=True),
            llm.count_tokens(app.context))


def shared_slo(prof, slo: SLO, n_full: int, n_decode: int) -> SLO:
    """``slo`` in milliseconds for a request of ``n_full`` prompt tokens and ``n_decode`` intervals, against the
    dense latency of one profile (``--slo-reference shared``: the elastic model's), so every mode is held to the same
    targets, as an app's SLO is. Resolved against each model's own profile instead, a dense run measured high in one
    of the two profiles loosens that model's targets alone."""
    t, p = slo.resolve(prof, n_full, n_decode)
    return SLO(ttft_ms=None if math.isinf(t) else t, tpot_ms=None if math.isinf(p) else p)


def reachable(llm, context: str, slo: SLO, n_full: int, n_c: int, n_decode: int) -> bool:
    """Whether this request's SLO is within reach of the elastic model on this device at all: its profile's
    *medians* (no calibration margin) predict some level, with the context compressed down to the planner's
    ``min_prompt_ratio`` if need be, meeting both targets. Mode-independent, so every mode is split alike."""
    levels = [li.index for li in llm.levels if li.index in llm.profile.levels]
    d = O.decide(llm.profile, slo, n_fixed=n_full - n_c, n_compressible=n_c, levels=levels, best_effort=True,
                 scorer_ms=llm._scorer_ms([context]), min_prompt_ratio=llm.min_prompt_ratio,
                 n_decode=n_decode)
    return bool(d.feasible)


def run_request(llm, mode: str, app: TK.AppPrompts, item: TK.MCItem, slo: SLO, n_decode: int) -> dict:
    q = app.question(item)
    ctx = app.context
    n_full, n_c = request_tokens(llm, app, item)
    d = baseline_decision(llm, mode, slo, n_full - n_c, n_c, ctx, n_decode)
    from elms_gguf.runtime import llama_cpp

    lp = llama_cpp.LogitsProcessorList([BanEOS(llm.token_eos())])
    out = llm.create_completion(prompt=q, context=ctx, slo=slo, decision=d, best_effort=True,
                                max_tokens=n_decode + 1, temperature=0.0, logits_processor=lp)
    e = out["elms"]
    lps = choice_logprobs(llm, int(out["usage"]["prompt_tokens"]), item.choices)
    e = dict(e)
    e["correct"] = bool(int(np.argmax(lps)) == item.answer)
    e["met"] = bool(e["ttft_met"] and (e["tpot_met"] is not False))
    return e


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the elastic GGUF (required unless --report)")
    ap.add_argument("--tlm", help="the TLM GGUF that compresses prompts (required unless --report)")
    ap.add_argument("--profile", default="auto", help="latency profile JSON (default: the saved one)")
    ap.add_argument("-n", type=int, default=10, help="questions per app")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="dense,ours,model_only,prompt_only,ours_selfinfo",
                    help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--apps", default=",".join(a for a, _ in APPS))
    ap.add_argument("--decode", type=int, default=4, help="generated tokens per request (TPOT)")
    ap.add_argument("--alpha", default="0,0.25,-0.25")
    ap.add_argument("--layerdrop", help="layer-drop elastic GGUF for the 'layerdrop' mode (needs its saved profile)")
    ap.add_argument("--slo-reference", choices=("shared", "own"), default="shared",
                    help="what the apps' relative SLOs are fractions of: 'shared' (default) the dense latency in the "
                         "--model file's profile, the same milliseconds for every mode; 'own' each model's own "
                         "profile (runs before 2026-11-23)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "bench_slo.json"))
    ap.add_argument("--report", metavar="JSON", help="print the tables and paired comparisons of a saved run "
                                                     "(its --out file) and exit; runs nothing")
    ap.add_argument("--versus", default="ours", help="the mode the paired comparisons are made against "
                                                     "(default: %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        modes = list(saved["results"])
        apps = [(a, s) for a, s in APPS if any(a in saved["results"][m] for m in modes)]
        alphas = [float(a) for a in str(saved.get("args", {}).get("alpha", args.alpha)).split(",")]
        print(format_summary(summarize(saved["results"], apps, alphas), modes, apps))
        print(format_pairs(saved["results"], args.versus))
        return 0
    if not args.model or not args.tlm:
        ap.error("--model and --tlm are required (unless --report)")
    _extra_tasks()
    from elms_gguf.serve import ElasticLlama

    modes = [m for m in args.modes.split(",") if m]
    apps = [(a, s) for a, s in APPS if a in args.apps.split(",")]
    kw = dict(n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048, n_batch=512, verbose=False,
              best_effort=True)
    llms = {"tlm": ElasticLlama(args.model, tlm=args.tlm, profile=args.profile, **kw)}
    if "ours_selfinfo" in modes:
        llms["selfinfo"] = ElasticLlama(args.model, scorer="selfinfo", profile=llms["tlm"].profile, **kw)
    if "layerdrop" in modes:
        if not args.layerdrop:
            raise SystemExit("mode layerdrop needs --layerdrop PATH (elms-convert --allocation layerdrop)")
        llms["layerdrop"] = ElasticLlama(args.layerdrop, scorer=None, profile="auto", **kw)  # its own profile
        if llms["layerdrop"].profile is None:
            raise SystemExit(f"no latency profile for {args.layerdrop}: run elms-profile {args.layerdrop} "
                             f"-t {args.threads}")
    if llms["tlm"].profile is None:
        raise SystemExit(f"no latency profile for {args.model}: run elms-profile {args.model} -t {args.threads} "
                         f"--tlm {args.tlm} --selfinfo")
    for llm in llms.values():
        llm.warmup()
    results: dict[str, dict[str, list[dict]]] = {m: {} for m in modes}
    served = {k: 0 for k in llms}
    t_start = time.time()
    for app_name, (tt, tp) in apps:
        app = TK.app_prompts(app_name, n_items=args.n, seed=1)
        rel = SLO.relative(tt, tp)
        for item in app.items:
            n_full, n_c = request_tokens(llms["tlm"], app, item)
            slo = shared_slo(llms["tlm"].profile, rel, n_full, args.decode) if args.slo_reference == "shared" else rel
            reach = reachable(llms["tlm"], app.context, slo, n_full, n_c, args.decode)
            for mode in modes:  # interleaved: every mode sees the same background load
                key = "selfinfo" if mode == "ours_selfinfo" else "layerdrop" if mode == "layerdrop" else "tlm"
                llm = llms[key]
                llm.headroom = 0.1 if mode == "ours_h10" else 0.0
                head, cal = llm.decision_head, llm.calibration
                if mode == "ours_rule":
                    llm.decision_head = None
                if mode in ("ours_median", "ours_h10"):
                    llm.calibration = None  # plan on medians
                q = cal.quantile if cal is not None else None
                if mode == "ours_q99" and cal is not None:
                    cal.quantile = 0.99
                try:
                    r = run_request(llm, "ours" if mode.startswith("ours") else mode, app, item, slo, args.decode)
                finally:
                    llm.decision_head, llm.calibration = head, cal
                    if cal is not None:
                        cal.quantile = q
                r["reachable"], r["seq"] = reach, served[key]  # seq: requests this process served before
                served[key] += 1
                if mode in ("ours_median", "ours_h10") and cal is not None:
                    cal.observe(**{k: r[k] for k in ("predicted_ttft_ms", "measured_ttft_ms", "predicted_tpot_ms",
                                                     "measured_tpot_ms")})
                results[mode].setdefault(app_name, []).append(r)
        log.info("%s %s done (%.0f s): %s", app_name, (tt, tp), time.time() - t_start, "  ".join(
            f"{m} acc {np.mean([r['correct'] for r in results[m][app_name]]):.2f} "
            f"att {np.mean([r['met'] for r in results[m][app_name]]):.2f}" for m in modes))
    summary = summarize(results, apps, [float(a) for a in args.alpha.split(",")])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:  # saved first: the run is never lost to a report that cannot be printed
        json.dump({"summary": summary, "results": results, "args": vars(args),
                   "profile": llms["tlm"].profile.model, "device": llms["tlm"].profile.device}, f, indent=1,
                  default=float)
    print(format_summary(summary, modes, apps))
    print(format_pairs(results, args.versus))
    print(f"wrote {args.out}")
    return 0


def summarize(results, apps, alphas):
    out: dict = {}
    for mode, per_app in results.items():
        rows = {}
        for a, (tt, tp) in apps:
            rs = per_app.get(a, [])
            if not rs:
                continue
            rows[a] = {"slo": [tt, tp], "n": len(rs), "accuracy": float(np.mean([r["correct"] for r in rs])),
                       "attainment": float(np.mean([r["met"] for r in rs])),
                       "on_time_accuracy": float(np.mean([r["correct"] and r["met"] for r in rs])),
                       "ttft_attainment": float(np.mean([bool(r["ttft_met"]) for r in rs])),
                       "mean_level_ratio": float(np.mean([r["level_ratio"] for r in rs])),
                       "mean_prompt_ratio": float(np.mean([r["prompt_ratio"] for r in rs])),
                       "ttft_over_slo": float(np.median([r["measured_ttft_ms"] / r["slo_ttft_ms"] for r in rs])),
                       "ttft_pred_err": float(np.median([r["measured_ttft_ms"] / r["predicted_ttft_ms"] for r in rs])),
                       "ttft_pred_err_p95": float(np.quantile([r["measured_ttft_ms"] / r["predicted_ttft_ms"] for r in rs], 0.95)),
                       "tpot_pred_err_p95": float(np.quantile([r["measured_tpot_ms"] / r["predicted_tpot_ms"] for r in rs
                                                               if r["measured_tpot_ms"]] or [float("nan")], 0.95)),
                       "margins": [float(np.mean([r.get("margins", [1, 1])[i] for r in rs])) for i in (0, 1)],
                       "tlm_ms": float(np.mean([r["tlm_ms"] for r in rs]))}
        trace = {}
        for al in alphas:
            w = np.array([math.exp(al * (i + 1)) for i, (a, _) in enumerate(apps) if a in rows])
            w = w / w.sum()
            names = [a for a, _ in apps if a in rows]
            trace[f"alpha={al:g}"] = {k: float(sum(wi * rows[a][k] for wi, a in zip(w, names)))
                                      for k in ("accuracy", "attainment", "on_time_accuracy")}
        out[mode] = {"apps": rows, "trace": trace, "pooled": pooled(per_app, [a for a, _ in apps])}
    return out


FIRST = 3  # "first requests" of a serving process: the first FIRST it served (whatever the mode)


def pooled(per_app, apps) -> dict[str, float]:
    """Unweighted figures over every request of a mode: attainment, attainment on the requests whose SLO the
    elastic model's profile can meet at all (``reachable``), and attainment / measured-over-predicted TTFT of the
    process's first FIRST requests vs the later ones, and the scorer's measured / predicted time on the requests
    that scored a new context (runs saved before these fields existed give NaN)."""
    rs = [r for a in apps for r in per_app.get(a, [])]
    nan = float("nan")

    def att(sel):
        return float(np.mean([r["met"] for r in sel])) if sel else nan

    def err(sel):
        return float(np.median([r["measured_ttft_ms"] / r["predicted_ttft_ms"] for r in sel])) if sel else nan

    scored = [r["tlm_ms"] / r["predicted_scorer_ms"] for r in rs
              if not r.get("score_cache_hit", True) and r.get("tlm_ms") and r.get("predicted_scorer_ms")]
    reach = [r for r in rs if r.get("reachable")]
    first = [r for r in rs if r.get("seq", FIRST) < FIRST]
    later = [r for r in rs if r.get("seq", -1) >= FIRST]
    return {"n": len(rs), "attainment": att(rs), "n_reachable": len(reach) if rs and "reachable" in rs[0] else nan,
            "attainment_reachable": att(reach), "n_first": len(first), "attainment_first": att(first),
            "attainment_later": att(later), "ttft_err_first": err(first), "ttft_err_later": err(later),
            "n_scored": len(scored), "scorer_err": float(np.median(scored)) if scored else nan}


def format_summary(summary, modes, apps) -> str:
    lines = ["app (TTFT, TPOT SLO)        " + "".join(f"{m:>22}" for m in modes),
             "                            " + "".join(f"{'acc  att  lvl  rho':>22}" for _ in modes)]
    for a, (tt, tp) in apps:
        row = f"{a:<14} ({tt:.1f}, {tp:.1f})  "
        for m in modes:
            r = summary[m]["apps"].get(a)
            row += f"{'-':>22}" if r is None else \
                f"{r['accuracy']:>9.2f} {r['attainment']:4.2f} {r['mean_level_ratio']:4.2f} {r['mean_prompt_ratio']:4.2f}"
        lines.append(row)
    for al in next(iter(summary.values()))["trace"]:
        lines.append(f"trace {al:<20} " + "".join(
            f"{summary[m]['trace'][al]['accuracy']:>9.2f} {summary[m]['trace'][al]['attainment']:4.2f}          "
            for m in modes))
    for al in next(iter(summary.values()))["trace"]:
        lines.append(f"on time {al:<18} " + "".join(
            f"{summary[m]['trace'][al].get('on_time_accuracy', float('nan')):>9.2f}               " for m in modes))
    if all("pooled" in summary[m] for m in modes):
        lines.append("all requests, unweighted   " + "".join(
            f"{'att %.2f of %d' % (summary[m]['pooled']['attainment'], summary[m]['pooled']['n']):>22}" for m in modes))
        lines.append("  SLO reachable (profile)  " + "".join(
            f"{'att %.2f of %s' % (summary[m]['pooled']['attainment_reachable'], summary[m]['pooled']['n_reachable']):>22}"
            for m in modes))
        lines.append(f"  first {FIRST} of the process  " + "".join(
            f"{'att %.2f ttft x%.2f' % (summary[m]['pooled']['attainment_first'], summary[m]['pooled']['ttft_err_first']):>22}"
            for m in modes))
        lines.append("  later requests           " + "".join(
            f"{'att %.2f ttft x%.2f' % (summary[m]['pooled']['attainment_later'], summary[m]['pooled']['ttft_err_later']):>22}"
            for m in modes))
        lines.append("  scorer on new contexts   " + "".join(
            f"{'x%.2f of profile (%d)' % (summary[m]['pooled']['scorer_err'], summary[m]['pooled']['n_scored']):>22}"
            for m in modes))
    return "\n".join(lines)


def paired(results, a: str, b: str, apps) -> dict[str, float]:
    """Mode ``a`` minus mode ``b`` over the same questions of ``apps`` (every mode answers the same items in the
    same order): accuracy and on-time accuracy (correct *and* within the SLO), each with its paired standard error."""
    out: dict[str, float] = {"n": 0}
    for key in ("accuracy", "on_time_accuracy"):
        def val(r):
            return float(r["correct"] and (r["met"] if key == "on_time_accuracy" else True))
        xa = np.array([val(r) for ap in apps for r in results[a][ap]])
        xb = np.array([val(r) for ap in apps for r in results[b][ap]])
        if len(xa) != len(xb) or len(xa) < 2:
            raise ValueError(f"modes {a} and {b} did not answer the same questions")
        diff, se = mean_se((xa - xb).tolist())
        out.update({"n": len(xa), f"{key}_a": float(xa.mean()), f"{key}_b": float(xb.mean()),
                    f"{key}_diff": diff, f"{key}_se": se})
    return out


def format_pairs(results, versus: str) -> str:
    """Paired differences of ``versus`` against every other mode, over all apps (unweighted) and per app."""
    if versus not in results:
        return f"(no paired comparisons: mode {versus} was not run)"
    lines = [f"paired, {versus} minus each mode (same questions; ± one standard error): accuracy | on-time accuracy"]
    for m in results:
        if m == versus:
            continue
        common = [ap for ap in results[versus] if ap in results[m]]
        for name, aps in [("all apps", common)] + [(ap, [ap]) for ap in common]:
            if min(sum(len(results[k][ap]) for ap in aps) for k in (versus, m)) < 2:
                lines.append(f"  {versus} - {m:<12} {name:<11} fewer than 2 questions: no standard error")
                continue
            p = paired(results, versus, m, aps)
            lines.append(f"  {versus} - {m:<12} {name:<11} n={p['n']:<4} {p['accuracy_diff']:+.3f} ± {p['accuracy_se']:.3f}"
                         f" | {p['on_time_accuracy_a']:.3f} vs {p['on_time_accuracy_b']:.3f}: "
                         f"{p['on_time_accuracy_diff']:+.3f} ± {p['on_time_accuracy_se']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
