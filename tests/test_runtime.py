"""The patched llama.cpp runs any level of one elastic GGUF through zero-copy views (issue 2).

References, independent of the code under test:
* a plain copy of the file with the elms.* keys removed (the stock code path) -- must be bit-identical;
* a physically truncated GGUF of a uniform level (elms_gguf.truncate, stock loader) -- must be bit-identical;
* the PyTorch forward of the sliced model (elms_gguf.model.forward) for per-layer widths, skipped blocks and
  LoRA -- within float32 tolerance.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from elms_gguf import contract, lora, model, truncate
from elms_gguf.contract import ElasticSpec, Level
from gguf import GGMLQuantizationType as QT

from runtime_helpers import (GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q8_0, binary, logits_of, open_llm,
                             quantize, require_runtime, run_logits)

pytestmark = pytest.mark.usefixtures("runtime")


@pytest.fixture(scope="session")
def runtime() -> None:
    require_runtime()


def uniform_spec(config: model.ModelConfig, kv: int, ff: int) -> ElasticSpec:
    d = config.dims()
    spec = ElasticSpec(levels=[contract.uniform_level(d, 0.5, kv, ff), contract.uniform_level(d, 1.0, d.n_head_kv, d.n_ff)],
                       model_id="tiny-uniform")
    for lv in spec.levels:
        lv.achieved_ratio = contract.level_ratio(d, lv)
    return spec


# --------------------------------------------------------------------------------------------------------------
# files


@pytest.fixture(scope="session")
def uniform_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """qtype -> (elastic GGUF with a uniform half-width level 0, truncated GGUF of level 0)."""
    out: dict[str, tuple[Path, Path]] = {}
    d = tmp_path_factory.mktemp("uniform")
    for name, qtype in (("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0)):
        cfg = model.tiny_config("llama")
        spec = uniform_spec(cfg, kv=1, ff=cfg.n_ff // 2)
        path = d / f"elastic-{name}.gguf"
        model.make_tiny_gguf(path, spec=spec, default_type=qtype)
        out[name] = (path, d / f"trunc-{name}.gguf")
        truncate.export_static(path, out[name][1], 0)
    # K-quant mix through llama-quantize: head_dim 128 so that one KV group (2 q-heads) is 256 columns of attn_output
    cfg = model.tiny_config("llama", head_dim=128)
    spec = uniform_spec(cfg, kv=1, ff=256)
    f16 = d / "elastic-f16.gguf"
    model.make_tiny_gguf(f16, spec=spec, default_type=QT.F16, head_dim=128)
    path = quantize(f16, d / "elastic-q4_k_m.gguf", "Q4_K_M")
    out["q4_k_m"] = (path, d / "trunc-q4_k_m.gguf")
    truncate.export_static(path, out["q4_k_m"][1], 0)
    return out


def _spec_copy(tiny) -> ElasticSpec:
    """A fresh copy of a tiny model's level table (no adapters named)."""
    return ElasticSpec(levels=[Level(lv.ratio, list(lv.head_count_kv), list(lv.feed_forward_length), lv.achieved_ratio)
                               for lv in tiny.spec.levels], anchors=tiny.spec.anchors, model_id=tiny.spec.model_id)


def _with_level0_adapter(tiny, adapter: lora.Adapter, work: Path, *, dtype: str = "f16") -> tuple[Path, Path]:
    """A copy of the tiny elastic model whose level 0 runs ``adapter`` (written compact as ``dtype``):
    (model path, adapter path)."""
    spec = _spec_copy(tiny)
    work.mkdir(exist_ok=True)
    ad = work / "m.level0.lora.gguf"
    lora.write_adapter(ad, tiny.config, adapter, dtype=dtype, level=spec.levels[0])
    lora.attach_adapters(spec, {0: str(ad)}, model_dir=str(work))
    model.write_gguf(work / "m.gguf", tiny.config, tiny.weights, spec=spec,
                     extra_kv=model.tiny_tokenizer_kv(tiny.config.n_vocab))
    return work / "m.gguf", ad


@pytest.fixture(scope="session")
def lora_model(tmp_path_factory, tiny_elastic_llama) -> tuple[Path, list[lora.Adapter]]:
    """The tiny anchored elastic llama (F32) with a random adapter (F16, compact) for levels 0 and 1."""
    d = tmp_path_factory.mktemp("lora")
    cfg, w = tiny_elastic_llama.config, tiny_elastic_llama.weights
    spec = _spec_copy(tiny_elastic_llama)
    adapters = [lora.random_adapter(cfg, level=i, ratio=spec.levels[i].ratio, model_id=spec.model_id, seed=10 + i)
                for i in (0, 1)]
    paths = {}
    for ad in adapters:
        paths[ad.level] = d / f"tiny-level{ad.level}.lora.gguf"
        lora.write_adapter(paths[ad.level], cfg, ad, dtype="f16", level=spec.levels[ad.level])
    lora.attach_adapters(spec, paths, model_dir=str(d))
    path = d / "tiny-elastic-lora.gguf"
    model.write_gguf(path, cfg, w, spec=spec, extra_kv=model.tiny_tokenizer_kv(cfg.n_vocab))
    # the references use what the files hold (F16 by default), read back the way the runtime reads them
    return path, [lora.read_adapter(paths[ad.level], config=cfg) for ad in adapters]


