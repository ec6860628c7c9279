"""Per-level LoRA adapters as llama.cpp adapter GGUFs.

An adapter of level i is a standard llama.cpp LoRA GGUF (``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, tensors ``<weight>.lora_a`` {in, r} / ``<weight>.lora_b`` {r, out}) with two twists:

* A and B are **zero-padded to the full tensor shapes**: llama.cpp checks adapter shapes against the full
  weights, and the runtime slices A's columns / B's rows exactly like the weight view, so the padding is never
  read (and would contribute nothing if it were);
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


@dataclass
class Adapter:
    """One level's LoRA: ``weights[name] = (A [r, in], B [out, r])`` at full shapes, scale = alpha / r."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    level: int
    ratio: float
    model_id: str

    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))[0].shape[0]

    def as_forward_lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The ``lora=`` argument of :func:`elms_gguf.model.forward`."""
        return {name: (a, b, self.alpha / a.shape[0]) for name, (a, b) in self.weights.items()}


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


def write_adapter(path: str | os.PathLike[str], config: model.ModelConfig, adapter: Adapter) -> None:
    """Write one level's adapter GGUF (F32 A/B, full shapes), atomically."""
    weights = zero_pad(adapter.weights, config)
    with model.atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch=config.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        w.add_string(contract.KEY_ADAPTER_MODEL_ID, adapter.model_id)
        w.add_uint32(contract.KEY_ADAPTER_LEVEL, int(adapter.level))
        w.add_float32(contract.KEY_ADAPTER_RATIO, float(adapter.ratio))
        for name, (a, b) in weights.items():
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.numpy(), dtype=np.float32))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b.numpy(), dtype=np.float32))
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
