"""The elastic GGUF contract: key names, level tables and width rules.

This module is the ONE place that defines what an elastic (ELMS) GGUF holds. The converter writes it,
the runtime (patches/ in C++, ``elms_gguf.runtime`` in Python) reads it, and the tests check it.
The C++ side (``src/llama-elastic.cpp`` added by ``patches/0001``) mirrors the key names below;
``tests/test_contract.py`` greps the patch to keep the two in step.

Layout (all keys are optional for stock llama.cpp, which ignores unknown keys and loads the dense model):

=================================  ==========  =====================================================
key                                type        meaning
=================================  ==========  =====================================================
``elms.version``                   uint32      format version (:data:`FORMAT_VERSION`)
``elms.ratios``                    float32[L]  nominal ratio of each level, strictly increasing, in (0, 1]
``elms.achieved_ratios``           float32[L]  decoder-parameter fraction each level really keeps
``elms.anchor_layers``             uint32[]    layers kept at full width at every level
``elms.model_id``                  string      identity of the elastic weights (adapters must match it)
``elms.level.<i>.head_count_kv``   uint32[n]   active KV heads of each layer at level i (0 = no attention)
``elms.level.<i>.feed_forward_length`` uint32[n] active FFN width of each layer at level i (0 = no FFN)
``elms.level.<i>.lora``            string      adapter GGUF of level i, relative to the model file ('' = none)
``elms.level.<i>.lora_crc32``      uint32      CRC-32 (zlib) of that adapter file
``elms.importance``                string      unit order used (taylor / magnitude / random), informational
``elms.allocation``                string      width allocation used (searched / uniform / ...), informational
=================================  ==========  =====================================================

The standard ``<arch>.attention.head_count(_kv)`` / ``<arch>.feed_forward_length`` keys stay at full width.

Width rules (checked by :func:`validate_levels` here and by the runtime at load):

* every table has exactly ``n_layer`` entries;
* ``0 <= head_count_kv <= n_head_kv`` and ``0 <= feed_forward_length <= n_ff`` per layer;
* query heads follow KV heads in whole groups: active q-heads = active KV heads x (n_head / n_head_kv);
* column-sliced widths are whole quantization blocks of the tensor's actual type:
  ``attn_output``: active q-heads x head_dim, ``ffn_down``: active FFN width (32 for Q4_0/Q8_0, 256 for K-quants);
* levels are nested: each level's widths are >= the previous (smaller) level's, layer by layer.

Fast-path rule (not an error; :func:`repack_slow_views` lists where it is broken): llama.cpp's CPU backend repacks
some types (:data:`REPACKED_TYPES`) into groups of 4/8 (16 on RISC-V) interleaved rows and runs them on its
fastest kernels. A level's view of a repacked weight runs on that layout when its rows are whole groups
(:data:`REPACK_ROW_GROUP`) and its columns whole blocks; any other view makes the runtime keep that weight in
the plain layout (slower, never wrong).

Adapters written for a level carry ``elms.adapter.model_id``, ``elms.adapter.level`` and ``elms.adapter.ratio``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import gguf

FORMAT_VERSION = 1

PREFIX = "elms"
KEY_VERSION = "elms.version"
KEY_RATIOS = "elms.ratios"
KEY_ACHIEVED = "elms.achieved_ratios"
KEY_ANCHORS = "elms.anchor_layers"
KEY_MODEL_ID = "elms.model_id"
KEY_IMPORTANCE = "elms.importance"
KEY_ALLOCATION = "elms.allocation"

KEY_ADAPTER_MODEL_ID = "elms.adapter.model_id"
KEY_ADAPTER_LEVEL = "elms.adapter.level"
KEY_ADAPTER_RATIO = "elms.adapter.ratio"

SUPPORTED_ARCHS = ("llama", "qwen2")

# tensors sliced by rows (output dim) and by columns (input dim) at a level
ROW_SLICED_ATTN = ("attn_q", "attn_k", "attn_v")
COL_SLICED_ATTN = ("attn_output",)
ROW_SLICED_FFN = ("ffn_gate", "ffn_up")
COL_SLICED_FFN = ("ffn_down",)


#: ggml types llama.cpp's CPU backend repacks by default (x86 AVX2: Q4_0, Q4_K, IQ4_NL; ARM all six)
REPACKED_TYPES = ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL")
#: rows interleaved per group by the repacked layouts (4 or 8 on x86 and ARM, 16 on RISC-V V): a row-prefix view
#: of whole groups on every CPU is a multiple of this
REPACK_ROW_GROUP = 16


def key_head_count_kv(level: int) -> str:
    return f"elms.level.{level}.head_count_kv"


def key_feed_forward_length(level: int) -> str:
    return f"elms.level.{level}.feed_forward_length"


def key_lora(level: int) -> str:
    return f"elms.level.{level}.lora"


def key_lora_crc32(level: int) -> str:
    return f"elms.level.{level}.lora_crc32"


class ContractError(ValueError):
    """An elastic GGUF (or a request against one) breaks the contract; the message names what is wrong."""


@dataclass(frozen=True)
class ModelDims:
    """The full-width sizes that the width tables refer to."""

    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_embd: int

    @property
    def group(self) -> int:
        """Query heads per KV head (llama.cpp maps q-heads to KV heads in contiguous blocks)."""
        return self.n_head // self.n_head_kv


@dataclass
class Level:
    """One nested sub-model: per-layer active KV heads and FFN widths."""

    ratio: float
    head_count_kv: list[int]
    feed_forward_length: list[int]
    achieved_ratio: float | None = None
    lora: str = ""
    lora_crc32: int = 0

    def is_full(self, dims: ModelDims) -> bool:
        return all(k == dims.n_head_kv for k in self.head_count_kv) and all(
            f == dims.n_ff for f in self.feed_forward_length
        )


@dataclass
class ElasticSpec:
    """Everything the ``elms.*`` keys of one GGUF say."""

    levels: list[Level]
    anchors: list[int] = field(default_factory=list)
    model_id: str = ""
    importance: str = ""
    allocation: str = ""
    version: int = FORMAT_VERSION

    @property
    def ratios(self) -> list[float]:
        return [lv.ratio for lv in self.levels]

    def nearest_level(self, ratio: float) -> int:
        """Index of the level whose ratio is closest to ``ratio`` (ties go to the larger level)."""
        check_ratio(ratio, what="requested ratio")
        best, best_d = 0, float("inf")
        for i, lv in enumerate(self.levels):
            d = abs(lv.ratio - ratio)
            if d <= best_d + 1e-9:
                best, best_d = i, d
        return best


def check_ratio(value: object, *, what: str = "ratio") -> float:
    """A ratio is a number in (0, 1]."""
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ContractError(f"{what} {value!r} is not a number") from None
    if not (0.0 < r <= 1.0):
        raise ContractError(f"{what} {r} is outside (0, 1]")
    return r


def block_size(ggml_type: int) -> int:
    """Elements per quantization block of a ggml type (1 for F32/F16/BF16)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)][0]