# --------------------------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("fixture", ["tiny_elastic_llama", "tiny_elastic_llama_q8"])
def test_no_level_and_full_level_are_bit_identical_to_the_plain_copy(fixture, request, tmp_path):
    tiny = request.getfixturevalue(fixture)
    plain = tmp_path / "plain.gguf"
    truncate.strip_elastic(tiny.path, plain)
    ref, ref_tokens = logits_of(plain)
    no_level, t1 = logits_of(tiny.path)
    full_level, t2 = logits_of(tiny.path, level=len(tiny.spec.levels) - 1)
    assert ref_tokens == t1 == t2
    np.testing.assert_array_equal(no_level, ref)
    np.testing.assert_array_equal(full_level, ref)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k_m"])
@pytest.mark.parametrize("flash_attn,type_kv", [(True, GGML_TYPE_F16), (False, GGML_TYPE_F16), (True, GGML_TYPE_Q8_0)],
                         ids=["fa-f16", "nofa-f16", "fa-q8_0"])
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "noreuse"])
def test_uniform_level_is_bit_identical_to_the_truncated_gguf(uniform_files, qtype, flash_attn, type_kv, reuse):
    elastic, truncated = uniform_files[qtype]
    kw = dict(flash_attn=flash_attn, type_kv=type_kv, reuse=reuse)
    ref, ref_tokens = logits_of(truncated, **kw)
    got, tokens = logits_of(elastic, level=0, **kw)
    assert tokens == ref_tokens
    np.testing.assert_array_equal(got, ref)
    dense, _ = logits_of(elastic, **kw)
    assert np.abs(dense - ref).max() > 1e-2, "control: the level must differ from the dense model"


def test_k_quant_fixture_really_is_a_k_quant_mix(uniform_files):
    from elms_gguf.model import open_gguf

    types = {t.name: t.tensor_type for t in open_gguf(uniform_files["q4_k_m"][0]).tensors}
    assert {QT.Q4_K, QT.Q6_K} <= set(types.values())


def _torch_logits(tiny, tokens, level: Level | None, lora_=None) -> np.ndarray:
    widths = model.level_widths(level) if level is not None else None
    with torch.no_grad():
        out = model.forward(tiny.config, tiny.weights, torch.tensor(tokens), widths=widths, lora=lora_,
                            dtype=torch.float64)
    return out.numpy()


def _assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = 2e-4) -> None:
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x max |logit| {scale:.3g}"


@pytest.mark.parametrize("fixture", ["tiny_elastic_llama", "tiny_elastic_qwen2"])
def test_every_level_matches_the_pytorch_forward_of_the_sliced_model(fixture, request):
    """Per-layer widths, full-width anchors and skipped blocks (llama), q/k/v biases and untied head (qwen2)."""
    tiny = request.getfixturevalue(fixture)
    llm = open_llm(tiny.path, flash_attn=False, type_kv=GGML_TYPE_F32)
    try:
        for i, level in enumerate(tiny.spec.levels):
            llm.set_level(i)
            got, tokens = run_logits(llm)
            _assert_close(got, _torch_logits(tiny, tokens, level))
        llm.set_level(-1)
        got, tokens = run_logits(llm)
        _assert_close(got, _torch_logits(tiny, tokens, None))
    finally:
        llm.close()


def test_anchor_fixture_really_skips_blocks(tiny_elastic_llama):
    lv = tiny_elastic_llama.spec.levels[0]
    assert 0 in lv.head_count_kv and 0 in lv.feed_forward_length
    assert lv.head_count_kv[0] == tiny_elastic_llama.config.n_head_kv  # anchors stay full


def test_switching_levels_back_and_forth_matches_fresh_processes(tiny_elastic_llama_q8):
    path = tiny_elastic_llama_q8.path
    fresh = {lvl: logits_of(path, level=lvl)[0] for lvl in (-1, 0, 1, 2)}
    llm = open_llm(path)
    try:
        for lvl in (0, 2, 1, 0, -1, 1, -1):
            llm.set_level(lvl)
            assert llm.level == lvl
            np.testing.assert_array_equal(run_logits(llm)[0], fresh[lvl])
    finally:
        llm.close()
    assert np.abs(fresh[0] - fresh[1]).max() > 1e-2


