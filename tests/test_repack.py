"""Elastic levels on llama.cpp's repacked (interleaved) CPU weights.

Stock llama.cpp repacks Q4_0, Q4_K and IQ4_NL on x86 AVX2 (more types on ARM, tests/test_aarch64.py) into row
groups of 8 and runs them on its fastest kernels. A level reads prefix views of those weights: row prefixes of whole
row groups and column prefixes of whole blocks, computed by the stock kernels one row group at a time
(patches/0006). The reference is the physically truncated GGUF of the level's widths, loaded by the same library
with stock defaults, i.e. repacked too: logits must be identical bit for bit.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from gguf import GGMLQuantizationType as QT

from elms_gguf import contract, lora, model, truncate
from elms_gguf.contract import ElasticSpec, Level

from conftest import TinyModel, tiny_anchor_spec
from runtime_helpers import logits_of, open_llm, quantize, require_runtime, run_logits

ROOT = Path(__file__).resolve().parents[1]
REPACKED = "CPU_REPACK model buffer size"


def _anchor_spec_kquant(config: model.ModelConfig) -> ElasticSpec:
    """Per-layer widths whose column prefixes are whole 256-blocks (head_dim 128: one KV group = 256 columns of
    attn_output; FFN widths 0/256/512): a full anchor, a sliced layer, skipped blocks."""
    n, kv, ff = config.n_layer, config.n_head_kv, config.n_ff
    lv0 = Level(0.4, [kv, 1] + [0] * (n - 3) + [kv], [ff, 256] + [0] * (n - 3) + [ff])
    lv1 = Level(0.7, [kv] + [1] * (n - 2) + [kv], [ff] + [256] * (n - 2) + [ff])
    full = Level(1.0, [kv] * n, [ff] * n)
    for lv in (lv0, lv1, full):
        lv.achieved_ratio = round(contract.level_ratio(config.dims(), lv), 6)
    return ElasticSpec(levels=[lv0, lv1, full], anchors=[0, n - 1], model_id="tiny-kquant")


@pytest.fixture(scope="session")
def repack_files(tmp_path_factory) -> dict[str, TinyModel]:
    """qtype -> elastic GGUF with per-layer widths and skipped blocks (its weights before quantization)."""
    require_runtime()
    d = tmp_path_factory.mktemp("repack")
    out: dict[str, TinyModel] = {}
    spec = tiny_anchor_spec(model.tiny_config("llama"))
    cfg, w = model.make_tiny_gguf(d / "q4_0.gguf", spec=spec, default_type=QT.Q4_0)
    out["q4_0"] = TinyModel(d / "q4_0.gguf", cfg, w, spec, QT.Q4_0)
    cfg, w = model.make_tiny_gguf(d / "f16.gguf", spec=spec, default_type=QT.F16)
    out["iq4_nl"] = TinyModel(quantize(d / "f16.gguf", d / "iq4_nl.gguf", "IQ4_NL"), cfg, w, spec, QT.IQ4_NL)
    spec = _anchor_spec_kquant(model.tiny_config("llama", head_dim=128))
    cfg, w = model.make_tiny_gguf(d / "f16-128.gguf", spec=spec, default_type=QT.F16, head_dim=128)
    out["q4_k_m"] = TinyModel(quantize(d / "f16-128.gguf", d / "q4_k_m.gguf", "Q4_K_M"), cfg, w, spec, QT.Q4_K)
    return out


def _load_log(path: Path, **kwargs) -> str:
    llm = open_llm(path, **kwargs)
    try:
        return llm.load_log
    finally:
        llm.close()


@pytest.mark.parametrize("qtype", ["q4_0", "iq4_nl", "q4_k_m"])
def test_every_level_on_repacked_weights_is_bit_identical_to_the_repacked_truncated_gguf(repack_files, qtype,
                                                                                       tmp_path):
    path, spec = repack_files[qtype].path, repack_files[qtype].spec
    assert REPACKED in _load_log(path), "the elastic file must load repacked on this CPU (AVX2)"
    for i in range(len(spec.levels)):
        trunc = tmp_path / f"trunc{i}.gguf"
        truncate.export_static(path, trunc, i)
        assert REPACKED in _load_log(trunc)  # the reference runs the stock repacked kernels too
        ref, ref_tokens = logits_of(trunc)
        got, tokens = logits_of(path, level=i)
        assert tokens == ref_tokens, f"level {i}"
        np.testing.assert_array_equal(got, ref, err_msg=f"{qtype} level {i}")
    dense, _ = logits_of(path)
    assert np.abs(dense - logits_of(path, level=0)[0]).max() > 1e-2, "control: level 0 must differ from dense"


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k_m"])
def test_no_level_is_bit_identical_to_the_plain_copy_with_repack_on_and_off(repack_files, qtype, tmp_path):
    path, spec = repack_files[qtype].path, repack_files[qtype].spec
    plain = tmp_path / "plain.gguf"
    truncate.strip_elastic(path, plain)
    for repack in (True, False):
        ref, ref_tokens = logits_of(plain, repack=repack)
        got, tokens = logits_of(path, repack=repack)
        full, _ = logits_of(path, level=len(spec.levels) - 1, repack=repack)
        assert tokens == ref_tokens
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(full, ref)
    assert REPACKED not in _load_log(path, repack=False)


def test_switching_levels_on_repacked_weights_matches_fresh_processes(repack_files):
    path = repack_files["q4_0"].path
    fresh = {lvl: logits_of(path, level=lvl)[0] for lvl in (-1, 0, 1, 2)}
    llm = open_llm(path)
    try:
        for lvl in (0, 2, 1, 0, -1, 1, -1, 0):
            llm.set_level(lvl)
            np.testing.assert_array_equal(run_logits(llm)[0], fresh[lvl], err_msg=f"level {lvl}")
    finally:
        llm.close()


def test_level_lora_on_repacked_weights_is_bit_identical_to_the_truncated_gguf_running_the_same_adapter(tmp_path):
    """Level 0 (half the KV heads and FFN) with its compact adapter, on prefix views of repacked weights, against
    the truncated GGUF of level 0 given a one-level table (its full width) that runs the same adapter file: same
    adapter graph, weights cut physically and repacked by the stock loader."""
    cfg = model.tiny_config("llama")
    n, d = cfg.n_layer, cfg.dims()
    spec = ElasticSpec(levels=[contract.uniform_level(d, 0.5, 1, 256), contract.uniform_level(d, 1.0, d.n_head_kv, d.n_ff)],
                       model_id="tiny-lora-repack")
    base = tmp_path / "base.gguf"
    model.make_tiny_gguf(base, spec=spec, default_type=QT.Q4_0)
    ad_path = tmp_path / "level0.lora.gguf"
    ad = lora.random_adapter(cfg, level=0, ratio=0.5, model_id=spec.model_id, seed=3)
    lora.write_adapter(ad_path, cfg, ad, dtype="f16", level=spec.levels[0])
    elastic = tmp_path / "elastic.gguf"
    lora.rewrite_spec(base, elastic, lora.attach_adapters(spec, {0: str(ad_path)}, model_dir=str(tmp_path)))
    plain_trunc = tmp_path / "trunc-plain.gguf"
    truncate.export_static(base, plain_trunc, 0)
    one = ElasticSpec(levels=[Level(1.0, [1] * n, [256] * n, 1.0)], model_id=spec.model_id)
    trunc = tmp_path / "trunc.gguf"
    lora.rewrite_spec(plain_trunc, trunc, lora.attach_adapters(one, {0: str(ad_path)}, model_dir=str(tmp_path)))
    for f in (elastic, trunc):
        log = _load_log(f)
        assert REPACKED in log and "level 0 (ratio" in log and "LoRA adapter" in log, log[-2000:]
    ref, ref_tokens = logits_of(trunc, level=0)
    got, tokens = logits_of(elastic, level=0)
    assert tokens == ref_tokens
    np.testing.assert_array_equal(got, ref)
    without, _ = logits_of(base, level=0)
    assert np.abs(got - without).max() > 1e-2, "control: the adapter must change the level's logits"


def test_a_width_the_repacked_layout_cannot_view_falls_back_to_the_plain_layout_for_that_tensor_only(tmp_path):
    """FFN width 36 (ffn_down F16, so any width is whole blocks): 36 rows of ffn_gate/ffn_up are not whole groups
    of 8 (x86) or 4 (ARM). Those two weights per sliced layer stay in plain memory; everything else repacks."""
    cfg = model.tiny_config("llama")
    n, kv, ff = cfg.n_layer, cfg.n_head_kv, cfg.n_ff
    spec = ElasticSpec(levels=[Level(0.6, [kv] + [1] * (n - 1), [ff] + [36] * (n - 1)), Level(1.0, [kv] * n, [ff] * n)],
                       model_id="tiny-fallback")
    types = {f"blk.{il}.ffn_down.weight": QT.F16 for il in range(n)}
    path = tmp_path / "fallback.gguf"
    model.make_tiny_gguf(path, spec=spec, default_type=QT.Q4_0, types=types)
    reader = model.open_gguf(path)
    slow = contract.repack_slow_views(spec, cfg.dims(), {t.name: int(t.tensor_type) for t in reader.tensors})
    del reader
    assert sorted(slow) == sorted(f"level 0 layer {il}: {k} keeps 36 rows, not whole groups of 16"
                                  for il in range(1, n) for k in ("ffn_gate", "ffn_up"))
    log = _load_log(path)
    assert REPACKED in log
    for il in range(1, n):
        for name in ("ffn_gate", "ffn_up"):
            assert f"elastic weight blk.{il}.{name}.weight not placed in CPU_REPACK" in log, log[-3000:]
    assert "blk.0.ffn_gate.weight not placed" not in log  # layer 0 is never sliced: repacked as stock does
    assert "attn_q.weight not placed" not in log  # 64-row KV groups are whole row groups
    trunc = tmp_path / "trunc.gguf"
    truncate.export_static(path, trunc, 0)
    ref, ref_tokens = logits_of(trunc)
    got, tokens = logits_of(path, level=0)
    assert tokens == ref_tokens
    np.testing.assert_array_equal(got, ref)


def test_ggml_cpu_prefix_views_of_every_repacked_type_match_truncated_weights():
    """tests/native/repack_views.cpp against this machine's libggml-cpu: column, row and both-way prefix views,
    1-8 tokens (gemv and gemm kernels); on x86 AVX2 Q4_0, Q4_K and IQ4_NL repack (8x8)."""
    require_runtime()
    build = subprocess.run([str(ROOT / "tools" / "build_repack_views.sh")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    r = subprocess.run([build.stdout.strip().splitlines()[-1]], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0 and "repack_views: OK" in r.stdout, r.stdout + r.stderr[-2000:]
    repacked = [ln for ln in r.stdout.splitlines() if "products bit-identical" in ln]
    assert repacked, "no type is repacked on this CPU: nothing was compared"
    if "avx2" in Path("/proc/cpuinfo").read_text():
        for kernel in ("q4_0_8x8", "q4_K_8x8", "iq4_nl_8x8"):
            assert any(kernel in ln for ln in repacked), r.stdout