def column_widths(dims: ModelDims, head_count_kv: int, ffn: int) -> dict[str, int]:
    """Input-dim (column) widths of the column-sliced tensors of one layer."""
    return {"attn_output": head_count_kv * dims.group * dims.head_dim, "ffn_down": ffn}


def active_shape(dims: ModelDims, kind: str, head_count_kv: int, ffn: int) -> tuple[int | None, int | None]:
    """(rows, cols) of a layer weight of this kind (``attn_q`` ... ``ffn_down``) that a level with these widths reads:
    an output (row) prefix of q/k/v/gate/up, an input (column) prefix of attn_output/ffn_down; None = all."""
    hq, d = head_count_kv * dims.group, dims.head_dim
    rows = {"attn_q": hq * d, "attn_k": head_count_kv * d, "attn_v": head_count_kv * d,
            "ffn_gate": ffn, "ffn_up": ffn}.get(kind)
    cols = column_widths(dims, head_count_kv, ffn).get(kind)
    return rows, cols


def repack_slow_views(spec: ElasticSpec, dims: ModelDims, tensor_types: Mapping[str, int]) -> list[str]:
    """Where a level's prefix views cannot run on llama.cpp's repacked layout (rows not whole groups of
    :data:`REPACK_ROW_GROUP`, columns not whole blocks), one line per (level, tensor kind); empty = every level
    runs on the fast kernels wherever the CPU repacks these types."""
    import gguf

    repacked = {int(getattr(gguf.GGMLQuantizationType, t)) for t in REPACKED_TYPES}
    out: list[str] = []
    for i, lv in enumerate(spec.levels):
        for il in range(dims.n_layer):
            kv, ff = lv.head_count_kv[il], lv.feed_forward_length[il]
            for kind in ROW_SLICED_ATTN + COL_SLICED_ATTN + ROW_SLICED_FFN + COL_SLICED_FFN:
                attn = kind.startswith("attn")
                if (kv if attn else ff) in (0, dims.n_head_kv if attn else dims.n_ff):
                    continue  # skipped or whole: no view
                t = tensor_types.get(f"blk.{il}.{kind}.weight")
                if t is None or int(t) not in repacked:
                    continue
                rows, cols = active_shape(dims, kind, kv, ff)
                if rows is not None and rows % REPACK_ROW_GROUP:
                    out.append(f"level {i} layer {il}: {kind} keeps {rows} rows, not whole groups of {REPACK_ROW_GROUP}")
                if cols is not None and cols % block_size(int(t)):
                    out.append(f"level {i} layer {il}: {kind} keeps {cols} columns, not whole blocks of {block_size(int(t))}")
    return out