def test_set_ratio_picks_the_nearest_level(tiny_elastic_llama_q8):
    llm = open_llm(tiny_elastic_llama_q8.path)
    try:
        ratios = [lv.ratio for lv in llm.levels]
        assert ratios == pytest.approx([0.4, 0.7, 1.0, 1.0])
        assert llm.set_ratio(0.45) == 0 and llm.level == 0
        assert llm.set_ratio(0.69) == 1 and llm.ratio == pytest.approx(0.7)
        assert llm.set_ratio(1.0) == 2  # a full-width level wins the tie with the dense model
        for bad in (0.0, -0.5, 1.5, "abc"):
            with pytest.raises(contract.ContractError):
                llm.set_ratio(bad)
    finally:
        llm.close()


def test_dense_gguf_works_through_elastic_llama(tiny_llama):
    llm = open_llm(tiny_llama.path)
    try:
        assert llm.n_levels == 0 and llm.levels[-1].index == -1
        assert llm.set_ratio(1.0) == -1
        from elms_gguf.runtime import ElasticError
        with pytest.raises(ElasticError, match="not an elastic model"):
            llm.set_ratio(0.5)
        out = llm.create_completion("hello", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["text"] is not None
    finally:
        llm.close()


def test_importing_the_converter_leaves_openmp_spinning_and_only_its_cli_makes_it_sleep():
    # llama.cpp waits on an OpenMP barrier at every graph node: a serving or benchmark process that imports the
    # converter (bench_slo imports it through bench_quality) must not inherit OMP_WAIT_POLICY=PASSIVE, which
    # halves decode speed. The torch-heavy CLIs still get it, before torch loads libgomp.
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys, elms_gguf.convert, elms_gguf.train_lora, elms_gguf.serve\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n"
            "from elms_gguf import cli\n"
            "for entry in (cli.convert, cli.train_lora):\n"
            "    sys.argv = ['x', '--help']\n"
            "    try:\n"
            "        entry()\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "None"
    assert out.stdout.splitlines()[-1] == "PASSIVE"
    # ... and the entry points' module loads no OpenMP runtime itself, so the policy they set can still take effect
    out = subprocess.run([sys.executable, "-c", "import elms_gguf.cli\n"
                          "print(any('libgomp' in line for line in open('/proc/self/maps')))"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    for module in ("convert", "train_lora"):  # `python -m elms_gguf.<module>` sets it too, before torch loads
        out = subprocess.run([sys.executable, "-c", f"import runpy, sys, os; sys.argv = ['x', '--help']\n"
                              f"try:\n    runpy.run_module('elms_gguf.{module}', run_name='__main__')\n"
                              f"except SystemExit:\n    print(os.environ.get('OMP_WAIT_POLICY'))"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.stdout.splitlines()[-1] == "PASSIVE", (module, out.stderr[-2000:])


def test_elastic_llama_warns_once_when_openmp_sleeps(tiny_llama, monkeypatch, caplog):
    from elms_gguf import runtime

    runtime._warn_if_openmp_sleeps.cache_clear()
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with caplog.at_level("WARNING", logger="elms_gguf.runtime"):
        for _ in range(2):
            open_llm(tiny_llama.path).close()
    warned = [r.message for r in caplog.records if "OMP_WAIT_POLICY" in r.message]
    assert len(warned) == 1 and "OMP_WAIT_POLICY=PASSIVE" in warned[0] and "half as fast" in warned[0]
    runtime._warn_if_openmp_sleeps.cache_clear()
    caplog.clear()
    monkeypatch.delenv("OMP_WAIT_POLICY")
    with caplog.at_level("WARNING", logger="elms_gguf.runtime"):
        open_llm(tiny_llama.path).close()
    assert not [r for r in caplog.records if "OMP_WAIT_POLICY" in r.message]


# --------------------------------------------------------------------------------------------------------------
# per-level LoRA


def test_level_lora_matches_merged_weights_in_pytorch_and_switches_with_the_level(lora_model, tiny_elastic_llama):
    path, adapters = lora_model
    levels = tiny_elastic_llama.spec.levels
    llm = open_llm(path, flash_attn=False, type_kv=GGML_TYPE_F32)
    try:
        for i in (0, 1, 0, 2):
            llm.set_level(i)
            got, tokens = run_logits(llm)
            lora_ = adapters[i].as_forward_lora() if i < 2 else None
            ref = _torch_logits(tiny_elastic_llama, tokens, levels[i], lora_)
            _assert_close(got, ref)
            if lora_ is not None:  # control: the adapter really changes the output
                assert np.abs(ref - _torch_logits(tiny_elastic_llama, tokens, levels[i])).max() > 1e-3
    finally:
        llm.close()


def test_f32_adapters_apply_like_f16_ones_at_twice_the_size(lora_model, tiny_elastic_llama, tmp_path):
    """The adapter storage type is the user's choice: an F32 copy of level 0's adapter runs and matches PyTorch too."""
    path, adapters = lora_model
    cfg = tiny_elastic_llama.config
    m, f32 = _with_level0_adapter(tiny_elastic_llama, adapters[0], tmp_path, dtype="f32")
    f16 = Path(path).parent / "tiny-level0.lora.gguf"
    assert 1.9 < f32.stat().st_size / f16.stat().st_size < 2.1
    got, tokens = logits_of(m, level=0, flash_attn=False, type_kv=GGML_TYPE_F32)
    as_f32 = lora.read_adapter(f32, config=cfg)  # the same values (F16 -> F32 is exact), now F32 in llama.cpp
    assert all(a.dtype == torch.float32 for a, _ in as_f32.weights.values())
    _assert_close(got, _torch_logits(tiny_elastic_llama, tokens, tiny_elastic_llama.spec.levels[0],
                                     as_f32.as_forward_lora()))
    with pytest.raises(contract.ContractError, match="adapter type 'q4_0' is not supported"):
        lora.write_adapter(tmp_path / "bad.gguf", cfg, adapters[0], dtype="q4_0")
    assert not (tmp_path / "bad.gguf").exists()


def test_q8_0_adapters_keep_a_and_b_in_8_bits_and_match_pytorch(lora_model, tiny_elastic_llama, tmp_path):
    """``q8_0`` stores A as Q8_0 (B stays F16 in the file: its rows are r values); the runtime stores the transposed B
    in Q8_0 too. Logits match PyTorch with ggml's Q8_0 rounding of A's input and of B modelled. Widths that are not
    whole Q8_0 blocks are refused: by the writer for a compact adapter, by the runtime for a padded one."""
    path, adapters = lora_model
    cfg, w = tiny_elastic_llama.config, tiny_elastic_llama.weights
    spec = _spec_copy(tiny_elastic_llama)
    m, q8 = _with_level0_adapter(tiny_elastic_llama, adapters[0], tmp_path, dtype="q8_0")
    types = {t.name.rsplit(".", 1)[1]: t.tensor_type for t in model.open_gguf(q8).tensors}
    assert types == {"lora_a": QT.Q8_0, "lora_b": QT.F16}
    f16 = Path(path).parent / "tiny-level0.lora.gguf"
    assert 0.6 < q8.stat().st_size / f16.stat().st_size < 0.85
    got, tokens = logits_of(m, level=0, flash_attn=False, type_kv=GGML_TYPE_F32)
    back = lora.read_adapter(q8, config=cfg)
    assert back.storage == "q8_0"
    level0 = spec.levels[0]
    # Q8_0 rounds to 1/254 of a block's largest value: where a value sits within float error of a rounding boundary,
    # PyTorch and ggml round it apart, so a few positions differ by ~1e-3 of the logits (float64 and float32
    # references move them around): the bound is 1e-3, and not modelling either rounding lands far outside it
    _assert_close(got, _torch_logits(tiny_elastic_llama, tokens, level0, back.as_forward_lora()), rtol=1e-3)
    no_act = {k: v[:3] for k, v in back.as_forward_lora().items()}
    f16_b = lora.read_adapter(f16, config=cfg).weights
    no_b = {k: (a, f16_b[k][1].float(), sc, *act) for k, (a, b, sc, *act) in back.as_forward_lora().items()}
    for unmodelled in (no_act, no_b):
        with pytest.raises(AssertionError):
            _assert_close(got, _torch_logits(tiny_elastic_llama, tokens, level0, unmodelled), rtol=1e-3)

    # a level that cuts ffn_down's columns inside a Q8_0 block: the compact writer refuses, naming the tensor
    odd = Level(level0.ratio, list(level0.head_count_kv), [f if f in (0, cfg.n_ff) else 48 for f in level0.feed_forward_length])
    with pytest.raises(contract.ContractError, match=r"bad\.gguf: blk\.1\.ffn_down\.weight\.lora_a: 48 columns is not a multiple of the Q8_0 block size 32"):
        lora.write_adapter(tmp_path / "bad.gguf", cfg, adapters[0], dtype="q8_0", level=odd)
    assert not (tmp_path / "bad.gguf").exists()
    # ... and a padded Q8_0 adapter on a model whose level reads 48 of its columns is refused at load
    work = tmp_path / "odd"
    work.mkdir()
    odd_spec = ElasticSpec(levels=[odd] + spec.levels[1:], anchors=spec.anchors, model_id=spec.model_id)
    for lv in odd_spec.levels:
        lv.lora = ""
    odd.achieved_ratio = round(contract.level_ratio(cfg.dims(), odd, qkv_bias=cfg.qkv_bias), 6)
    lora.write_adapter(work / "padded.gguf", cfg, adapters[0], dtype="q8_0")
    lora.attach_adapters(odd_spec, {0: str(work / "padded.gguf")}, model_dir=str(work))
    model.write_gguf(work / "m.gguf", cfg, w, spec=odd_spec, extra_kv=model.tiny_tokenizer_kv(cfg.n_vocab))
    msg = _load_error(work / "m.gguf")
    assert "layer 1: blk.1.ffn_" in msg and "not whole blocks of 32" in msg, msg


def test_adapter_scale_is_folded_into_b_exactly_and_other_scales_still_apply(lora_model, tiny_elastic_llama, tmp_path):
    """The runtime multiplies alpha/r into the (transposed) B at load when that is exact (a power of two): alpha 16
    at rank 8 must give, bit for bit, what alpha 8 (scale 1) with 2 B gives. A scale that is not a power of two
    (alpha 12: 1.5) stays a graph op, and still matches PyTorch."""
    _, adapters = lora_model
    ad = adapters[0]
    assert ad.alpha / ad.rank == 2.0
    doubled = lora.Adapter(weights={k: (a, b * 2) for k, (a, b) in ad.weights.items()}, alpha=float(ad.rank),
                           level=0, ratio=ad.ratio, model_id=ad.model_id)
    odd = lora.Adapter(weights=ad.weights, alpha=12.0, level=0, ratio=ad.ratio, model_id=ad.model_id)
    got, tokens = {}, {}  # the last 3 tokens are greedy: each run is compared on its own
    for name, a in (("folded", ad), ("doubled", doubled), ("odd", odd)):
        got[name], tokens[name] = logits_of(_with_level0_adapter(tiny_elastic_llama, a, tmp_path / name)[0], level=0,
                                            flash_attn=False, type_kv=GGML_TYPE_F32)
    np.testing.assert_array_equal(got["folded"], got["doubled"])
    level0 = tiny_elastic_llama.spec.levels[0]
    _assert_close(got["odd"], _torch_logits(tiny_elastic_llama, tokens["odd"], level0, odd.as_forward_lora()))
    _assert_close(got["folded"], _torch_logits(tiny_elastic_llama, tokens["folded"], level0, ad.as_forward_lora()))
    assert np.abs(got["odd"] - got["folded"]).max() > 1e-3  # the scale is applied, not dropped


def test_level_lora_is_kept_apart_from_no_lora_policy(lora_model, tiny_elastic_llama):
    path, _ = lora_model
    with_lora, _ = logits_of(path, level=0, flash_attn=False, type_kv=GGML_TYPE_F32)
    without, tokens = logits_of(path, level=0, flash_attn=False, type_kv=GGML_TYPE_F32, elms_lora="off")
    _assert_close(without, _torch_logits(tiny_elastic_llama, tokens, tiny_elastic_llama.spec.levels[0]))
    assert np.abs(with_lora - without).max() > 1e-3


def test_padding_beyond_the_active_width_is_never_read(lora_model, tmp_path):
    """A full-shape adapter with junk beyond level 0's widths gives the same logits, bit for bit, as the compact
    adapter of the same values: the runtime slices A/B like the weights, so padding is never read."""
    path, adapters = lora_model
    ref, _ = logits_of(path, level=0)  # the compact adapter
    # rewrite level 0's adapter with junk in the padded region (rows of B / columns of A beyond level 0's widths)
    work = tmp_path / "m"
    work.mkdir()
    cfg = model.tiny_config("llama")
    lv = model.load_gguf(path)[2].fields
    spec = contract.read_spec(lv)
    widths = model.level_widths(spec.levels[0])
    junk = {}
    for name, (a, b) in adapters[0].weights.items():
        il = int(name.split(".")[1])
        kv, ff = widths[il]
        a, b = a.clone(), b.clone()
        kind = name.split(".")[2]
        g = torch.Generator().manual_seed(il)
        if kind in ("attn_q",):
            b[kv * cfg.group * cfg.head_dim:] = torch.randn(b[kv * cfg.group * cfg.head_dim:].shape, generator=g)
        elif kind in ("attn_k", "attn_v"):
            b[kv * cfg.head_dim:] = torch.randn(b[kv * cfg.head_dim:].shape, generator=g)
        elif kind == "attn_output":
            a[:, kv * cfg.group * cfg.head_dim:] = torch.randn(a[:, kv * cfg.group * cfg.head_dim:].shape, generator=g)
        elif kind in ("ffn_gate", "ffn_up"):
            b[ff:] = torch.randn(b[ff:].shape, generator=g)
        elif kind == "ffn_down":
            a[:, ff:] = torch.randn(a[:, ff:].shape, generator=g)
        junk[name] = (a, b)
    ad = lora.Adapter(weights=junk, alpha=adapters[0].alpha, level=0, ratio=adapters[0].ratio,
                      model_id=adapters[0].model_id)
    lora.write_adapter(work / "junk.gguf", cfg, ad)
    w = model.load_gguf(path)[1]
    spec.levels[1].lora = ""
    lora.attach_adapters(spec, {0: str(work / "junk.gguf")}, model_dir=str(work))
    model.write_gguf(work / "model.gguf", cfg, w, spec=spec, extra_kv=model.tiny_tokenizer_kv(cfg.n_vocab))
    got, _ = logits_of(work / "model.gguf", level=0)
    np.testing.assert_array_equal(got, ref)
    compact = Path(path).parent / "tiny-level0.lora.gguf"
    assert compact.stat().st_size < (work / "junk.gguf").stat().st_size


def test_compact_adapter_narrower_than_its_level_is_refused(lora_model, tmp_path):
    """An adapter cut to narrower widths than its level reads is refused at load (and by read_adapter), naming
    the layer and tensor; stock --lora keeps stock rules and refuses a compact adapter as the wrong shape."""
    path, adapters = lora_model
    cfg = model.tiny_config("llama")
    _, w, src = model.load_gguf(path)
    spec = contract.read_spec(src.fields)
    lv0 = spec.levels[0]
    narrow = Level(lv0.ratio, list(lv0.head_count_kv), [f // 2 for f in lv0.feed_forward_length])
    il = next(i for i, f in enumerate(lv0.feed_forward_length) if f > 0)
    ad = tmp_path / "narrow.gguf"
    lora.write_adapter(ad, cfg, adapters[0], level=narrow)
    lora.attach_adapters(spec, {0: str(ad)}, model_dir=str(tmp_path))
    spec.levels[1].lora = ""
    model.write_gguf(tmp_path / "m.gguf", cfg, w, spec=spec, extra_kv=model.tiny_tokenizer_kv(cfg.n_vocab))
    msg = _load_error(tmp_path / "m.gguf")
    assert "elastic level 0" in msg and "does not fit this level" in msg and f"layer {il}: blk.{il}.ffn_" in msg
    with pytest.raises(contract.ContractError, match=rf"blk\.{il}\.ffn_(gate|up|down)\.weight.*do not cover what the level reads"):
        lora.check_level_adapters(tmp_path / "m.gguf", config=cfg)
    plain = tmp_path / "plain.gguf"
    truncate.strip_elastic(path, plain)
    _refused(_completion, plain, "--lora", str(Path(path).parent / "tiny-level0.lora.gguf"), reason="incorrect shape")


# --------------------------------------------------------------------------------------------------------------
# refusals with clear messages


def _write_with_raw_kv(tmp_path: Path, tiny, kv: list, name: str, types: dict | None = None,
                       default_type: int = QT.F32) -> Path:
    """A tiny model whose elms.* keys are written raw (bypassing the Python-side validation)."""
    path = tmp_path / name
    model.write_gguf(path, tiny.config, tiny.weights, default_type=default_type,
                     extra_kv=list(model.tiny_tokenizer_kv(tiny.config.n_vocab)) + kv)
    return path


def _raw_level_kv(ratios, kv_tables, ff_tables):
    import gguf

    VT = gguf.GGUFValueType
    out = [(contract.KEY_VERSION, 1, VT.UINT32, None), (contract.KEY_RATIOS, list(ratios), VT.ARRAY, VT.FLOAT32)]
    for i, (kv, ff) in enumerate(zip(kv_tables, ff_tables)):
        out.append((contract.key_head_count_kv(i), kv, VT.ARRAY, VT.UINT32))
        out.append((contract.key_feed_forward_length(i), ff, VT.ARRAY, VT.UINT32))
    return out


def _load_error(path: Path, **kwargs) -> str:
    from elms_gguf.runtime import ElasticError

    with pytest.raises(ElasticError) as e:
        open_llm(path, **kwargs)
    return str(e.value)


def test_misaligned_width_is_refused_naming_level_layer_and_tensor(tiny_llama, tmp_path):
    n = tiny_llama.config.n_layer
    kv = _raw_level_kv([0.5], [[2] * n], [[512, 48] + [512] * (n - 2)])
    path = _write_with_raw_kv(tmp_path, tiny_llama, kv, "misaligned.gguf", default_type=QT.Q8_0)
    msg = _load_error(path)
    assert "level 0 layer 1" in msg and "blk.1.ffn_down.weight" in msg and "block size 32" in msg


def test_wrong_table_length_is_refused(tiny_llama, tmp_path):
    n = tiny_llama.config.n_layer
    kv = _raw_level_kv([0.5], [[1] * (n - 1)], [[256] * n])
    msg = _load_error(_write_with_raw_kv(tmp_path, tiny_llama, kv, "short.gguf"))
    assert f"elms.level.0.head_count_kv has {n - 1} entries, expected n_layer = {n}" in msg


def test_width_beyond_the_full_size_and_non_nested_levels_are_refused(tiny_llama, tmp_path):
    n = tiny_llama.config.n_layer
    msg = _load_error(_write_with_raw_kv(tmp_path, tiny_llama, _raw_level_kv([0.5], [[3] * n], [[256] * n]), "wide.gguf"))
    assert "level 0 layer 0: head_count_kv 3 exceeds n_head_kv 2" in msg
    kv = _raw_level_kv([0.5, 0.7], [[2] * n, [1] * n], [[256] * n, [256] * n])
    msg = _load_error(_write_with_raw_kv(tmp_path, tiny_llama, kv, "unnested.gguf"))
    assert "levels must be nested" in msg


def test_a_plain_llama_with_default_params_runs_a_level_on_repacked_weights(tmp_path):
    """Q4_0 is repacked on x86 (AVX2): a plain Llama keeps repacking on, and a level runs on the repacked weights
    with the same logits as ElasticLlama's (which repacks too; tests/test_repack.py compares them with stock)."""
    import llama_cpp

    from elms_gguf import runtime

    cfg = model.tiny_config("llama")
    path = tmp_path / "q4_0.gguf"
    model.make_tiny_gguf(path, spec=uniform_spec(cfg, kv=1, ff=256), default_type=QT.Q4_0)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=8, n_ubatch=8, n_threads=1, logits_all=True, verbose=False,
                          flash_attn=True)  # default params: use_extra_bufts = True
    try:
        assert runtime.lib().llama_set_elastic_level(llm._ctx.ctx, 0) == 0, runtime.last_error()
        assert runtime.lib().llama_get_elastic_level(llm._ctx.ctx) == 0
        got, _ = run_logits(llm)
    finally:
        llm.close()
    ref, _ = logits_of(path, level=0)
    np.testing.assert_array_equal(got, ref)


def test_nonexistent_level_is_refused(tiny_elastic_llama_q8):
    from elms_gguf.runtime import ElasticError

    llm = open_llm(tiny_elastic_llama_q8.path)
    try:
        with pytest.raises(ElasticError, match="elastic level 7 does not exist"):
            llm.set_level(7)
    finally:
        llm.close()


@pytest.mark.parametrize("case", ["missing", "corrupt", "other-model", "other-level"])
def test_bad_adapters_are_refused_or_skipped_with_a_flag(case, lora_model, tmp_path):
    path, adapters = lora_model
    cfg = model.tiny_config("llama")
    _, w, src = model.load_gguf(path)
    spec = contract.read_spec(src.fields)
    work = tmp_path / case
    work.mkdir()
    ad = work / "a.gguf"
    if case == "other-model":
        bad = lora.Adapter(adapters[0].weights, 16.0, 0, 0.4, "someone-else")
        lora.write_adapter(ad, cfg, bad)
    elif case == "other-level":
        lora.write_adapter(ad, cfg, adapters[1])
    else:
        lora.write_adapter(ad, cfg, adapters[0])
    lora.attach_adapters(spec, {0: str(ad)}, model_dir=str(work))
    spec.levels[1].lora = ""
    model.write_gguf(work / "m.gguf", cfg, w, spec=spec, extra_kv=model.tiny_tokenizer_kv(cfg.n_vocab))
    if case == "missing":
        ad.unlink()
    elif case == "corrupt":
        data = bytearray(ad.read_bytes())
        data[-5] ^= 0xFF
        ad.write_bytes(bytes(data))
    expect = {"missing": "cannot open", "corrupt": "is corrupt or was replaced",
              "other-model": "was trained for model 'someone-else'", "other-level": "is the adapter of level 1, not of level 0"}
    msg = _load_error(work / "m.gguf")
    assert "elastic level 0" in msg and expect[case] in msg and "LLAMA_ELMS_LORA=optional" in msg
    # with the explicit flag: a warning, and level 0 runs without adapter
    llm = open_llm(work / "m.gguf", elms_lora="optional")
    llm.close()


# --------------------------------------------------------------------------------------------------------------
# the standard tools


def _completion(model_path: Path, *extra: str, attempts: int = 4) -> subprocess.CompletedProcess:
    """stdout as bytes (a random tiny model emits arbitrary bytes), stderr as text.

    llama-completion prints through a log thread that is not joined at exit (upstream llama.cpp), so under load
    a run can exit 0 with its output cut short: retry until the last perf line shows the log was flushed.
    """
    cmd = [str(binary("llama-completion")), "-m", str(model_path), "-p", "hello world", "-n", "12", "--temp", "0",
           "-no-cnv", "--no-warmup", "-t", "1", "-c", "64", "-b", "8", "-ub", "8", "--seed", "1", *extra]
    for _ in range(attempts):
        r = subprocess.run(cmd, capture_output=True, timeout=120)
        r.stderr = r.stderr.decode("utf-8", "replace")
        if r.returncode != 0 or "graphs reused" in r.stderr:
            return r
    return r


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])  # q4_0 is repacked on x86 AVX2 / ARM, by both runs
def test_llama_completion_elms_ratio_matches_the_truncated_model(uniform_files, qtype):
    elastic, truncated = uniform_files[qtype]
    ref = _completion(truncated)  # stock defaults
    got = _completion(elastic, "--elms-ratio", "0.5")
    assert ref.returncode == 0 and got.returncode == 0, got.stderr[-1500:]
    assert "elastic level 0 of 2 (ratio 0.50)" in got.stderr
    assert got.stdout == ref.stdout, (got.stdout, ref.stdout)
    assert len(got.stdout) > len(b"hello world")
    dense = _completion(elastic)
    assert dense.stdout != got.stdout


def _refused(tool, *args, reason: str, attempts: int = 6) -> None:
    """``tool(*args)`` (_completion, _cli) fails on every run and says ``reason`` on some run: the tools' log thread
    is not joined on a failed exit (upstream llama.cpp), so a stock error message can be lost; retry for it. The
    elastic refusals flush the log before the tool exits (patches/0004): they are checked with ``attempts=1``."""
    for _ in range(attempts):
        r = tool(*args)
        assert r.returncode != 0, r.stderr[-1500:]
        if reason in r.stderr:
            return
    assert reason in r.stderr


def test_llama_completion_refuses_a_ratio_on_a_dense_model(tiny_llama):
    _refused(_completion, tiny_llama.path, "--elms-ratio", "0.5", reason="is not an elastic model", attempts=1)


def test_llama_bench_without_elms_ratio_runs_any_model(uniform_files):
    _, truncated = uniform_files["q8_0"]
    r = subprocess.run([str(binary("llama-bench")), "-m", str(truncated), "-p", "8", "-n", "4", "-r", "1", "-t", "1",
                        "--repack", "0", "-o", "json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]


def test_llama_bench_takes_elms_ratio(uniform_files):
    elastic, _ = uniform_files["q8_0"]
    cmd = [str(binary("llama-bench")), "-m", str(elastic), "-p", "8", "-n", "4", "-r", "1", "-t", "1",
           "--elms-ratio", "0.5", "--progress", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "elastic level 0 (ratio 0.50)" in r.stderr


def test_ggml_cpu_really_contains_the_column_view_prefetch():
    """gcc drops __builtin_prefetch behind a run-time switch: check the object code."""
    so = binary("libggml-cpu.so")
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True)
    if dis.returncode != 0:
        pytest.skip("objdump not available")
    assert "prefetcht0" in dis.stdout or "prfm" in dis.stdout


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_llama_perplexity_at_a_level_equals_the_truncated_model(uniform_files, qtype, tmp_path):
    elastic, truncated = uniform_files[qtype]
    text = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "the", "of", "and"], 400)))

    def ppl(path: Path, *extra: str) -> str:
        # llama.cpp's log thread is not joined at exit: a run can lose its last lines, so retry until it has them
        for _ in range(5):
            r = subprocess.run([str(binary("llama-perplexity")), "-m", str(path), "-f", str(text), "-c", "64", "-b",
                                "64", "-t", "1", *extra], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-1500:]
            final = [line for line in r.stderr.splitlines() if "Final estimate" in line]
            if final:
                return final[0].split("Final estimate")[1]
        raise AssertionError(f"no 'Final estimate' line in 5 runs: {r.stderr[-1500:]}")

    assert ppl(elastic, "--elms-ratio", "0.5") == ppl(truncated)
    assert ppl(elastic, "--elms-ratio", "0.5", "-nr") == ppl(truncated, "-nr")
    assert ppl(elastic) != ppl(truncated)


def _cli(model_path: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(binary("llama-cli")), "-m", str(model_path), "-p", "hello", "-n", "4", "-st", "-t", "1",
                        "-c", "64", "--temp", "0", "-v", *extra], capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=120)
    r.stderr = r.stderr.decode("utf-8", "replace")
    return r


def test_llama_cli_runs_a_level(uniform_files, tiny_llama):
    """llama-cli (a chat client around an in-process llama-server) selects the level, or refuses."""
    elastic, _ = uniform_files["q8_0"]
    r = _cli(elastic, "--elms-ratio", "0.5")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "set_elastic_level: level = 0" in r.stderr
    _refused(_cli, tiny_llama.path, "--elms-ratio", "0.5", reason="is not an elastic model", attempts=1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_completion(model_path: Path, *extra: str) -> list[int]:
    """Start llama-server on loopback, ask for a greedy completion, return the generated token ids."""
    import json
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([str(binary("llama-server")), "-m", str(model_path), "--host", "127.0.0.1", "--port",
                             str(port), "-t", "1", "-c", "64", "-np", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):  # bounded wait: 20 s
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("llama-server did not become ready")
        body = json.dumps({"prompt": "hello world", "n_predict": 8, "temperature": 0, "seed": 1,
                           "return_tokens": True}).encode()
        req = urllib.request.Request(base + "/completion", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["tokens"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_llama_server_serves_the_level(uniform_files):
    elastic, truncated = uniform_files["q4_0"]  # repacked on x86 AVX2 / ARM, by both servers
    got = _serve_completion(elastic, "--elms-ratio", "0.5")
    ref = _serve_completion(truncated)
    assert len(got) == 8 and got == ref
