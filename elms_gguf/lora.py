"""Per-level LoRA adapters as llama.cpp adapter GGUFs.

An adapter of level i is a standard llama.cpp LoRA GGUF (``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, tensors ``<weight>.lora_a`` {in, r} / ``<weight>.lora_b`` {r, out}) with two twists:

* A and B are stored **compact**: cut to the level's active widths (A: the columns of attn_output/ffn_down the
  level reads, B: the rows of q/k/v/gate/up it computes), and blocks the level skips have no tensors. The runtime
  loads level adapters with ``llama_adapter_lora_init_elastic``, which accepts such prefixes and checks they cover
  the level's views. Written without a level, they are zero-padded to the full weight shapes instead (what stock
  ``--lora`` accepts); the runtime slices A's columns / B's rows like the weight view, so padding is never read;
* it carries ``elms.adapter.model_id`` / ``elms.adapter.level`` / ``elms.adapter.ratio`` so that the runtime
  refuses an adapter of another model or level (see :mod:`elms_gguf.contract`).

The elastic GGUF names it in ``elms.level.<i>.lora`` with its CRC-32 (:func:`attach_adapters`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

import gguf
import numpy as np
import torch

from . import contract, model

log = logging.getLogger(__name__)

# the seven linears ELMS adapts (recipe: rank 8, alpha 16, all of them)
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# storage types of A/B: F16 (also what convert_lora_to_gguf.py writes by default) or F32 for both, or Q8_0 for A
# with B in F16: B's rows in the file are only r values long, too short for a block type, but the runtime keeps a
# level adapter's B transposed ({n_out, r}) and stores it in A's type, so with q8_0 both take 8.5 bits per value.
# "auto" (the default): q8_0 where every A a compact adapter holds has whole Q8_0 blocks of columns, else f16.
ADAPTER_TYPES = ("auto", "f16", "f32", "q8_0")
DEFAULT_ADAPTER_TYPE = "auto"
_QT = gguf.GGMLQuantizationType
_STORAGE = {"f16": (_QT.F16, _QT.F16), "f32": (_QT.F32, _QT.F32), "q8_0": (_QT.Q8_0, _QT.F16)}  # (A, B) in the file


@dataclass
class Adapter:
    """One level's LoRA: ``weights[name] = (A [r, in], B [out, r])`` at full shapes (the parts a level does not
    read are zero or ignored), scale = alpha / r."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    level: int
    ratio: float
    model_id: str
    storage: str = ""  # the file's adapter type (read_adapter); "" for one built in memory

    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))[0].shape[0]

    def as_forward_lora(self) -> dict[str, tuple]:
        """The ``lora=`` argument of :func:`elms_gguf.model.forward` (with a Q8_0 adapter, the activations that
        meet A are rounded through Q8_0 there, as ggml-cpu does)."""
        act = ("q8_0",) if self.storage == "q8_0" else ()
        return {name: (a, b, self.alpha / a.shape[0], *act) for name, (a, b) in self.weights.items()}