def validate_levels(
    spec: ElasticSpec,
    dims: ModelDims,
    tensor_types: Mapping[str, int] | None = None,
    *,
    source: str = "model",
) -> None:
    """Check every width rule; raise :class:`ContractError` naming level, layer and tensor at fault.

    ``tensor_types`` maps GGUF tensor names (``blk.3.ffn_down.weight``) to ggml types; when given, the
    column-sliced widths are checked against the block size of each tensor's actual type.
    """
    if dims.n_head % dims.n_head_kv:
        raise ContractError(f"{source}: n_head {dims.n_head} is not a multiple of n_head_kv {dims.n_head_kv}")
    if not spec.levels:
        raise ContractError(f"{source}: no elastic levels ({KEY_RATIOS} is empty)")
    prev: Level | None = None
    for i, lv in enumerate(spec.levels):
        check_ratio(lv.ratio, what=f"{source}: level {i} ratio")
        if prev is not None and not lv.ratio > prev.ratio:
            raise ContractError(f"{source}: {KEY_RATIOS} must be strictly increasing (level {i}: {lv.ratio} after {prev.ratio})")
        for key, table in ((key_head_count_kv(i), lv.head_count_kv), (key_feed_forward_length(i), lv.feed_forward_length)):
            if len(table) != dims.n_layer:
                raise ContractError(f"{source}: {key} has {len(table)} entries, expected n_layer = {dims.n_layer}")
        for il in range(dims.n_layer):
            kv, ff = int(lv.head_count_kv[il]), int(lv.feed_forward_length[il])
            if not 0 <= kv <= dims.n_head_kv:
                raise ContractError(
                    f"{source}: level {i} layer {il}: head_count_kv {kv} outside [0, {dims.n_head_kv}]")
            if not 0 <= ff <= dims.n_ff:
                raise ContractError(
                    f"{source}: level {i} layer {il}: feed_forward_length {ff} outside [0, {dims.n_ff}]")
            if prev is not None and (kv < prev.head_count_kv[il] or ff < prev.feed_forward_length[il]):
                raise ContractError(
                    f"{source}: level {i} layer {il} is narrower than level {i - 1} "
                    f"(kv {kv} < {prev.head_count_kv[il]} or ffn {ff} < {prev.feed_forward_length[il]}): levels must be nested")
            if tensor_types is not None:
                for name, cols in column_widths(dims, kv, ff).items():
                    tname = f"blk.{il}.{name}.weight"
                    if tname not in tensor_types:
                        continue
                    bs = block_size(tensor_types[tname])
                    if cols % bs:
                        raise ContractError(
                            f"{source}: level {i} layer {il}: {tname} would be sliced to {cols} columns, "
                            f"not a multiple of its block size {bs}")
        prev = lv
    for a in spec.anchors:
        if not 0 <= a < dims.n_layer:
            raise ContractError(f"{source}: anchor layer {a} outside [0, {dims.n_layer})")


