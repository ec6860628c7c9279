"""The question-set loss (``elms-convert --select tasks``'s criterion) of every level of elastic GGUFs, side by side.

Each set's loss relative to the file's own dense level (1.0 = dense, 2.0 = chance for a multiple-choice set;
:class:`elms_gguf.measure.TaskProbe`; the sets the first file's dense model answers at chance are listed and not
used for any file), on the
weights as written (dequantized), with the converter's sets and seeds. Use it to see what a conversion selected on
the calibration loss would have scored on the question sets, e.g.

    python bench/bench_select.py bench/out/qfull/taylor.gguf bench/out/qfull/tasks.gguf bench/out/qfull/layerdrop.gguf

``--time`` instead times one probe (the selection loss of one level of the first file, as the converter's search
measures a candidate) with the choices that share a context packed into one row and with one row per choice,
alternating, and prints the medians:

    python bench/bench_select.py --time bench/out/qfull/layerdrop.gguf --level 0.7 --repeat 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from elms_gguf import contract, measure  # noqa: E402
from elms_gguf import convert as CV  # noqa: E402
from elms_gguf import evaluate as E  # noqa: E402
from elms_gguf import model as M  # noqa: E402


def dense_table(path: str, questions: int) -> int:
    cfg, w, src = CV.load_model(path)
    encode, _ = CV.make_encoder(src, None)
    if encode is None:
        raise SystemExit(f"{path}: no BPE tokenizer the converter can run")
    start = src.fields.get("tokenizer.ggml.bos_token_id", src.fields.get("tokenizer.ggml.eos_token_id", 0))
    runner = measure.Runner(cfg, w, fast=True)
    print("| set | questions | dense accuracy | chance | z |\n|---|---|---|---|---|")
    for name in E.SELECT_TASKS:
        probe = measure.ChoiceProbe(runner, E.choice_items(encode, start=int(start), tasks=(name,), per_task=questions))
        print(f"| {name} | {len(probe.items)} | {100 * probe.score(None)[1]:.1f} | {100 * probe.chance:.1f} "
              f"| {probe.z_above_chance(None):.2f} |", flush=True)
    return 0


def load_elastic(path: str, questions: int) -> tuple[M.ModelConfig, M.Weights, contract.ElasticSpec, dict]:
    """An elastic GGUF's config, weights and level table, and the converter's question sets in its tokenizer."""
    cfg, w, src = CV.load_model(path)
    spec = contract.read_spec(src.fields, source=path) if src is not None else None
    if spec is None:
        raise SystemExit(f"{path}: no elms.* level table (not an elastic GGUF)")
    encode, _ = CV.make_encoder(src, None)
    if encode is None:
        raise SystemExit(f"{path}: no BPE tokenizer the converter can run")
    start = src.fields.get("tokenizer.ggml.bos_token_id", src.fields.get("tokenizer.ggml.eos_token_id", 0))
    return cfg, w, spec, E.selection_sets(encode, start=int(start), per_task=questions)  # type: ignore[arg-type]


def time_probe(path: str, questions: int, repeat: int, ratio: float) -> int:
    """Seconds per selection-loss probe, packed vs one row per choice, at the file's level nearest ``ratio``."""
    cfg, w, spec, sets = load_elastic(path, questions)
    fast = CV.cpu_has_fast_bf16()
    probes = {pack: measure.TaskProbe(measure.Runner(cfg, w, fast=fast), sets, pack=pack) for pack in (True, False)}
    tokens = {pack: sum(p.n_tokens for p in tp.probes.values()) for pack, tp in probes.items()}
    print(f"{path}: sets {', '.join(probes[True].probes)}; {tokens[True]} tokens packed, {tokens[False]} one row "
          f"per choice; {'bfloat16 autocast' if fast else 'float32'}, {torch.get_num_threads()} threads")
    print("| level | packed s | one row per choice s | speed-up | loss packed | loss per choice |\n|---|---|---|---|---|---|")
    lv = spec.levels[spec.nearest_level(ratio)]
    widths = M.level_widths(lv)
    secs: dict[bool, list[float]] = {True: [], False: []}
    loss: dict[bool, float] = {}
    for _ in range(repeat):
        for pack, tp in probes.items():  # logliks is what a probe runs (not memoised; the dense stream is cached)
            t0 = time.perf_counter()
            for p in tp.probes.values():
                p.logliks(widths)
            secs[pack].append(time.perf_counter() - t0)
            if pack not in loss:
                loss[pack] = tp.loss(widths)
    a, b = statistics.median(secs[True]), statistics.median(secs[False])
    print(f"| {lv.ratio:g} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {loss[True]:.5f} | {loss[False]:.5f} |", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="elastic GGUFs (with a BPE tokenizer, e.g. SmolLM2 conversions)")
    p.add_argument("--questions", type=int, default=CV.ConvertConfig.select_questions, help="per set (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense", action="store_true",
                   help="only print the first model's dense accuracy on every set vs chance (what gates the sets); "
                        "any GGUF the converter reads, elastic or not")
    p.add_argument("--time", action="store_true",
                   help="time one probe at --level of the first model, packed vs one row per choice (medians)")
    p.add_argument("--level", type=float, default=0.7, help="--time: the level ratio to probe (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="--time: runs of each variant per level (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.time:
        return time_probe(args.models[0], args.questions, args.repeat, args.level)
    if args.dense:
        return dense_table(args.models[0], args.questions)
    header = False
    used: list[str] = []
    for path in args.models:
        cfg, w, spec, sets = load_elastic(path, args.questions)
        if header:  # the sets the first file's dense model answers above chance, for every file alike
            sets = {k: v for k, v in sets.items() if k in used}
        probe = measure.TaskProbe(measure.Runner(cfg, w, fast=True), sets, min_z=float("-inf") if header else 2.0)
        used = list(probe.probes)
        if not header:
            for name, why in probe.dropped.items():
                print(f"- {name} not used: {why}")
            print("\n| model | level | achieved | loss (x dense) | " + " | ".join(probe.probes) + " |")
            print("|---" * (4 + len(probe.probes)) + "|", flush=True)
            header = True
        for lv in spec.levels:
            if lv.ratio >= 1.0:
                continue
            d = probe.detail(M.level_widths(lv))
            print(f"| {Path(path).name} | {lv.ratio:g} | {contract.level_ratio(cfg.dims(), lv, qkv_bias=cfg.qkv_bias):.3f} "
                  f"| {sum(d.values()) / len(d):.3f} | " + " | ".join(f"{v:.3f}" for v in d.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