def zero_pad(adapter_weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
             config: model.ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pad sliced A ([r, in_active]) / B ([out_active, r]) with zeros to the full weight shapes."""
    required, _ = model.tensor_shapes(config)
    out = {}
    for name, (a, b) in adapter_weights.items():
        key = name if name.endswith(".weight") else name + ".weight"
        if key not in required:
            raise contract.ContractError(f"adapter tensor {key}: the model has no such weight")
        n_out, n_in = required[key]
        if a.shape[1] > n_in or b.shape[0] > n_out or a.shape[0] != b.shape[1]:
            raise contract.ContractError(
                f"adapter tensor {key}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit weight ({n_out}, {n_in})")
        pa = torch.zeros(a.shape[0], n_in, dtype=torch.float32)
        pb = torch.zeros(n_out, b.shape[1], dtype=torch.float32)
        pa[:, : a.shape[1]] = a
        pb[: b.shape[0]] = b
        out[key] = (pa, pb)
    return out


def compact(adapter_weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: model.ModelConfig,
            level: contract.Level) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Cut full-shape A/B to what ``level`` reads (:func:`elms_gguf.contract.active_shape`), dropping skipped blocks."""
    dims = config.dims()
    out = {}
    for name, (a, b) in zero_pad(adapter_weights, config).items():
        il, kind = int(name.split(".")[1]), name.split(".")[2]
        kv, ff = int(level.head_count_kv[il]), int(level.feed_forward_length[il])
        rows, cols = contract.active_shape(dims, kind, kv, ff)
        if rows == 0 or cols == 0:
            continue  # the level skips this block
        out[name] = (a[:, :cols].contiguous(), b[:rows].contiguous())
    return out


def resolve_adapter_type(dtype: str, config: model.ModelConfig, level: contract.Level | None) -> str:
    """The storage ``write_adapter`` uses for ``dtype``: ``auto`` is ``q8_0`` for a compact adapter (``level``
    given) whose every A has whole Q8_0 blocks of columns at that level, else ``f16``; other types pass through."""
    if dtype != "auto":
        return dtype
    if level is None:
        return "f16"
    dims, bs = config.dims(), contract.block_size(_QT.Q8_0)
    for il in range(config.n_layer):
        kv, ff = int(level.head_count_kv[il]), int(level.feed_forward_length[il])
        for kind in TARGETS:
            rows, cols = contract.active_shape(dims, kind, kv, ff)  # cols None: all n_embd inputs
            if rows != 0 and cols != 0 and (dims.n_embd if cols is None else cols) % bs:
                return "f16"
    return "q8_0"


def write_adapter(path: str | os.PathLike[str], config: model.ModelConfig, adapter: Adapter, *,
                  dtype: str = DEFAULT_ADAPTER_TYPE, level: contract.Level | None = None) -> None:
    """Write one level's adapter GGUF (``dtype``: ``auto``, ``f16``, ``f32`` or ``q8_0``, see ADAPTER_TYPES and
    :func:`resolve_adapter_type`), atomically.

    With ``level`` (the widths of the level it belongs to) the tensors are stored compact; without, zero-padded
    to the full weight shapes. Both run identically at that level; compact takes a fraction of the memory.
    """
    if dtype not in ADAPTER_TYPES:
        raise contract.ContractError(f"{os.fspath(path)}: adapter type {dtype!r} is not supported (use one of {', '.join(ADAPTER_TYPES)})")
    type_a, type_b = _STORAGE[resolve_adapter_type(dtype, config, level)]
    if level is not None and len(level.head_count_kv) != config.n_layer:
        raise contract.ContractError(f"{os.fspath(path)}: level table has {len(level.head_count_kv)} layers, the model {config.n_layer}")
    weights = zero_pad(adapter.weights, config) if level is None else compact(adapter.weights, config, level)
    if not weights:
        raise contract.ContractError(f"{os.fspath(path)}: the adapter has no tensor the level uses")
    with model.atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch=config.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        w.add_string(contract.KEY_ADAPTER_MODEL_ID, adapter.model_id)
        w.add_uint32(contract.KEY_ADAPTER_LEVEL, int(adapter.level))
        w.add_float32(contract.KEY_ADAPTER_RATIO, float(adapter.ratio))
        for name, (a, b) in weights.items():
            for suffix, t, qt in ((".lora_a", a, type_a), (".lora_b", b, type_b)):
                data = model.encode_tensor(f"{os.fspath(path)}: {name}{suffix}", t, qt)
                w.add_tensor(name + suffix, data, raw_dtype=qt if data.dtype == np.uint8 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def attach_adapters(spec: contract.ElasticSpec, adapters: Mapping[int, str], *, model_dir: str) -> contract.ElasticSpec:
    """Name each level's adapter file (relative to the model's directory) and its CRC-32 in ``spec``."""
    for level, path in adapters.items():
        lv = spec.levels[level]
        lv.lora = os.path.relpath(path, model_dir)
        lv.lora_crc32 = contract.crc32_file(path)
    return spec


def random_adapter(config: model.ModelConfig, *, level: int, ratio: float, model_id: str, rank: int = 8,
                   alpha: float = 16.0, seed: int = 0, scale: float = 0.05,
                   targets: tuple[str, ...] = TARGETS) -> Adapter:
    """A random full-shape adapter (tests and benchmarks: the runtime cost and exactness do not depend on training)."""
    g = torch.Generator().manual_seed(seed)
    required, _ = model.tensor_shapes(config)
    weights = {}
    for name, shape in required.items():
        if name.startswith("blk.") and name.split(".")[2] in targets and name.endswith(".weight"):
            n_out, n_in = shape
            a = torch.randn(rank, n_in, generator=g) * scale
            b = torch.randn(n_out, rank, generator=g) * scale
            weights[name] = (a, b)
    return Adapter(weights=weights, alpha=alpha, level=level, ratio=ratio, model_id=model_id)


# --------------------------------------------------------------------------------------------------
# reading adapters back (Python-side checks mirror the runtime's) and rewriting a model's level table


def read_adapter(path: str | os.PathLike[str], *, model_id: str | None = None, level: int | None = None,
                 crc32: int | None = None, config: model.ModelConfig | None = None,
                 widths: contract.Level | None = None) -> Adapter:
    """Load a level adapter GGUF written by :func:`write_adapter`, refusing what the runtime would refuse.

    ``crc32`` (the model's ``elms.level.<i>.lora_crc32``), ``model_id`` (the model's ``elms.model_id``) and
    ``level`` are checked when given. With ``config``, every tensor must fit its weight and is returned
    zero-padded to the full shape (compact files included); with ``widths`` too (the level's table), every
    tensor must cover the part of the weight that level reads. Messages name the file and the reason, like
    llama.cpp's.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise contract.ContractError(f"{path}: cannot open adapter file (missing)")
    if crc32 is not None:
        got = contract.crc32_file(path)
        if got != int(crc32):
            raise contract.ContractError(f"{path} is corrupt or was replaced: CRC-32 {got:08x}, the model expects {int(crc32):08x}")
    reader = model.open_gguf(path)
    fields = contract.reader_fields(reader)
    if fields.get("general.type") != "adapter" or fields.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise contract.ContractError(f"{path}: not a LoRA adapter GGUF (general.type {fields.get('general.type')!r}, "
                                     f"adapter.type {fields.get(gguf.Keys.Adapter.TYPE)!r})")
    for key in (contract.KEY_ADAPTER_MODEL_ID, contract.KEY_ADAPTER_LEVEL, gguf.Keys.Adapter.LORA_ALPHA):
        if key not in fields:
            raise contract.ContractError(f"{path}: missing key {key}: not an elms level adapter")
    got_id, got_level = str(fields[contract.KEY_ADAPTER_MODEL_ID]), int(fields[contract.KEY_ADAPTER_LEVEL])  # type: ignore[call-overload]
    if model_id is not None and got_id != model_id:
        raise contract.ContractError(f"{path} was trained for model '{got_id}', not for this model ('{model_id}')")
    if level is not None and got_level != int(level):
        raise contract.ContractError(f"{path} is the adapter of level {got_level}, not of level {level}")
    tensors = {t.name: t for t in reader.tensors}
    required = model.tensor_shapes(config)[0] if config is not None else {}
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    storage = {types: name for name, types in _STORAGE.items()}
    kinds = set()
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        if base + ".lora_b" not in tensors:
            raise contract.ContractError(f"{path}: {name} has no matching {base}.lora_b")
        ta, tb = tensors[name], tensors[base + ".lora_b"]
        if (ta.tensor_type, tb.tensor_type) not in storage:
            raise contract.ContractError(f"{path}: {base}: lora_a {ta.tensor_type.name} / lora_b {tb.tensor_type.name} "
                                         f"is not an adapter storage elms-gguf writes ({', '.join(_STORAGE)})")
        kinds.add(storage[(ta.tensor_type, tb.tensor_type)])
        # F16 files stay F16 here: model.forward then rounds activations the way ggml-cpu does for F16 weights
        a, b = (model.dequantize_tensor(t, torch.float16 if t.tensor_type == gguf.GGMLQuantizationType.F16
                                        else torch.float32) for t in (ta, tb))
        if ta.tensor_type == _QT.Q8_0 and b.shape[0] % contract.block_size(_QT.Q8_0) == 0:
            # the runtime stores a level adapter's B transposed in A's type: each column of B through Q8_0
            b = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(
                np.ascontiguousarray(b.float().T.numpy()), _QT.Q8_0), _QT.Q8_0).T.copy())
        if config is not None:
            if base not in required:
                raise contract.ContractError(f"{path}: adapter tensor {base}: the model has no such weight")
            n_out, n_in = required[base]
            if a.shape[1] > n_in or b.shape[0] > n_out or b.shape[1] != a.shape[0]:
                raise contract.ContractError(f"{path}: adapter tensor {base}: A {tuple(a.shape)} / B {tuple(b.shape)} "
                                             f"do not fit the weight ({n_out}, {n_in})")
            if widths is not None and base.startswith("blk."):
                il, kind = int(base.split(".")[1]), base.split(".")[2]
                rows, cols = contract.active_shape(config.dims(), kind, int(widths.head_count_kv[il]),
                                                   int(widths.feed_forward_length[il]))
                if rows != 0 and cols != 0 and (b.shape[0] < (n_out if rows is None else rows)
                                                or a.shape[1] < (n_in if cols is None else cols)):
                    raise contract.ContractError(
                        f"{path}: adapter tensor {base}: A {tuple(a.shape)} / B {tuple(b.shape)} do not cover what "
                        f"the level reads ({n_out if rows is None else rows} rows, {n_in if cols is None else cols} columns)")
            pa, pb = a.new_zeros(a.shape[0], n_in), b.new_zeros(n_out, b.shape[1])
            pa[:, : a.shape[1]], pb[: b.shape[0]] = a, b
            a, b = pa, pb
        weights[base] = (a, b)
    if not weights:
        raise contract.ContractError(f"{path}: adapter has no tensors")
    if len(kinds) != 1:
        raise contract.ContractError(f"{path}: tensors of mixed adapter types ({', '.join(sorted(kinds))})")
    return Adapter(weights=weights, alpha=float(fields[gguf.Keys.Adapter.LORA_ALPHA]), level=got_level,  # type: ignore[arg-type]
                   ratio=float(fields.get(contract.KEY_ADAPTER_RATIO, 0.0)), model_id=got_id,  # type: ignore[arg-type]
                   storage=kinds.pop())


def check_level_adapters(model_path: str | os.PathLike[str], *, config: model.ModelConfig | None = None,
                         load: bool = True) -> dict[int, Adapter | None]:
    """Check every adapter an elastic GGUF names, as the runtime does at load (missing / corrupt / other model /
    other level): level -> :class:`Adapter` (None for a level without adapter, or when ``load`` is False)."""
    model_path = os.fspath(model_path)
    reader = model.open_gguf(model_path)
    spec = contract.read_spec(contract.reader_fields(reader), source=model_path)
    if spec is None:
        raise contract.ContractError(f"{model_path}: not an elastic model (no {contract.KEY_RATIOS})")
    out: dict[int, Adapter | None] = {}
    base_dir = os.path.dirname(os.path.abspath(model_path))
    for i, lv in enumerate(spec.levels):
        if not lv.lora:
            out[i] = None
            continue
        path = lv.lora if os.path.isabs(lv.lora) else os.path.join(base_dir, lv.lora)
        try:
            if not load:
                if not os.path.isfile(path):
                    raise contract.ContractError(f"{path}: cannot open adapter file (missing)")
                got = contract.crc32_file(path)
                if got != lv.lora_crc32:
                    raise contract.ContractError(f"{path} is corrupt or was replaced: CRC-32 {got:08x}, "
                                                 f"the model expects {lv.lora_crc32:08x}")
                out[i] = None
            else:
                out[i] = read_adapter(path, model_id=spec.model_id, level=i, crc32=lv.lora_crc32, config=config,
                                      widths=lv)
        except contract.ContractError as e:
            raise contract.ContractError(f"{model_path}: elastic level {i}: {e}") from e
    return out


def rewrite_spec(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None, spec: contract.ElasticSpec) -> None:
    """Write ``src`` with its ``elms.*`` keys replaced by ``spec``'s; every other key and every tensor byte unchanged.

    Metadata only: tensors are copied byte for byte (same order, types and data), so the file stays the same model.
    ``dst`` None (or the same file as ``src``) rewrites ``src`` in place -- still atomically: a temp file next to it
    replaces it by rename. Otherwise ``src`` is left untouched. The spec is validated against the model first.
    """
    from . import truncate  # the byte-copying writer of strip_elastic / export_static

    src = os.fspath(src)
    in_place = dst is None or model._same_file(src, os.fspath(dst))
    dst = src if in_place else os.fspath(dst)  # type: ignore[arg-type]
    reader = model.open_gguf(src)
    fields = contract.reader_fields(reader)
    arch = str(fields.get("general.architecture", ""))
    if not arch:
        raise contract.ContractError(f"{src}: missing key general.architecture")
    dims = contract.dims_from_fields(fields, arch, source=src)
    contract.validate_levels(spec, dims, {t.name: int(t.tensor_type) for t in reader.tensors}, source=src)
    kv = truncate._copied_kv(reader)
    for key, value, main, sub in contract.spec_kv(spec):
        kv[key] = (value, main, sub)
    # in place: the reader's memory map keeps the old inode alive while the new file replaces it
    truncate._write(reader, dst, None if in_place else src, arch, kv, [(t, t.data) for t in reader.tensors])
    log.info("rewrote the elastic level table of %s -> %s", src, dst)
