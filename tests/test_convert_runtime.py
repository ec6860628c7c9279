"""elms-convert output through llama.cpp (issue 3 x issue 2).

* the converted file still runs as the dense model (reordering preserves the function) and stock llama.cpp
  loads it as such;
* every level in the patched runtime matches the PyTorch forward of the sliced (reordered) model;
* every level equals its own ``--export-static`` file: bit for bit when the widths are uniform (stock llama
  graph), within float tolerance for per-layer widths (exported as llama.cpp's ``deci`` architecture).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elms_gguf import convert, model, truncate

from runtime_helpers import GGML_TYPE_F32, logits_of, open_llm, require_runtime, run_logits

pytestmark = pytest.mark.usefixtures("runtime")


@pytest.fixture(scope="module")
def runtime() -> None:
    require_runtime()


def _close(got: np.ndarray, ref: np.ndarray, rtol: float = 2e-4) -> None:
    err, scale = np.abs(got - ref).max(), np.abs(ref).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x {scale:.3g}"


@pytest.fixture(scope="module")
def converted_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "elastic-f32.gguf"
    result, config, weights = convert.make_tiny_elastic(path, outtype="f32", levels=(0.4, 0.6, 0.8, 1.0), anchors=1)
    return path, result, config, weights


def test_converted_model_at_full_width_computes_the_original_model(converted_f32):
    path, result, config, weights = converted_f32
    src = path.with_name(path.stem + ".src.gguf")
    kw = dict(flash_attn=False, type_kv=GGML_TYPE_F32)
    ref, tokens = logits_of(src, **kw)
    for level in (None, len(result.spec.levels) - 1):
        got, t = logits_of(path, level=level, **kw)
        assert t == tokens
        _close(got, ref, 1e-4)


def test_stock_loader_runs_the_converted_file_as_the_dense_model(converted_f32, tmp_path):
    path = converted_f32[0]
    plain = tmp_path / "plain.gguf"
    truncate.strip_elastic(path, plain)
    np.testing.assert_array_equal(logits_of(plain)[0], logits_of(path)[0])


def test_every_converted_level_matches_the_pytorch_sliced_model(converted_f32):
    path, result, _, _ = converted_f32
    cfg, w, _ = model.load_gguf(path)
    llm = open_llm(path, flash_attn=False, type_kv=GGML_TYPE_F32)
    try:
        for i, level in enumerate(result.spec.levels):
            llm.set_level(i)
            got, tokens = run_logits(llm)
            with torch.no_grad():
                ref = model.forward(cfg, w, torch.tensor(tokens), widths=level, dtype=torch.float64).numpy()
            _close(got, ref)
    finally:
        llm.close()


def test_uniform_levels_equal_their_export_static_file_bit_for_bit(tmp_path):
    path = tmp_path / "uniform-q8_0.gguf"
    result, _, _ = convert.make_tiny_elastic(path, outtype="q8_0", levels=(0.5, 1.0), allocation="uniform", anchors=0)
    level = result.spec.levels[0]
    assert len(set(level.head_count_kv)) == 1 and len(set(level.feed_forward_length)) == 1
    static = tmp_path / "static.gguf"
    truncate.export_static(path, static, 0)
    np.testing.assert_array_equal(logits_of(path, level=0)[0], logits_of(static)[0])


def test_per_layer_levels_equal_their_export_static_file(converted_f32, tmp_path):
    path, result, _, _ = converted_f32
    kw = dict(flash_attn=False, type_kv=GGML_TYPE_F32)
    for i, level in enumerate(result.spec.levels[:-1]):
        static = tmp_path / f"static{i}.gguf"
        truncate.export_static(path, static, i)
        got, tokens = logits_of(path, level=i, **kw)
        ref, t = logits_of(static, **kw)
        assert t == tokens
        _close(got, ref, 1e-4)
