"""`make demo`: run three levels of an elastic GGUF with the patched llama-completion, side by side.

    python tools/demo.py models/smollm2-135m-elastic-q4_0.gguf [--prompt ...] [--ratios 0.5,0.8,1.0]

Each level runs in the standard tool (``llama-completion --elms-ratio R``, greedy, chat template) and the
demo prints its answer with the prompt and generation speed llama.cpp itself reports.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("ELMS_LLAMA_LIB_DIR", ROOT / "build" / "llama" / "bin"))


def run_level(model: Path, ratio: float, prompt: str, n: int, threads: int) -> tuple[str, float, float, str]:
    # one-shot chat: -cnv applies the model's chat template, -st stops after the first answer
    cmd = [str(BIN / "llama-completion"), "-m", str(model), "--elms-ratio", str(ratio), "-p", prompt, "-n", str(n),
           "--temp", "0", "--seed", "1", "-t", str(threads), "-c", "1024", "-cnv", "-st",
           "-sys", "You are a helpful assistant."]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"llama-completion failed at ratio {ratio}:\n{r.stderr[-2000:]}")
    pp = re.search(r"prompt eval time =.*?([\d.]+) tokens per second", r.stderr)
    tg = re.search(r"\beval time =.*?([\d.]+) tokens per second", r.stderr.split("prompt eval time")[-1])
    lvl = re.search(r"elastic level (-?\d+) of \d+ \(ratio ([\d.]+)\)", r.stderr)
    text = r.stdout.strip()
    # the transcript echoes the ChatML turns: keep what follows the last assistant header
    text = re.split(r"(?:^|\n)\s*assistant\s*\n", text)[-1]
    return text.replace("[end of text]", "").strip(), float(pp.group(1)) if pp else float("nan"), \
        float(tg.group(1)) if tg else float("nan"), f"level {lvl.group(1)} (ratio {lvl.group(2)})" if lvl else "dense"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    ap.add_argument("--ratios", default="0.6,0.8,1.0")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-slo", action="store_true", help="skip the SLO part (ElasticLlama under three SLOs)")
    ap.add_argument("--tlm", default=None, help="TLM GGUF for prompt compression (default: tlm-minilm-l1.gguf, else "
                                               "tlm-minilm-l2.gguf, next to the model if present, else the target's "
                                               "own self-information)")
    args = ap.parse_args(argv)
    print(f"model: {args.model}\nprompt: {args.prompt}\n")
    for ratio in (float(r) for r in args.ratios.split(",")):
        text, pp, tg, lvl = run_level(args.model, ratio, args.prompt, args.n, args.threads)
        print(f"--- --elms-ratio {ratio:.1f} -> {lvl}: prefill {pp:.0f} tok/s, decode {tg:.0f} tok/s")
        print(textwrap.indent(textwrap.fill(text, 100), "    "), "\n")
    if not args.no_slo:
        sys.path.insert(0, str(ROOT))
        from elms_gguf.serve import demo_slo

        print("--- ElasticLlama: one app request (ARC-Easy question after an instruction and 5 examples) under three "
              "SLOs (fractions of the dense TTFT/TPOT measured on this device)")
        demo_slo(str(args.model), tlm=args.tlm, n_threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
