"""Standalone GGUFs cut out of an elastic GGUF: one level physically truncated, or the dense model without ``elms.*``.

Why: these are the baselines the elastic runtime is measured against. :func:`export_static` writes the GGUF a
stock llama.cpp would load to run one level ("reload to switch"), and because it copies the *quantized bytes*
of the same prefix rows / whole-block prefix columns that the runtime's views read, it computes the same thing
(bit-identical where the architecture is kept). :func:`strip_elastic` writes the "plain copy": byte-identical
tensors, no elastic keys.

Which architecture the export needs (stock llama.cpp sizes every layer like layer 0 for ``llama`` and
``qwen2``, see ``src/models/llama.cpp`` / ``qwen2.cpp``):

* same widths in every layer, none 0 -> the source arch with smaller head/FFN counts. Exception: ``qwen2``
  creates ``attn_q``/``attn_output`` as n_embd x n_embd, so fewer heads cannot be loaded as ``qwen2``;
* otherwise (per-layer widths, e.g. full-width anchors, or width 0) -> ``deci``, whose loader and graph read
  ``n_head(il)``, ``n_head_kv(il)``, ``n_ff(il)`` per layer and skip attention where ``n_head(il) == 0``
  (``src/models/deci.cpp``). Two deci limits are refused: layer 0 must keep attention (head_dim and n_rot are
  derived only when ``n_head(0) > 0``), and a layer with an FFN width of 0 must also have no attention
  (deci ``continue``s before adding that layer's output to the residual stream, so its attention would be lost);
* a ``qwen2`` source that cannot stay ``qwen2`` becomes ``llama`` / ``deci``: both load q/k/v biases; qwen2's
  NEOX rope is turned into their NORM rope by permuting the rows inside each q/k head (llama.cpp's
  ``LlamaModel.permute``). Rows stay whole, so quantized bytes are still copied, but attention sums in a
  different order: equal up to float rounding, not bit-identical. ``allow_arch_change=False`` refuses instead.
"""
from __future__ import annotations

import argparse
import logging
import numbers
import os
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from . import contract
from .contract import ContractError, ElasticSpec, Level, ModelDims
from .model import atomic_output, level_widths, open_gguf, permute_rope_rows, source_kv

logger = logging.getLogger(__name__)

VT = GGUFValueType
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ATTN = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
_FFN = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class ExportPlan:
    """How one level is written: output arch, per-layer (kv, ff), and whether q/k rows are NEOX->NORM permuted."""

    arch: str
    out_arch: str
    widths: list[tuple[int, int]]
    permute_rope: bool

    @property
    def per_layer(self) -> bool:
        return self.out_arch == "deci"


def resolve_level(spec: ElasticSpec | None, level: Level | int | float, *, source: str = "model") -> tuple[int | None, Level]:
    """(index or None, Level) for a Level, a level index, or a ratio (-> the nearest level of ``spec``)."""
    if isinstance(level, Level):
        return None, level
    if spec is None:
        raise ContractError(f"{source}: has no elastic levels ({contract.KEY_RATIOS} missing); pass a Level to export")
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise ContractError(f"level must be a Level, a level index or a ratio, got {level!r}")
    if isinstance(level, numbers.Integral):
        if not 0 <= int(level) < len(spec.levels):
            raise ContractError(f"{source}: level {level} outside [0, {len(spec.levels)})")
        return int(level), spec.levels[int(level)]
    i = spec.nearest_level(float(level))
    return i, spec.levels[i]


def plan_export(arch: str, dims: ModelDims, level: Level, *, tensor_names: Sequence[str] = (),
                allow_arch_change: bool = True, source: str = "model") -> ExportPlan:
    """Pick the architecture that stock llama.cpp can load this level as (module docstring), or refuse."""
    widths = level_widths(level)
    uniform = len(set(widths)) == 1 and widths[0][0] > 0 and widths[0][1] > 0
    if arch == "llama":
        plan = ExportPlan(arch, "llama" if uniform else "deci", widths, permute_rope=False)
    elif arch == "qwen2":
        if uniform and widths[0][0] == dims.n_head_kv:
            plan = ExportPlan(arch, "qwen2", widths, permute_rope=False)
        else:
            plan = ExportPlan(arch, "llama" if uniform else "deci", widths, permute_rope=True)
            if "output.bias" in tensor_names:
                raise ContractError(f"{source}: qwen2 output.bias cannot be carried into {plan.out_arch}")
    else:
        raise ContractError(f"{source}: architecture {arch!r} is not supported (supported: {', '.join(contract.SUPPORTED_ARCHS)})")
    if plan.out_arch != arch and not allow_arch_change:
        why = ("per-layer or zero widths need llama.cpp's 'deci' arch" if plan.per_layer else
               "qwen2 in llama.cpp cannot load fewer attention heads than n_embd / head_dim")
        raise ContractError(f"{source}: this level cannot be exported as {arch}: {why} (allow_arch_change=False)")
    if plan.per_layer:
        if widths[0][0] == 0:
            raise ContractError(f"{source}: layer 0 has no attention at this level; llama.cpp's deci derives "
                                "head_dim from layer 0 and cannot load it")
        for il, (kv, ff) in enumerate(widths):
            if ff == 0 and kv > 0:
                raise ContractError(f"{source}: layer {il} keeps attention ({kv} KV heads) but drops its FFN; llama.cpp's "
                                    "deci graph would discard that layer's attention output")
        if widths[-1][1] == 0:
            raise ContractError(f"{source}: the last layer has no FFN; llama.cpp's deci graph cannot output from it")
    if plan.permute_rope:
        logger.info("%s: exporting qwen2 as %s with NEOX->NORM q/k row permutation "
                    "(equal up to float rounding, not bit-identical)", source, plan.out_arch)
    return plan


