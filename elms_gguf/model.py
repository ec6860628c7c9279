"""A PyTorch reference of the llama / qwen2 decoder as llama.cpp computes it, plus GGUF reading and writing.

Why a reference: every other stage (importance scores, recovery training, the patched runtime) must agree on
*what* level k of an elastic GGUF computes. This module says it in ~100 lines of plain PyTorch (gpt-fast style:
one loop over layers, no caches) on weights kept in **GGUF layout** -- the exact rows llama.cpp sees, so the
q/k rows of a llama model are already permuted for llama.cpp's NORM rope and a prefix of rows *is* a prefix of
heads. A level is applied the way the runtime applies it: prefix views (rows of attn_q/k/v/ffn_gate/ffn_up,
columns of attn_output/ffn_down), width 0 skipping the block.

GGUF I/O goes through gguf-py (the copy vendored with llama.cpp): :func:`load_gguf` dequantizes any type
gguf-py knows, :func:`write_gguf` writes F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 (K-quants need ``llama-quantize``)
atomically, and :func:`make_tiny_gguf` builds small deterministic models with a tiny SPM vocabulary that
llama.cpp loads, for tests.

Shapes: a weight is a torch tensor of shape ``(out, in)`` = the GGUF ``ne`` reversed; ``x @ W.T`` is ggml's
``mul_mat(W, x)``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from . import contract
from .contract import ContractError

logger = logging.getLogger(__name__)

QT = GGMLQuantizationType
VT = GGUFValueType

# lora[weight name] = (A [r, in], B [out, r], scale) or (A, B, scale, act): act "q8_0" for a Q8_0-stored A
LoraMap = Mapping[str, tuple]

Weights = dict[str, torch.Tensor]
KV = tuple[str, object, GGUFValueType, "GGUFValueType | None"]

#: types gguf-py can quantize (numpy reference quantizers, byte-identical to ggml's)
PY_QUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)

_FILE_TYPE = {  # general.file_type for a file whose matrices are mostly of this type
    QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelConfig:
    """Hyper-parameters of a llama / qwen2 decoder at full width."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    tied_embeddings: bool = True
    context_length: int = 2048

    def __post_init__(self) -> None:
        if self.arch not in contract.SUPPORTED_ARCHS:
            raise ContractError(f"architecture {self.arch!r} is not supported (supported: {', '.join(contract.SUPPORTED_ARCHS)})")
        if self.n_head_kv <= 0 or self.n_head % self.n_head_kv:
            raise ContractError(f"n_head {self.n_head} is not a positive multiple of n_head_kv {self.n_head_kv}")
        if self.head_dim % 2:
            raise ContractError(f"head_dim {self.head_dim} must be even for rope")

    @property
    def group(self) -> int:
        return self.n_head // self.n_head_kv

    def dims(self) -> contract.ModelDims:
        return contract.ModelDims(n_layer=self.n_layer, n_head=self.n_head, n_head_kv=self.n_head_kv,
                                  head_dim=self.head_dim, n_ff=self.n_ff, n_embd=self.n_embd)

    def full_widths(self) -> list[tuple[int, int]]:
        return [(self.n_head_kv, self.n_ff)] * self.n_layer


def torch_device(name: str = "auto") -> torch.device:
    """The device a trainer runs on: ``auto`` = CUDA when torch sees one, else the CPU; ``cpu``, ``cuda``,
    ``cuda:N`` as torch spells them. Asking for CUDA where torch sees none is a ValueError, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}; use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (auto, cpu, cuda or cuda:N)")
    return dev


def level_widths(level: contract.Level) -> list[tuple[int, int]]:
    """``[(kv, ff), ...]`` per layer of a level, the form :func:`forward` takes."""
    return list(zip((int(k) for k in level.head_count_kv), (int(f) for f in level.feed_forward_length)))


def tensor_shapes(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) tensor names -> torch shape, exactly what llama.cpp's loader creates for ``arch``.

    llama.cpp refuses a file with a missing required tensor *or* with a tensor it did not create, so the writer
    checks weights against this table.
    """
    c = config
    q_rows, kv_rows = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    req: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.n_vocab, c.n_embd), "output_norm.weight": (c.n_embd,)}
    opt: dict[str, tuple[int, ...]] = {}
    (opt if c.tied_embeddings else req)["output.weight"] = (c.n_vocab, c.n_embd)
    if c.arch == "qwen2":
        opt["output.bias"] = (c.n_vocab,)
    for il in range(c.n_layer):
        p = f"blk.{il}."
        req.update({
            p + "attn_norm.weight": (c.n_embd,), p + "ffn_norm.weight": (c.n_embd,),
            p + "attn_q.weight": (q_rows, c.n_embd), p + "attn_k.weight": (kv_rows, c.n_embd),
            p + "attn_v.weight": (kv_rows, c.n_embd), p + "attn_output.weight": (c.n_embd, q_rows),
            p + "ffn_gate.weight": (c.n_ff, c.n_embd), p + "ffn_up.weight": (c.n_ff, c.n_embd),
            p + "ffn_down.weight": (c.n_embd, c.n_ff),
        })
        qkv_b = {p + "attn_q.bias": (q_rows,), p + "attn_k.bias": (kv_rows,), p + "attn_v.bias": (kv_rows,)}
        (req if c.qkv_bias else opt).update(qkv_b)
        if c.arch == "llama":  # llama.cpp's llama also loads these optional biases
            opt.update({p + "attn_output.bias": (c.n_embd,), p + "ffn_gate.bias": (c.n_ff,),
                        p + "ffn_up.bias": (c.n_ff,), p + "ffn_down.bias": (c.n_embd,)})
    return req, opt