def round_down(value: int, multiple: int) -> int:
    return (value // multiple) * multiple


# --------------------------------------------------------------------------------------------------
# GGUF I/O (gguf-py)


def dims_from_fields(fields: Mapping[str, object], arch: str, *, source: str = "model") -> ModelDims:
    """Full-width dims from a GGUF's standard keys (``fields`` maps key -> python value)."""

    def get(key: str, default: object = None) -> object:
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise ContractError(f"{source}: missing key {arch}.{key}")
        return v

    def scalar(v: object, key: str) -> int:
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise ContractError(f"{source}: {arch}.{key} varies per layer; elastic models need uniform full widths")
            v = v[0]
        return int(v)  # type: ignore[arg-type]

    n_layer = int(get("block_count"))  # type: ignore[arg-type]
    n_embd = int(get("embedding_length"))  # type: ignore[arg-type]
    n_head = scalar(get("attention.head_count"), "attention.head_count")
    n_head_kv = scalar(get("attention.head_count_kv", n_head), "attention.head_count_kv")
    n_ff = scalar(get("feed_forward_length"), "feed_forward_length")
    head_dim = int(fields.get(f"{arch}.attention.key_length", n_embd // n_head))  # type: ignore[arg-type]
    return ModelDims(n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff, n_embd=n_embd)


def reader_fields(reader: "gguf.GGUFReader") -> dict[str, object]:
    """All KV pairs of a GGUFReader as python values."""
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def read_spec(fields: Mapping[str, object], *, source: str = "model") -> ElasticSpec | None:
    """The elastic spec stored in a GGUF's fields, or None for a plain (dense) GGUF."""
    if KEY_RATIOS not in fields:
        return None
    version = int(fields.get(KEY_VERSION, 0))  # type: ignore[arg-type]
    if version != FORMAT_VERSION:
        raise ContractError(f"{source}: {KEY_VERSION} = {version}, this elms-gguf reads version {FORMAT_VERSION}")
    ratios = [float(r) for r in fields[KEY_RATIOS]]  # type: ignore[union-attr]
    achieved = fields.get(KEY_ACHIEVED)
    levels = []
    for i, r in enumerate(ratios):
        for key in (key_head_count_kv(i), key_feed_forward_length(i)):
            if key not in fields:
                raise ContractError(f"{source}: missing key {key}")
        levels.append(
            Level(
                ratio=r,
                head_count_kv=[int(x) for x in fields[key_head_count_kv(i)]],  # type: ignore[union-attr]
                feed_forward_length=[int(x) for x in fields[key_feed_forward_length(i)]],  # type: ignore[union-attr]
                achieved_ratio=float(achieved[i]) if achieved is not None else None,  # type: ignore[index]
                lora=str(fields.get(key_lora(i), "")),
                lora_crc32=int(fields.get(key_lora_crc32(i), 0)),  # type: ignore[arg-type]
            )
        )
    return ElasticSpec(
        levels=levels,
        anchors=[int(a) for a in fields.get(KEY_ANCHORS, [])],  # type: ignore[union-attr]
        model_id=str(fields.get(KEY_MODEL_ID, "")),
        importance=str(fields.get(KEY_IMPORTANCE, "")),
        allocation=str(fields.get(KEY_ALLOCATION, "")),
        version=version,
    )


def spec_kv(spec: ElasticSpec) -> list[tuple[str, object, "gguf.GGUFValueType", "gguf.GGUFValueType | None"]]:
    """The (key, value, type, sub_type) tuples that encode ``spec``, in a stable order."""
    import gguf

    VT = gguf.GGUFValueType
    out: list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]] = [
        (KEY_VERSION, spec.version, VT.UINT32, None),
        (KEY_RATIOS, [float(r) for r in spec.ratios], VT.ARRAY, VT.FLOAT32),
    ]
    if all(lv.achieved_ratio is not None for lv in spec.levels):
        out.append((KEY_ACHIEVED, [float(lv.achieved_ratio) for lv in spec.levels], VT.ARRAY, VT.FLOAT32))  # type: ignore[arg-type]
    if spec.anchors:
        out.append((KEY_ANCHORS, [int(a) for a in spec.anchors], VT.ARRAY, VT.UINT32))
    if spec.model_id:
        out.append((KEY_MODEL_ID, spec.model_id, VT.STRING, None))
    if spec.importance:
        out.append((KEY_IMPORTANCE, spec.importance, VT.STRING, None))
    if spec.allocation:
        out.append((KEY_ALLOCATION, spec.allocation, VT.STRING, None))
    for i, lv in enumerate(spec.levels):
        out.append((key_head_count_kv(i), [int(x) for x in lv.head_count_kv], VT.ARRAY, VT.UINT32))
        out.append((key_feed_forward_length(i), [int(x) for x in lv.feed_forward_length], VT.ARRAY, VT.UINT32))
        if lv.lora:
            out.append((key_lora(i), lv.lora, VT.STRING, None))
            out.append((key_lora_crc32(i), int(lv.lora_crc32), VT.UINT32, None))
    return out


def write_spec(writer: "gguf.GGUFWriter", spec: ElasticSpec) -> None:
    """Add the ``elms.*`` keys of ``spec`` to a GGUFWriter (before ``write_kv_data_to_file``)."""
    for key, value, vtype, sub in spec_kv(spec):
        writer.add_key_value(key, value, vtype, sub_type=sub)


def is_elastic_key(key: str) -> bool:
    return key.startswith(PREFIX + ".")


def crc32_file(path: str) -> int:
    """CRC-32 (zlib polynomial) of a file, as stored in ``elms.level.<i>.lora_crc32``."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


def uniform_level(dims: ModelDims, ratio: float, head_count_kv: int, ffn: int, anchors: Iterable[int] = ()) -> Level:
    """A level with the same widths in every non-anchor layer (anchors stay full)."""
    anchors = set(anchors)
    kv = [dims.n_head_kv if il in anchors else head_count_kv for il in range(dims.n_layer)]
    ff = [dims.n_ff if il in anchors else ffn for il in range(dims.n_layer)]
    return Level(ratio=ratio, head_count_kv=kv, feed_forward_length=ff)


def layer_params(dims: ModelDims, head_count_kv: int, ffn: int, *, qkv_bias: bool = False) -> int:
    """Decoder parameters of one layer at the given active widths (norms excluded)."""
    hq = head_count_kv * dims.group
    attn = dims.n_embd * dims.head_dim * (hq + 2 * head_count_kv) + hq * dims.head_dim * dims.n_embd
    if qkv_bias:
        attn += dims.head_dim * (hq + 2 * head_count_kv)
    return attn + 3 * dims.n_embd * ffn


def level_ratio(dims: ModelDims, level: Level, *, qkv_bias: bool = False) -> float:
    """Fraction of the decoder-layer parameters that a level keeps (the ELMS 'ratio')."""
    full = dims.n_layer * layer_params(dims, dims.n_head_kv, dims.n_ff, qkv_bias=qkv_bias)
    kept = sum(
        layer_params(dims, kv, ff, qkv_bias=qkv_bias)
        for kv, ff in zip(level.head_count_kv, level.feed_forward_length)
    )
    return kept / full


__all__ = [
    "FORMAT_VERSION", "ContractError", "ModelDims", "Level", "ElasticSpec", "SUPPORTED_ARCHS",
    "KEY_VERSION", "KEY_RATIOS", "KEY_ACHIEVED", "KEY_ANCHORS", "KEY_MODEL_ID", "KEY_IMPORTANCE", "KEY_ALLOCATION",
    "KEY_ADAPTER_MODEL_ID", "KEY_ADAPTER_LEVEL", "KEY_ADAPTER_RATIO",
    "key_head_count_kv", "key_feed_forward_length", "key_lora", "key_lora_crc32",
    "check_ratio", "block_size", "column_widths", "active_shape", "validate_levels", "repack_slow_views",
    "REPACKED_TYPES", "REPACK_ROW_GROUP", "round_down", "dims_from_fields",
    "reader_fields", "read_spec", "spec_kv", "write_spec", "is_elastic_key", "crc32_file", "uniform_level",
    "layer_params", "level_ratio",
]