def _slice_tensor(t: gguf.ReaderTensor, rows: int | None, cols: int | None) -> np.ndarray:
    """Prefix rows / prefix columns of a reader tensor's raw data (columns by whole quantization blocks)."""
    a = t.data
    if rows is not None:
        a = a[:rows]
    if cols is not None:
        bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if cols % bs:
            raise ContractError(f"{t.name}: {cols} columns is not a multiple of its {t.tensor_type.name} block size {bs}")
        a = a[:, : cols // bs * ts] if a.dtype == np.uint8 and bs > 1 else a[:, :cols]
    return a


def _cut(t: gguf.ReaderTensor, plan: ExportPlan, dims: ModelDims) -> np.ndarray | None:
    """The data a level keeps of one tensor (None = tensor dropped: its block is skipped in every token)."""
    m = _BLK.fullmatch(t.name)
    if m is None:
        return t.data
    il, kind, what = int(m.group(1)), m.group(2), m.group(3)
    kv, ff = plan.widths[il]
    hq, d = kv * dims.group, dims.head_dim
    if plan.per_layer and ((kv == 0 and kind in _ATTN) or (ff == 0 and kind in _FFN)):
        return None
    rows = {"attn_q": hq * d, "attn_k": kv * d, "attn_v": kv * d, "ffn_gate": ff, "ffn_up": ff}.get(kind)
    cols = {"attn_output": hq * d, "ffn_down": ff}.get(kind) if what == "weight" else None
    if rows is None and cols is None and kind not in _ATTN + _FFN:
        logger.warning("%s: unknown layer tensor, copied unchanged", t.name)
    a = _slice_tensor(t, rows, cols)
    if plan.permute_rope and kind in ("attn_q", "attn_k") and rows:
        a = permute_rope_rows(np.ascontiguousarray(a), hq if kind == "attn_q" else kv)
    return np.ascontiguousarray(a)


def _level_kv(plan: ExportPlan, dims: ModelDims) -> dict[str, tuple[object, GGUFValueType, GGUFValueType | None]]:
    a = plan.out_arch
    heads = [kv * dims.group for kv, _ in plan.widths]
    kvs = [kv for kv, _ in plan.widths]
    ffs = [ff for _, ff in plan.widths]
    out: dict[str, tuple[object, GGUFValueType, GGUFValueType | None]] = {}
    for key, values in (("attention.head_count", heads), ("attention.head_count_kv", kvs), ("feed_forward_length", ffs)):
        out[f"{a}.{key}"] = (values, VT.ARRAY, VT.UINT32) if plan.per_layer else (values[0], VT.UINT32, None)
    out[f"{a}.attention.key_length"] = (dims.head_dim, VT.UINT32, None)
    out[f"{a}.attention.value_length"] = (dims.head_dim, VT.UINT32, None)
    return out


def _write(reader: gguf.GGUFReader, dst: str, src: str, arch: str,
           kv: dict[str, tuple[object, GGUFValueType, GGUFValueType | None]],
           tensors: list[tuple[gguf.ReaderTensor, np.ndarray]]) -> None:
    """Write KV pairs and raw tensor data (types unchanged) to ``dst`` atomically."""
    with atomic_output(dst, inputs=[src]) as tmp:
        w = gguf.GGUFWriter(tmp, arch=arch)
        try:
            if "general.alignment" in kv:
                w.add_custom_alignment(int(kv.pop("general.alignment")[0]))  # type: ignore[call-overload]
            for key, (value, main, sub) in kv.items():
                w.add_key_value(key, value, main, sub_type=sub)
            for t, a in tensors:
                w.add_tensor_info(t.name, a.shape, a.dtype, a.nbytes, raw_dtype=GGMLQuantizationType(t.tensor_type))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for _, a in tensors:
                w.write_tensor_data(a, tensor_endianess=reader.endianess)
        finally:
            w.close()


def _copied_kv(reader: gguf.GGUFReader, *, rename: tuple[str, str] | None = None
               ) -> dict[str, tuple[object, GGUFValueType, GGUFValueType | None]]:
    """Source KV pairs minus ``elms.*`` (and general.architecture, which the writer sets), optionally arch-renamed."""
    out: dict[str, tuple[object, GGUFValueType, GGUFValueType | None]] = {}
    for key, value, main, sub in source_kv(reader):
        if key == "general.architecture" or contract.is_elastic_key(key):
            continue
        if rename is not None and key.startswith(rename[0] + "."):
            key = rename[1] + key[len(rename[0]):]
        out[key] = (value, main, sub)
    return out


def export_static(src: str | os.PathLike[str], dst: str | os.PathLike[str], level: Level | int | float, *,
                  source_name: str | None = None, allow_arch_change: bool = True) -> None:
    """Write level ``level`` of ``src`` as a standalone, physically truncated GGUF (no ``elms.*`` keys).

    ``level``: a :class:`Level`, a level index, or a ratio (nearest level). ``source_name`` names the source
    model in the output's ``general.name`` (default: the source's ``general.name`` or file name).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    reader = open_gguf(src)
    fields = contract.reader_fields(reader)
    arch = str(fields.get("general.architecture", ""))
    if arch not in contract.SUPPORTED_ARCHS:
        raise ContractError(f"{src}: architecture {arch!r} is not supported (supported: {', '.join(contract.SUPPORTED_ARCHS)})")
    dims = contract.dims_from_fields(fields, arch, source=src)
    spec = contract.read_spec(fields, source=src)
    types = {t.name: int(t.tensor_type) for t in reader.tensors}
    index, lv = resolve_level(spec, level, source=src)
    contract.validate_levels(spec if index is not None else ElasticSpec(levels=[lv]), dims, types, source=src)
    plan = plan_export(arch, dims, lv, tensor_names=list(types), allow_arch_change=allow_arch_change, source=src)

    kv = _copied_kv(reader, rename=(arch, plan.out_arch) if plan.out_arch != arch else None)
    kv.update(_level_kv(plan, dims))
    base = source_name or str(fields.get("general.name") or os.path.splitext(os.path.basename(src))[0])
    what = f"level {index}" if index is not None else "custom level"
    kv["general.name"] = (f"{base} (elms {what}, ratio {lv.ratio:g})", VT.STRING, None)

    tensors = []
    for t in reader.tensors:
        a = _cut(t, plan, dims)
        if a is not None:
            tensors.append((t, a))
    _write(reader, dst, src, plan.out_arch, kv, tensors)
    logger.info("exported %s of %s as %s -> %s (%d tensors)", what, src, plan.out_arch, dst, len(tensors))


def strip_elastic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dst`` with every ``elms.*`` key removed; tensors byte-identical, same order and types."""
    src, dst = os.fspath(src), os.fspath(dst)
    reader = open_gguf(src)
    arch = str(contract.reader_fields(reader).get("general.architecture", ""))
    if not arch:
        raise ContractError(f"{src}: missing key general.architecture")
    _write(reader, dst, src, arch, _copied_kv(reader), [(t, t.data) for t in reader.tensors])
    logger.info("stripped elastic keys: %s -> %s", src, dst)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elms_gguf.truncate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write one level as a physically truncated standalone GGUF")
    e.add_argument("src")
    e.add_argument("dst")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--level", type=int, help="level index (0 = smallest)")
    g.add_argument("--ratio", type=float, help="ratio; the nearest level is exported")
    e.add_argument("--source-name", help="name of the source model in general.name")
    e.add_argument("--keep-arch", action="store_true", help="refuse instead of switching to llama/deci")
    s = sub.add_parser("strip", help="copy without elms.* keys (byte-identical tensors)")
    s.add_argument("src")
    s.add_argument("dst")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.cmd == "export":
            export_static(args.src, args.dst, args.level if args.level is not None else args.ratio,
                          source_name=args.source_name, allow_arch_change=not args.keep_arch)
        else:
            strip_elastic(args.src, args.dst)
    except (ContractError, FileNotFoundError) as ex:
        logger.error("%s", ex)
        return 1
    return 0


__all__ = ["ExportPlan", "resolve_level", "plan_export", "export_static", "strip_elastic", "main"]

if __name__ == "__main__":
    sys.exit(main())