def check_weights(config: ModelConfig, weights: Mapping[str, torch.Tensor], *, source: str = "weights") -> None:
    """Raise :class:`ContractError` for a missing, unexpected or wrongly shaped tensor."""
    req, opt = tensor_shapes(config)
    missing = [n for n in req if n not in weights]
    if missing:
        raise ContractError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unknown = [n for n in weights if n not in req and n not in opt]
    if unknown:
        raise ContractError(f"{source}: unexpected tensor(s) for {config.arch}: {', '.join(unknown[:5])}"
                            " (llama.cpp refuses files with tensors it does not use)")
    for n, t in weights.items():
        want = req.get(n, opt.get(n))
        if tuple(t.shape) != want:
            raise ContractError(f"{source}: tensor {n} has shape {tuple(t.shape)}, expected {want}")


# --------------------------------------------------------------------------------------------------
# forward


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float, *, neox: bool, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, T, H, D] at positions 0..T-1 (or ``pos`` [B, T]), as ggml_rope_ext (no scaling).

    NORM (llama): pairs (2i, 2i+1). NEOX (qwen2): pairs (i, i + D/2). Frequency of pair i: theta^(-2i/D).
    """
    B, T, H, D = x.shape
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)  # [D/2]
    p = torch.arange(T, dtype=torch.float64, device=x.device)[None] if pos is None else pos.to(x.device, torch.float64)
    ang = p[..., None] * inv  # [1 or B, T, D/2]
    cos = ang.cos().to(x.dtype)[:, :, None, :]
    sin = ang.sin().to(x.dtype)[:, :, None, :]
    if neox:
        x0, x1 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    xp = x.reshape(B, T, H, D // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(B, T, H, D)


def _lora_key(name: str) -> str:
    return name if name.endswith(".weight") else name + ".weight"


def _q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` through Q8_0 along its last dimension (blocks of 32), as ggml-cpu quantizes a Q8_0 matmul's input
    (``quantize_row_q8_0``: scale amax/127 stored as F16, values x * (127/amax) rounded half to even, in F32)."""
    blocks = x.detach().to(torch.float32).reshape(-1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)  # torch.round: half to even, like _mm256_round_ps / vcvtnq
    d = (amax / 127.0).to(torch.float16).to(torch.float32)
    return (q * d).reshape(x.shape).to(x.dtype)


def _lora_delta(x: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, act: str = "") -> torch.Tensor:
    """``B @ A @ x`` as the patched llama.cpp computes a level adapter: for an F16 A ggml-cpu rounds the matmul's
    activations x to F16 before the dot products, for a Q8_0 A (``act="q8_0"``) through Q8_0 (the caller's B
    already holds the runtime's Q8_0 copy, see ``lora.read_adapter``), so the reference does too; B is applied as
    an outer product (``ggml_out_prod``) with A x kept in F32."""
    if act == "q8_0":
        x = _q8_0_round(x)
    elif A.dtype == torch.float16:
        x = x.to(torch.float16).to(x.dtype)
    return (x @ A.to(x.dtype).T) @ Bm.to(x.dtype).T


