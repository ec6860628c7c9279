#!/usr/bin/env python3
"""Re-export the level adapters of an elastic GGUF with another storage type or layout (e.g. the F32, full-shape
adapters of an older elms-train-lora run as compact F16), next to a copy of the model whose level table names them.

    python tools/reexport_adapters.py bench/out/lora/smollm2-elastic-lora.gguf bench/out/lora16/smollm2-elastic-lora.gguf

Every adapter is read back with the runtime's checks (``lora.read_adapter``: CRC-32, model id, level, shapes) and
written with ``lora.write_adapter``; the model's tensors are copied byte for byte (``lora.rewrite_spec``). The
input files are not modified. The values change only by the rounding to the new type.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elms_gguf import contract  # noqa: E402
from elms_gguf import lora as L  # noqa: E402
from elms_gguf import model as M  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="elastic GGUF whose level table names adapters")
    ap.add_argument("out", help="output model path; the adapters are written next to it")
    ap.add_argument("--adapter-type", choices=tuple(L.ADAPTER_TYPES), default=L.DEFAULT_ADAPTER_TYPE)
    ap.add_argument("--padded", action="store_true",
                    help="store A/B zero-padded to the full weight shapes (default: compact, cut to each level's widths)")
    args = ap.parse_args(argv)
    if M._same_file(args.model, args.out) if os.path.exists(args.out) else False:
        ap.error("the output must not be the input model")
    cfg, _, source = M.load_gguf(args.model)
    spec = contract.read_spec(source.fields, source=args.model)
    if spec is None:
        ap.error(f"{args.model} is not an elastic GGUF")
    adapters = L.check_level_adapters(args.model, config=cfg)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.out))[0]
    written = {}
    for i, ad in adapters.items():
        if ad is not None:
            written[i] = os.path.join(out_dir, f"{stem}.level{i}.lora.gguf")
            L.write_adapter(written[i], cfg, ad, dtype=args.adapter_type,
                            level=None if args.padded else spec.levels[i])
    L.attach_adapters(spec, written, model_dir=out_dir)
    L.rewrite_spec(args.model, args.out, spec)
    train_json = os.path.splitext(args.model)[0] + ".train.json"  # elms-train-lora's record (bench_lora --trained)
    if os.path.exists(train_json):
        shutil.copyfile(train_json, os.path.splitext(args.out)[0] + ".train.json")
    for i, p in written.items():
        print(f"level {i}: {p} ({os.path.getsize(p) / 2**20:.1f} MiB)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