def linear(x: torch.Tensor, w: Mapping[str, torch.Tensor], name: str,
           lora: LoraMap | None = None, *,
           rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """``x @ W[:rows, :cols].T (+ scale * B[:rows] @ A[:, :cols] x) (+ bias[:rows])`` -- one llama.cpp build_lora_mm.

    ``rows`` keeps a prefix of output rows (and of the bias), ``cols`` a prefix of input columns; ``x`` must
    already have ``cols`` features.
    """
    W = w[name][:rows, :cols]
    y = x @ W.T
    if lora is not None and name in lora:
        A, Bm, scale, *act = lora[name]
        y = y + scale * _lora_delta(x, A[:, :cols], Bm[:rows], *act)
    bias = w.get(name[: -len(".weight")] + ".bias")
    if bias is not None:
        y = y + bias[:rows]
    return y


def attention(config: ModelConfig, w: Mapping[str, torch.Tensor], x: torch.Tensor, il: int, kv: int,
              lora: LoraMap | None = None, *, pos: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA self-attention of layer ``il`` using its first ``kv`` KV heads (and their query groups).

    ``pos`` [B, T] and ``mask`` [B, T, T] (True = may attend) replace positions 0..T-1 and the causal mask, e.g.
    for several sequences packed into one row that share a prefix."""
    c, p = config, f"blk.{il}."
    B, T, _ = x.shape
    hq, d = kv * c.group, c.head_dim
    q = linear(x, w, p + "attn_q.weight", lora, rows=hq * d).view(B, T, hq, d)
    k = linear(x, w, p + "attn_k.weight", lora, rows=kv * d).view(B, T, kv, d)
    v = linear(x, w, p + "attn_v.weight", lora, rows=kv * d).view(B, T, kv, d)
    neox = c.arch == "qwen2"
    q, k = rope(q, c.rope_theta, neox=neox, pos=pos), rope(k, c.rope_theta, neox=neox, pos=pos)
    # query head h reads KV head h // group (ggml broadcasts src0 over contiguous blocks of src1 heads)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(c.group, 1), v.transpose(1, 2).repeat_interleave(c.group, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # [B, hq, T, T]
    allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if mask is None else mask[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, hq * d)
    return linear(out, w, p + "attn_output.weight", lora, cols=hq * d)


def feed_forward(w: Mapping[str, torch.Tensor], x: torch.Tensor, il: int, ff: int,
                 lora: LoraMap | None = None) -> torch.Tensor:
    """SwiGLU FFN of layer ``il`` using its first ``ff`` neurons: down(silu(gate(x)) * up(x))."""
    p = f"blk.{il}."
    h = F.silu(linear(x, w, p + "ffn_gate.weight", lora, rows=ff)) * linear(x, w, p + "ffn_up.weight", lora, rows=ff)
    return linear(h, w, p + "ffn_down.weight", lora, cols=ff)


def check_widths(config: ModelConfig, widths: Sequence[tuple[int, int]] | contract.Level | None) -> list[tuple[int, int]]:
    """Normalize ``widths`` (None = full, a Level, or per-layer (kv, ff)) and check the width rules."""
    if widths is None:
        return config.full_widths()
    if isinstance(widths, contract.Level):
        widths = level_widths(widths)
    out = [(int(kv), int(ff)) for kv, ff in widths]
    if len(out) != config.n_layer:
        raise ContractError(f"widths has {len(out)} entries, expected n_layer = {config.n_layer}")
    for il, (kv, ff) in enumerate(out):
        if not 0 <= kv <= config.n_head_kv:
            raise ContractError(f"layer {il}: kv width {kv} outside [0, {config.n_head_kv}]")
        if not 0 <= ff <= config.n_ff:
            raise ContractError(f"layer {il}: ffn width {ff} outside [0, {config.n_ff}]")
    return out


def forward(config: ModelConfig, weights: Mapping[str, torch.Tensor], tokens: torch.Tensor, *,
            widths: Sequence[tuple[int, int]] | contract.Level | None = None,
            lora: LoraMap | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits ``[..., T, n_vocab]`` for ``tokens`` ([T] or [B, T]) at positions 0..T-1.

    ``widths[il] = (kv, ff)`` runs layer ``il`` on the first ``kv`` KV heads and ``ff`` FFN neurons (0 skips the
    block: the residual passes through), as the patched llama.cpp does with prefix views. ``lora[name] =
    (A [r, in], B [out, r], scale[, act])`` adds ``scale * B @ A @ x`` to weight ``name`` (sliced like the weight;
    ``act`` models ggml's rounding of x for the adapter's storage, see ``_lora_delta``).
    Everything is computed in ``dtype`` (float64 for tight comparisons); the logits come back in ``dtype``.
    """
    c = config
    layer_widths = check_widths(c, widths)
    w = {k: v.to(dtype) for k, v in weights.items()}
    if lora is not None:
        lora = {_lora_key(k): v for k, v in lora.items()}
    squeeze = tokens.dim() == 1
    tok = tokens[None] if squeeze else tokens
    x = w["token_embd.weight"][tok.long()]  # [B, T, n_embd]
    for il, (kv, ff) in enumerate(layer_widths):
        if kv > 0:
            x = x + attention(c, w, rms_norm(x, w[f"blk.{il}.attn_norm.weight"], c.rms_eps), il, kv, lora)
        if ff > 0:
            x = x + feed_forward(w, rms_norm(x, w[f"blk.{il}.ffn_norm.weight"], c.rms_eps), il, ff, lora)
    x = rms_norm(x, w["output_norm.weight"], c.rms_eps)
    head = "output.weight" if "output.weight" in w else "token_embd.weight"
    logits = x @ w[head].T
    if lora is not None and "output.weight" in lora:
        A, Bm, scale, *act = lora["output.weight"]
        logits = logits + scale * _lora_delta(x, A, Bm, *act)
    if "output.bias" in w:
        logits = logits + w["output.bias"]
    return logits[0] if squeeze else logits


# --------------------------------------------------------------------------------------------------
# GGUF reading


@dataclass
class GGUFSource:
    """What a GGUF held besides tensors: carried into files written from it (tokenizer, chat template, general.*)."""

    path: str
    fields: dict[str, object]
    field_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = field(default_factory=dict)
    tensor_types: dict[str, int] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", ""))


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A GGUFReader, with one clear :class:`ContractError` for files that are truncated or not GGUF at all."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        raise ContractError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ContractError(f"{path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                                f"past the end of the file ({size} bytes): truncated file")
    return reader


def reader_field_types(reader: gguf.GGUFReader) -> dict[str, tuple[GGUFValueType, GGUFValueType | None]]:
    """key -> (type, element type for arrays else None) of every KV pair."""
    out: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        main = f.types[0]
        out[name] = (main, f.types[-1] if main == VT.ARRAY else None)
    return out


def source_kv(reader: gguf.GGUFReader) -> list[KV]:
    """Every KV pair of a reader as (key, value, type, sub_type), in file order, ready for GGUFWriter."""
    types = reader_field_types(reader)
    return [(k, f.contents(), *types[k]) for k, f in reader.fields.items() if k in types]


def dequantize_tensor(t: gguf.ReaderTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reader tensor as a torch tensor of shape (ne1, ne0) (or (ne0,)), dequantized like ggml does."""
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ContractError(f"tensor {t.name}: gguf-py cannot dequantize type {t.tensor_type.name}") from e
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).to(dtype)


def config_from_fields(fields: Mapping[str, object], tensor_names: Iterable[str], *, n_vocab: int,
                       source: str = "model") -> ModelConfig:
    """ModelConfig from a GGUF's keys; refuses what :func:`forward` would compute differently from llama.cpp."""
    arch = str(fields.get("general.architecture", ""))
    if arch not in contract.SUPPORTED_ARCHS:
        raise ContractError(f"{source}: architecture {arch!r} is not supported (supported: {', '.join(contract.SUPPORTED_ARCHS)})")
    names = set(tensor_names)
    dims = contract.dims_from_fields(fields, arch, source=source)
    vlen = fields.get(f"{arch}.attention.value_length")
    if vlen is not None and int(vlen) != dims.head_dim:  # type: ignore[call-overload]
        raise ContractError(f"{source}: value_length {vlen} != key_length {dims.head_dim} is not supported")
    rot = fields.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != dims.head_dim:  # type: ignore[call-overload]
        raise ContractError(f"{source}: partial rope (dimension_count {rot} != head_dim {dims.head_dim}) is not supported")
    scaling = str(fields.get(f"{arch}.rope.scaling.type", "none"))
    factor = float(fields.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)  # type: ignore[arg-type]
    if scaling not in ("none", "linear") or factor != 1.0 or "rope_freqs.weight" in names:
        raise ContractError(f"{source}: rope scaling ({scaling}, factor {factor}) is not supported by the reference")
    if f"{arch}.attention.scale" in fields:
        raise ContractError(f"{source}: {arch}.attention.scale is not supported by the reference")
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"
    if eps_key not in fields:
        raise ContractError(f"{source}: missing key {eps_key} (llama.cpp requires it)")
    return ModelConfig(
        arch=arch, n_vocab=n_vocab, n_embd=dims.n_embd, n_layer=dims.n_layer, n_head=dims.n_head,
        n_head_kv=dims.n_head_kv, head_dim=dims.head_dim, n_ff=dims.n_ff,
        rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),  # type: ignore[arg-type]
        rms_eps=float(fields[eps_key]),  # type: ignore[arg-type]
        qkv_bias="blk.0.attn_q.bias" in names,
        tied_embeddings="output.weight" not in names,
        context_length=int(fields.get(f"{arch}.context_length", 2048)),  # type: ignore[call-overload]
    )


def load_gguf(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, Weights, GGUFSource]:
    """Config, dequantized weights (GGUF layout) and the non-tensor content of a llama / qwen2 GGUF."""
    path = os.fspath(path)
    reader = open_gguf(path)
    fields = contract.reader_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ContractError(f"{path}: missing tensor token_embd.weight")
    n_vocab = int(tensors["token_embd.weight"].shape[1])
    config = config_from_fields(fields, tensors, n_vocab=n_vocab, source=path)
    weights = {name: dequantize_tensor(t, dtype) for name, t in tensors.items()}
    check_weights(config, weights, source=path)
    src = GGUFSource(path=path, fields=fields, field_types=reader_field_types(reader),
                     tensor_types={name: int(t.tensor_type) for name, t in tensors.items()})
    logger.info("loaded %s: %s, %d layers, %d tensors", path, config.arch, config.n_layer, len(weights))
    return config, weights, src


# --------------------------------------------------------------------------------------------------
# Hugging Face folders


_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}
_HF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (rotate-half) row order -> llama.cpp NORM-rope row order, per head: llama.cpp's ``LlamaModel.permute``.

    Row ``h*D + t*D/2 + j`` moves to ``h*D + 2j + t``, so the NEOX pair (j, j+D/2) becomes the NORM pair (2j, 2j+1).
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(cfg: Mapping[str, object], *, source: str = "config.json") -> ModelConfig:
    archs = list(cfg.get("architectures") or [])  # type: ignore[call-overload]
    arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
    if arch is None:
        raise ContractError(f"{source}: architectures {archs} not supported (supported: {', '.join(_HF_ARCHS)})")
    rope_params: Mapping[str, object] = cfg.get("rope_parameters") or {}  # type: ignore[assignment]
    scaling = cfg.get("rope_scaling")
    if scaling or rope_params.get("rope_type", "default") != "default":
        raise ContractError(f"{source}: rope scaling {scaling or rope_params} is not supported by the reference")
    if cfg.get("use_sliding_window"):
        raise ContractError(f"{source}: sliding-window attention is not supported")
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])  # type: ignore[call-overload]
    return ModelConfig(
        arch=arch, n_vocab=int(cfg["vocab_size"]), n_embd=n_embd,  # type: ignore[call-overload]
        n_layer=int(cfg["num_hidden_layers"]), n_head=n_head,  # type: ignore[call-overload]
        n_head_kv=int(cfg.get("num_key_value_heads") or n_head),  # type: ignore[call-overload]
        head_dim=int(cfg.get("head_dim") or n_embd // n_head),  # type: ignore[call-overload]
        n_ff=int(cfg["intermediate_size"]),  # type: ignore[call-overload]
        rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta", 10000.0)),  # type: ignore[union-attr,arg-type]
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5)),  # type: ignore[arg-type]
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        context_length=int(cfg.get("max_position_embeddings", 2048)),  # type: ignore[call-overload]
    )


def load_hf(folder: str | os.PathLike[str]) -> tuple[ModelConfig, Weights, None]:
    """Config and weights (GGUF names and layout, fp32) of a HF LlamaForCausalLM / Qwen2ForCausalLM folder.

    Mirrors convert_hf_to_gguf: llama q/k rows are permuted for NORM rope (qwen2 keeps NEOX order), a tied
    ``lm_head`` is dropped. No tokenizer is read (pass ``source=`` or ``extra_kv=`` to :func:`write_gguf`).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    config = hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")
    weights: Weights = {}
    for f in files:
        for hf_name, t in load_file(str(f)).items():
            m = layer_re.fullmatch(hf_name)
            if m and m.group(2) in _HF_LAYER:
                name = f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
            elif hf_name in _HF_GLOBAL:
                name = _HF_GLOBAL[hf_name]
            elif hf_name.endswith("rotary_emb.inv_freq"):
                continue
            else:
                raise ContractError(f"{f}: unexpected tensor {hf_name}")
            weights[name] = t.to(torch.float32)
    if config.tied_embeddings:
        weights.pop("output.weight", None)
    if config.arch == "llama":
        for name in list(weights):
            if ".attn_q." in name:
                weights[name] = permute_rope_rows(weights[name], config.n_head)
            elif ".attn_k." in name:
                weights[name] = permute_rope_rows(weights[name], config.n_head_kv)
    check_weights(config, weights, source=str(folder))
    return config, weights, None


# --------------------------------------------------------------------------------------------------
# GGUF writing


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


@contextmanager
def atomic_output(dst: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Iterator[str]:
    """Yield a temp path next to ``dst``; on success it replaces ``dst``, on any error it is removed.

    A reader memory-maps its input, so writing over an input would corrupt the data being read: refused.
    """
    dst = os.fspath(dst)
    for src in inputs:
        if src is not None and _same_file(os.fspath(src), dst):
            raise ContractError(f"refusing to write {dst}: it is an input of this operation")
    directory = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def hparam_kv(config: ModelConfig, arch: str | None = None) -> list[KV]:
    """The ``<arch>.*`` keys llama.cpp reads for a llama / qwen2 decoder (key/value_length always written)."""
    a, c = arch or config.arch, config
    return [
        (f"{a}.block_count", c.n_layer, VT.UINT32, None),
        (f"{a}.context_length", c.context_length, VT.UINT32, None),
        (f"{a}.embedding_length", c.n_embd, VT.UINT32, None),
        (f"{a}.feed_forward_length", c.n_ff, VT.UINT32, None),
        (f"{a}.attention.head_count", c.n_head, VT.UINT32, None),
        (f"{a}.attention.head_count_kv", c.n_head_kv, VT.UINT32, None),
        (f"{a}.attention.key_length", c.head_dim, VT.UINT32, None),
        (f"{a}.attention.value_length", c.head_dim, VT.UINT32, None),
        (f"{a}.rope.dimension_count", c.head_dim, VT.UINT32, None),
        (f"{a}.rope.freq_base", float(c.rope_theta), VT.FLOAT32, None),
        (f"{a}.attention.layer_norm_rms_epsilon", float(c.rms_eps), VT.FLOAT32, None),
        (f"{a}.vocab_size", c.n_vocab, VT.UINT32, None),
    ]


def _skip_source_key(key: str, src_arch: str) -> bool:
    """Source keys not carried over: file-layout keys, hparams (rewritten from the config), elastic keys."""
    return (key.startswith("GGUF.") or key in ("general.architecture", "general.alignment", "general.file_type",
                                               "general.quantization_version")
            or (bool(src_arch) and key.startswith(src_arch + ".")) or contract.is_elastic_key(key))


def encode_tensor(name: str, t: torch.Tensor, qtype: int) -> np.ndarray:
    """numpy data for GGUFWriter.add_tensor: float32/float16 arrays, or uint8 bytes of a quantized type."""
    qt = QT(qtype)
    arr = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())
    if qt == QT.F32:
        return arr
    if qt == QT.F16:
        return arr.astype(np.float16)
    if qt not in PY_QUANTIZABLE:
        raise ContractError(f"{name}: gguf-py cannot quantize to {qt.name}; write F16 or Q8_0 and convert with "
                            f"llama-quantize (e.g. `llama-quantize in.gguf out.gguf {qt.name}`)")
    bs = contract.block_size(qt)
    if arr.shape[-1] % bs:
        raise ContractError(f"{name}: {arr.shape[-1]} columns is not a multiple of the {qt.name} block size {bs}")
    return gguf.quants.quantize(arr, qt)


def resolve_types(weights: Mapping[str, torch.Tensor], types: Mapping[str, int] | None, default_type: int) -> dict[str, int]:
    """ggml type of every tensor: ``types[name]`` else ``default_type``; 1-D tensors (norms, biases) always F32."""
    types = dict(types or {})
    unknown = [n for n in types if n not in weights]
    if unknown:
        raise ContractError(f"types names tensor(s) not in the weights: {', '.join(unknown[:5])}")
    out = {}
    for name, t in weights.items():
        qt = int(types.get(name, default_type))
        out[name] = int(QT.F32) if t.dim() == 1 else qt
    return out


def write_gguf(path: str | os.PathLike[str], config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
               source: GGUFSource | None = None, types: Mapping[str, int] | None = None,
               default_type: int = QT.F32, spec: contract.ElasticSpec | None = None,
               extra_kv: Sequence[KV] = (), name: str | None = None) -> None:
    """Write a GGUF llama.cpp loads, atomically (temp file + rename; never a partial file, never over ``source``).

    Keys: general.* / tokenizer.* / chat template from ``source``; the arch hparams from ``config``; the
    ``elms.*`` keys from ``spec`` (validated against the dims and the written tensor types); then ``extra_kv``,
    which overrides anything before it. Tensors are quantized per ``types`` / ``default_type``.
    """
    path = os.fspath(path)
    check_weights(config, weights, source=path)
    tensor_types = resolve_types(weights, types, default_type)
    if spec is not None:
        contract.validate_levels(spec, config.dims(), tensor_types, source=path)

    kv: dict[str, tuple[object, GGUFValueType, GGUFValueType | None]] = {}
    src_arch = source.arch if source is not None else ""
    src_items = []
    if source is not None:
        for key, value in source.fields.items():
            if _skip_source_key(key, src_arch) or key not in source.field_types:
                continue
            main, sub = source.field_types[key]
            if main == VT.ARRAY and not value:
                logger.warning("%s: dropping empty array key %s (gguf-py cannot write empty arrays)", path, key)
                continue
            src_items.append((key, value, main, sub))
    for key, value, main, sub in src_items:  # general.* first, like convert_hf_to_gguf
        if key.startswith("general."):
            kv[key] = (value, main, sub)
    kv["general.name"] = (name or str(kv.get("general.name", ("elms-model",))[0]), VT.STRING, None)
    for key, value, main, sub in hparam_kv(config):
        kv[key] = (value, main, sub)
    matrix_types = [QT(t) for n, t in tensor_types.items() if weights[n].dim() == 2 and n != "token_embd.weight"]
    main_type = max(set(matrix_types), key=matrix_types.count) if matrix_types else QT.F32
    kv["general.file_type"] = (int(_FILE_TYPE.get(main_type, gguf.LlamaFileType.GUESSED)), VT.UINT32, None)
    kv["general.quantization_version"] = (gguf.GGML_QUANT_VERSION, VT.UINT32, None)
    for key, value, main, sub in src_items:
        if not key.startswith("general."):
            kv[key] = (value, main, sub)
    if spec is not None:
        for key, value, main, sub in contract.spec_kv(spec):
            kv[key] = (value, main, sub)
    for key, value, main, sub in extra_kv:
        kv[key] = (value, main, sub)
    if "tokenizer.ggml.model" not in kv:
        logger.warning("%s: no tokenizer keys; writing tokenizer.ggml.model = 'none' (llama.cpp loads token ids only)", path)
        kv["tokenizer.ggml.model"] = ("none", VT.STRING, None)
    toks = kv.get("tokenizer.ggml.tokens")
    if toks is not None and len(toks[0]) != config.n_vocab:  # type: ignore[arg-type]
        raise ContractError(f"{path}: tokenizer has {len(toks[0])} tokens but token_embd has n_vocab = {config.n_vocab} rows")  # type: ignore[arg-type]

    data = {n: encode_tensor(n, t, tensor_types[n]) for n, t in weights.items()}
    with atomic_output(path, inputs=[source.path if source is not None else None]) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=config.arch)
        try:
            for key, (value, main, sub) in kv.items():
                writer.add_key_value(key, value, main, sub_type=sub)
            for n in _tensor_order(config, data):
                qt = QT(tensor_types[n])
                writer.add_tensor(n, data[n], raw_dtype=qt if data[n].dtype == np.uint8 else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    logger.info("wrote %s (%d tensors, %s)", path, len(data), main_type.name)


def _tensor_order(config: ModelConfig, names: Iterable[str]) -> list[str]:
    """llama.cpp's order: embeddings, output, then block by block."""
    def key(n: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) + 1 if m else 0, n)
    return sorted(names, key=key)


# --------------------------------------------------------------------------------------------------
# tiny models for tests


_TINY_WORDS = ["▁", "▁t", "he", "▁the", "▁a", "in", "er", "▁of", "▁and", "is", "▁is", "on", "▁c"]
TINY_VOCAB_SIZE = 3 + 256 + len(_TINY_WORDS)


def tiny_tokenizer_kv(n_vocab: int | None = None) -> list[KV]:
    """A tiny SentencePiece ("llama") vocabulary llama.cpp can load and tokenize any text with.

    <unk>, <s>, </s>, the 256 byte-fallback tokens <0x00>..<0xFF> (type BYTE), a few words; padded with UNUSED
    tokens up to ``n_vocab`` if given (token_embd must have exactly as many rows as the vocabulary).
    """
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _TINY_WORDS
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * len(_TINY_WORDS)
    scores = [0.0] * 259 + [-float(i + 1) for i in range(len(_TINY_WORDS))]
    n = n_vocab if n_vocab is not None else len(tokens)
    if n < len(tokens):
        raise ContractError(f"the tiny vocabulary needs n_vocab >= {len(tokens)}, got {n}")
    for i in range(len(tokens), n):
        tokens.append(f"<extra_{i}>")
        types.append(T.UNUSED)
        scores.append(-1e4)
    return [
        ("tokenizer.ggml.model", "llama", VT.STRING, None),
        ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.scores", scores, VT.ARRAY, VT.FLOAT32),
        ("tokenizer.ggml.token_type", [int(t) for t in types], VT.ARRAY, VT.INT32),
        ("tokenizer.ggml.bos_token_id", 1, VT.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 2, VT.UINT32, None),
        ("tokenizer.ggml.unknown_token_id", 0, VT.UINT32, None),
        ("tokenizer.ggml.add_bos_token", True, VT.BOOL, None),
        ("tokenizer.ggml.add_eos_token", False, VT.BOOL, None),
    ]


def tiny_config(arch: str = "llama", **overrides: object) -> ModelConfig:
    """A 4-layer, 256-wide model: small enough for unit tests, wide enough for whole Q8_0/Q4_0 blocks."""
    base: dict[str, object] = dict(arch=arch, n_vocab=TINY_VOCAB_SIZE, n_embd=256, n_layer=4, n_head=4, n_head_kv=2,
                                   head_dim=64, n_ff=512, rope_theta=10000.0, rms_eps=1e-5)
    if arch == "qwen2":
        base.update(qkv_bias=True, tied_embeddings=False, rms_eps=1e-6, rope_theta=1000000.0)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def random_weights(config: ModelConfig, seed: int = 0, *, scale: float = 1.0) -> Weights:
    """Deterministic random weights with O(1) activations and logits.

    Matrices ~ N(0, scale^2 / in) keep each block's output at unit scale, so every head and neuron matters and
    logits at different widths differ clearly; norms ~ 1 + N(0, 0.1^2) so a wrong norm is caught; embeddings
    ~ N(0, 4 / n_embd) give logits of std ~2.
    """
    g = torch.Generator().manual_seed(seed)
    shapes, _ = tensor_shapes(config)
    out: Weights = {}
    for name, shape in shapes.items():
        if name in ("token_embd.weight", "output.weight"):
            t = torch.randn(shape, generator=g) * (2.0 / math.sqrt(config.n_embd))
        elif name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (scale / math.sqrt(shape[1]))
        out[name] = t
    return out


def make_tiny_gguf(path: str | os.PathLike[str], *, arch: str = "llama", seed: int = 0,
                   types: Mapping[str, int] | None = None, default_type: int = QT.F32,
                   spec: contract.ElasticSpec | None = None, **config_overrides: object) -> tuple[ModelConfig, Weights]:
    """Write a tiny random model (with :func:`tiny_tokenizer_kv`) to ``path``; returns the unquantized weights."""
    config = tiny_config(arch, **config_overrides)
    weights = random_weights(config, seed)
    write_gguf(path, config, weights, types=types, default_type=default_type, spec=spec,
               extra_kv=tiny_tokenizer_kv(config.n_vocab), name=f"elms-tiny-{arch}")
    return config, weights


__all__ = [
    "ModelConfig", "Weights", "GGUFSource", "level_widths", "tensor_shapes", "check_weights", "check_widths",
    "rms_norm", "rope", "linear", "attention", "feed_forward", "forward",
    "open_gguf", "reader_field_types", "source_kv", "dequantize_tensor", "config_from_fields", "load_gguf",
    "permute_rope_rows", "hf_config", "load_hf", "atomic_output", "hparam_kv", "encode_tensor", "resolve_types",
    "write_gguf", "tiny_tokenizer_kv", "tiny_config", "random_weights", "make_tiny_gguf", "TINY_VOCAB_SIZE",
    "PY_QUANTIZABLE",
]
