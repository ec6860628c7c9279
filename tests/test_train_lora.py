"""elms-train-lora (issue 4): per-level LoRA trained by self-distillation, exported and attached to the model.

References, independent of the training code:
* llama.cpp's logits at level k of the output model (the runtime applies the level's adapter by itself) against
  the PyTorch forward of the sliced model with the adapter read back from its file (model.forward(widths, lora));
* the KD loss of the same rows before / after training (must drop);
* the written adapter files (padding beyond the active widths exactly zero, no tensors for skipped blocks);
* the input model's bytes and the output's tensor bytes (metadata-only rewrite).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from elms_gguf import contract, lora, model, train_lora
from elms_gguf.contract import ContractError

from runtime_helpers import BIN, GGML_TYPE_F32, open_llm, run_logits

STEPS = 20


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tokens(config: model.ModelConfig, rows: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.n_vocab, (rows, length), generator=g)


def _cfg(config: model.ModelConfig, **kw) -> train_lora.TrainConfig:
    base = dict(steps=STEPS, batch=4, seq_len=32, lr=1e-2, warmup=1, topk=32, tokens=_tokens(config), progress=False,
                fast=False, device="cpu")
    base.update(kw)
    return train_lora.TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_elastic_llama):
    """The tiny anchored elastic llama (level 0 skips layer 2) with adapters trained for levels 0 and 1 (read back
    zero-padded to the full weight shapes, so that any level's forward can apply any level's adapter)."""
    d = tmp_path_factory.mktemp("train_lora")
    src = shutil.copyfile(tiny_elastic_llama.path, d / "tiny.gguf")
    before = _sha(src)
    # F16 storage: the comparisons with PyTorch below are then bound at 2e-4 (the default, Q8_0 on these widths, is
    # checked end to end in test_convert_with_train_lora_writes_a_model_whose_levels_run_their_adapters)
    res = train_lora.train_all_levels(src, _cfg(tiny_elastic_llama.config, adapter_type="f16"), out=d / "tiny-lora.gguf")
    return dict(src=Path(src), src_sha=before, res=res, tiny=tiny_elastic_llama,
                adapters={r.level: lora.read_adapter(r.adapter_path, config=tiny_elastic_llama.config)
                          for r in res.levels})


def _assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = 2e-4) -> None:
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x max |logit| {scale:.3g}"


def _torch_logits(tiny, tokens, level, lora_=None) -> np.ndarray:
    with torch.no_grad():
        return model.forward(tiny.config, tiny.weights, torch.tensor(tokens), widths=model.level_widths(level),
                             lora=lora_, dtype=torch.float64).numpy()


# --------------------------------------------------------------------------------------------------------------
# training


def test_every_level_below_full_width_is_trained_and_named_by_the_model(trained):
    res, tiny = trained["res"], trained["tiny"]
    assert [r.level for r in res.levels] == [0, 1]  # level 2 is the dense model: no adapter
    spec = contract.read_spec(model.load_gguf(res.out)[2].fields)
    for r in res.levels:
        assert Path(r.adapter_path).name == f"tiny-lora.level{r.level}.lora.gguf"
        assert spec.levels[r.level].lora == Path(r.adapter_path).name
        assert spec.levels[r.level].lora_crc32 == contract.crc32_file(r.adapter_path)
    assert spec.levels[2].lora == ""
    ad = trained["adapters"][0]
    assert (ad.model_id, ad.level, ad.rank, ad.alpha) == (tiny.spec.model_id, 0, 8, 16.0)
    assert {n.split(".")[2] for n in ad.weights} == set(lora.TARGETS)  # all seven linears


def test_training_reduces_the_kd_loss_on_the_training_rows(trained):
    for r in trained["res"].levels:
        assert r.kd_after < 0.7 * r.kd_before, (r.level, r.kd_before, r.kd_after)
        assert r.loss_last < r.loss_first


def test_kd_before_training_is_the_sub_model_without_adapter(trained):
    """B starts at zero, so step 0 is the plain sub-model; and the KD loss is the KL to the dense model."""
    tiny = trained["tiny"]
    cfg = _cfg(tiny.config)
    data = train_lora.teacher_targets(tiny.config, tiny.weights, cfg.tokens, topk=cfg.topk, device=torch.device("cpu"))
    probe = data.rows(range(8))
    with torch.no_grad():
        dense = model.forward(tiny.config, tiny.weights, probe.tokens)
        plain = model.forward(tiny.config, tiny.weights, probe.tokens, widths=tiny.spec.levels[0])
        assert float(train_lora.kd_loss(dense, probe)) < 1e-5  # the teacher against itself
        kd = float(train_lora.kd_loss(plain, probe))
    assert kd == pytest.approx(trained["res"].levels[0].kd_before, rel=1e-4)
    # the top-k + tail KL never exceeds the full KL (data-processing inequality)
    full = torch.nn.functional.kl_div(plain.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean()
    assert kd <= float(full) + 1e-6


def test_an_adapter_that_does_not_lower_the_kd_loss_is_not_attached(tiny_elastic_llama, tmp_path, monkeypatch, caplog):
    """The level then runs as converted: no file, no name in the level table, a warning, the reason in the result."""
    real = train_lora.train_level

    def worse_at_level_0(*args, **kw):
        adapter, st = real(*args, **kw)
        return adapter, (dict(st, kd_after=st["kd_before"] + 0.1) if kw["level_index"] == 0 else st)

    monkeypatch.setattr(train_lora, "train_level", worse_at_level_0)
    src = shutil.copyfile(tiny_elastic_llama.path, tmp_path / "tiny.gguf")
    res = train_lora.train_all_levels(src, _cfg(tiny_elastic_llama.config), out=tmp_path / "out.gguf")
    r0, r1 = res.levels
    assert r0.dropped.startswith("training did not lower the KD loss") and r0.adapter_path == ""
    assert not r1.dropped and Path(r1.adapter_path).exists()
    assert not (tmp_path / "out.level0.lora.gguf").exists()
    spec = contract.read_spec(model.load_gguf(tmp_path / "out.gguf")[2].fields)
    assert (spec.levels[0].lora, spec.levels[0].lora_crc32) == ("", 0) and spec.levels[1].lora == "out.level1.lora.gguf"
    assert "level 0 (ratio 0.40): training did not lower the KD loss" in caplog.text and "no adapter" in caplog.text
    assert "(no adapter: not lower)" in res.table().splitlines()[2]


def test_fast_bf16_training_also_reduces_the_loss(tiny_elastic_llama):
    tiny = tiny_elastic_llama
    cfg = _cfg(tiny.config, fast=True)
    data = train_lora.teacher_targets(tiny.config, tiny.weights, cfg.tokens, topk=cfg.topk, device=torch.device("cpu"))
    _, st = train_lora.train_level(tiny.config, tiny.weights, tiny.spec.levels[1], data, cfg, level_index=1,
                                   model_id=tiny.spec.model_id)
    assert st["kd_after"] < 0.7 * st["kd_before"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine)")
def test_cuda_training_matches_cpu_training(tiny_elastic_llama):
    """The GPU path (teacher, sub-model, optimiser) follows the CPU path from the same seed and rows in float32,
    and the default on a GPU (bf16 autocast) learns as well."""
    tiny = tiny_elastic_llama
    cfg = _cfg(tiny.config)
    lv = tiny.spec.levels[1]
    runs = {}
    for dev in ("cpu", "cuda"):
        d = torch.device(dev)
        data = train_lora.teacher_targets(tiny.config, tiny.weights, cfg.tokens, topk=cfg.topk, device=d)
        ad, st = train_lora.train_level(tiny.config, tiny.weights, lv, data, cfg, level_index=1,
                                        model_id=tiny.spec.model_id, device=d)
        runs[dev] = (data, ad, st)
    (dc, ac, sc), (dg, ag, sg) = runs["cpu"], runs["cuda"]
    torch.testing.assert_close(dg.top_logp, dc.top_logp, rtol=1e-4, atol=1e-4)
    assert sg["kd_before"] == pytest.approx(sc["kd_before"], rel=1e-4)
    assert sg["kd_after"] == pytest.approx(sc["kd_after"], rel=2e-2)
    tok = cfg.tokens[:2, :16].tolist()
    _assert_close(_torch_logits(tiny, tok, lv, ag.as_forward_lora()), _torch_logits(tiny, tok, lv, ac.as_forward_lora()),
                  rtol=2e-2)
    fast = replace(cfg, fast=True, device="cuda")
    _, st = train_lora.train_level(tiny.config, tiny.weights, lv, dg, fast, level_index=1, model_id=tiny.spec.model_id)
    assert st["kd_after"] < 0.7 * st["kd_before"]


def test_submodel_in_float32_is_the_reference_forward(tiny_elastic_qwen2):
    """The training forward (pre-sliced weights) computes model.forward(widths, lora) (qwen2: biases, untied head)."""
    tiny = tiny_elastic_qwen2
    lv = tiny.spec.levels[0]
    ad = lora.random_adapter(tiny.config, level=0, ratio=lv.ratio, model_id="x", seed=3)
    tok = _tokens(tiny.config, 2, 16)
    sub = train_lora.SubModel(tiny.config, tiny.weights, lv, device=torch.device("cpu"), fast=False)
    with torch.no_grad():
        got = sub.logits(tok, ad.as_forward_lora())
        ref = model.forward(tiny.config, tiny.weights, tok, widths=lv, lora=ad.as_forward_lora())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# export


def test_adapters_are_stored_cut_to_their_level_and_skipped_blocks_have_no_tensors(trained):
    """On disk each A/B holds exactly what its level reads; read back against the model they are zero-padded."""
    tiny = trained["tiny"]
    c = tiny.config
    for level, padded in trained["adapters"].items():
        path = trained["res"].levels[level].adapter_path
        ad = lora.read_adapter(path)  # as stored
        assert lora.read_adapter(path, config=c, widths=tiny.spec.levels[level]).weights.keys() == padded.weights.keys()
        widths = model.level_widths(tiny.spec.levels[level])
        for il, (kv, ff) in enumerate(widths):
            for kind in lora.TARGETS:
                name = f"blk.{il}.{kind}.weight"
                if (kind.startswith("attn") and kv == 0) or (kind.startswith("ffn") and ff == 0):
                    assert name not in ad.weights, f"level {level}: {name} is skipped but has adapter tensors"
                    continue
                a, b = ad.weights[name]
                n_out, n_in = model.tensor_shapes(c)[0][name]
                rows, cols = contract.active_shape(c.dims(), kind, kv, ff)
                rows, cols = rows or n_out, cols or n_in
                assert a.shape == (8, cols) and b.shape == (rows, 8), name  # compact on disk
                assert torch.count_nonzero(b) > 0, f"{name}: B was not trained"
                pa, pb = padded.weights[name]
                assert pa.shape == (8, n_in) and pb.shape == (n_out, 8)
                assert torch.equal(pa[:, :cols], a) and torch.equal(pb[:rows], b), name
                assert torch.count_nonzero(pa[:, cols:]) == 0 and torch.count_nonzero(pb[rows:]) == 0, name
        assert {int(n.split(".")[1]) for n in ad.weights} == {il for il, (kv, ff) in enumerate(widths) if kv or ff}


def test_input_untouched_and_output_tensors_byte_identical(trained):
    src, res = trained["src"], trained["res"]
    assert _sha(src) == trained["src_sha"]
    a, b = model.open_gguf(src), model.open_gguf(res.out)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.data.tobytes() == tb.data.tobytes(), ta.name
    fa, fb = contract.reader_fields(a), contract.reader_fields(b)
    assert {k: v for k, v in fa.items() if not contract.is_elastic_key(k)} == \
        {k: v for k, v in fb.items() if not contract.is_elastic_key(k)}
    sa, sb = contract.read_spec(fa), contract.read_spec(fb)
    for la, lb in zip(sa.levels, sb.levels):
        assert (la.ratio, la.head_count_kv, la.feed_forward_length) == (lb.ratio, lb.head_count_kv, lb.feed_forward_length)
    assert (sa.model_id, sa.anchors) == (sb.model_id, sb.anchors)


def test_rewrite_spec_in_place_is_atomic_and_metadata_only(tiny_elastic_llama, tmp_path):
    path = shutil.copyfile(tiny_elastic_llama.path, tmp_path / "m.gguf")
    before = {t.name: t.data.tobytes() for t in model.open_gguf(path).tensors}
    spec = contract.read_spec(model.load_gguf(path)[2].fields)
    (tmp_path / "x.lora.gguf").write_bytes(b"stand-in")
    lora.attach_adapters(spec, {1: str(tmp_path / "x.lora.gguf")}, model_dir=str(tmp_path))
    lora.rewrite_spec(path, None, spec)
    after = model.open_gguf(path)
    assert {t.name: t.data.tobytes() for t in after.tensors} == before
    got = contract.read_spec(contract.reader_fields(after))
    assert (got.levels[1].lora, got.levels[1].lora_crc32) == ("x.lora.gguf", contract.crc32_file(tmp_path / "x.lora.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "x.lora.gguf"]  # no temp files left
    bad = contract.read_spec(contract.reader_fields(after))
    bad.levels[0].head_count_kv[1] = 5  # wider than the model: refused before anything is written
    with pytest.raises(ContractError, match="head_count_kv 5 outside"):
        lora.rewrite_spec(path, tmp_path / "n.gguf", bad)
    assert not (tmp_path / "n.gguf").exists()


# --------------------------------------------------------------------------------------------------------------
# Python-side adapter checks (the runtime's own refusals are tested in test_runtime)


@pytest.mark.parametrize("case", ["missing", "corrupt", "other-model", "other-level"])
def test_bad_adapters_are_refused_in_python(case, trained, tmp_path):
    res = trained["res"]
    work = tmp_path / case
    shutil.copytree(Path(res.out).parent, work, ignore=shutil.ignore_patterns("tiny.gguf"))
    out = work / Path(res.out).name
    ad0 = work / Path(res.levels[0].adapter_path).name
    ad1 = work / Path(res.levels[1].adapter_path).name
    spec = contract.read_spec(model.load_gguf(out)[2].fields)
    if case == "missing":
        ad0.unlink()
    elif case == "corrupt":
        data = bytearray(ad0.read_bytes())
        data[-5] ^= 0xFF
        ad0.write_bytes(bytes(data))
    else:
        a = trained["adapters"][0]
        if case == "other-model":
            a = lora.Adapter(a.weights, a.alpha, 0, a.ratio, "someone-else")
        else:
            a = trained["adapters"][1]
        lora.write_adapter(ad0, trained["tiny"].config, a)
        lora.attach_adapters(spec, {0: str(ad0)}, model_dir=str(work))  # CRC fine: only id / level are wrong
        lora.rewrite_spec(out, None, spec)
    expect = {"missing": "cannot open adapter file", "corrupt": "is corrupt or was replaced",
              "other-model": "was trained for model 'someone-else'", "other-level": "is the adapter of level 1, not of level 0"}
    with pytest.raises(ContractError) as e:
        lora.check_level_adapters(out, config=trained["tiny"].config)
    assert "elastic level 0" in str(e.value) and expect[case] in str(e.value)
    assert ad1.exists()


# --------------------------------------------------------------------------------------------------------------
# the runtime runs what was trained


@pytest.fixture(scope="module")
def runtime() -> None:
    if not (BIN / "libllama.so").exists():
        pytest.skip(f"patched llama.cpp not built ({BIN}); run `make setup`")


def test_llama_cpp_level_logits_match_pytorch_with_the_trained_adapter_and_switch_with_the_level(runtime, trained):
    tiny, res, adapters = trained["tiny"], trained["res"], trained["adapters"]
    levels = tiny.spec.levels
    llm = open_llm(res.out, flash_attn=False, type_kv=GGML_TYPE_F32)
    try:
        for i in (0, 1, 0, 2):
            llm.set_level(i)
            got, tokens = run_logits(llm)
            ref = _torch_logits(tiny, tokens, levels[i], adapters[i].as_forward_lora() if i < 2 else None)
            _assert_close(got, ref)
            if i < 2:
                # the level's own adapter, not none and not the other level's
                for other in (None, adapters[1 - i].as_forward_lora()):
                    assert np.abs(got - _torch_logits(tiny, tokens, levels[i], other)).max() > 1e-2 * np.abs(ref).max()
    finally:
        llm.close()


def test_cli_trains_from_a_calibration_token_file(runtime, tiny_elastic_llama, tmp_path):
    src = shutil.copyfile(tiny_elastic_llama.path, tmp_path / "m.gguf")
    before = _sha(src)
    np.save(tmp_path / "rows.npy", _tokens(tiny_elastic_llama.config, 6, 32).numpy())
    rc = train_lora.main([str(src), "--prose", str(tmp_path / "rows.npy"), "--prose-samples", "6", "--seq-len", "32",
                          "--qa-samples", "0", "--steps", "2", "--batch", "2", "--levels", "1", "--topk", "16",
                          "--no-progress", "--report-json", str(tmp_path / "r.json")])
    assert rc == 0
    assert _sha(src) == before
    out = tmp_path / "m-lora.gguf"
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["out"] == str(out) and [lv["level"] for lv in rep["levels"]] == [1]
    assert (tmp_path / "m-lora.level1.lora.gguf").exists()
    llm = open_llm(out)  # elms_lora="required": the runtime accepts the adapter
    try:
        llm.set_level(1)
        run_logits(llm, decode_steps=1)
    finally:
        llm.close()
    assert train_lora.main([str(src), "-o", str(src), "--qa-samples", "0"]) == 2  # never over the input


def test_dense_answers_to_questions_in_the_chat_template(runtime, tmp_path):
    pytest.importorskip("pyarrow")
    try:
        qs = train_lora.questions(4, seed=1)
    except train_lora.TrainError as e:
        pytest.skip(str(e))
    assert [s for s, _ in qs] == list(train_lora.QA_SOURCES)
    import gguf

    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    cfg = model.tiny_config("llama")
    path = tmp_path / "chat.gguf"
    model.write_gguf(path, cfg, model.random_weights(cfg), extra_kv=model.tiny_tokenizer_kv(cfg.n_vocab) + [
        ("tokenizer.chat_template", chatml, gguf.GGUFValueType.STRING, None)])
    from elms_gguf.runtime import ElasticLlama

    llm = ElasticLlama(str(path), n_ctx=512, n_threads=1, verbose=False, elms_lora="off")
    try:
        dialogues = train_lora.answer_dialogues(llm, qs[:2], max_tokens=4)
        text = llm.detokenize(dialogues[0]).decode("utf-8", "replace").lstrip()  # SPM: leading space prefix
    finally:
        llm.close()
    assert text.startswith("<|im_start|>user\n" + qs[0][1] + "<|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith("<|im_end|>\n")
    rows = train_lora.pack(dialogues, 16)
    assert all(len(r) == 16 for r in rows) and len(rows) == sum(map(len, dialogues)) // 16


def test_refusals_name_the_problem(tiny_llama, tiny_elastic_llama, tmp_path):
    cfg = _cfg(tiny_elastic_llama.config)
    with pytest.raises(train_lora.TrainError, match="not an elastic GGUF"):
        train_lora.train_all_levels(tiny_llama.path, cfg, out=tmp_path / "x.gguf")
    with pytest.raises(train_lora.TrainError, match="level 2 is the full-width model"):
        train_lora.train_all_levels(tiny_elastic_llama.path, train_lora.TrainConfig(**{**cfg.__dict__, "levels": [2]}),
                                    out=tmp_path / "x.gguf")
    with pytest.raises(train_lora.TrainError, match="does not exist"):
        train_lora.train_all_levels(tiny_elastic_llama.path, cfg, out=tmp_path / "nowhere" / "x.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# elms-convert --train-lora


def test_convert_with_train_lora_writes_a_model_whose_levels_run_their_adapters(tmp_path):
    """ConvertConfig.train_lora (CLI --train-lora) trains every level below full on the output and names the adapters;
    the runtime then applies them: llama.cpp at level 0 = PyTorch with the adapter read back from its file."""
    from elms_gguf import convert as CV

    src = tmp_path / "dense.gguf"
    model.make_tiny_gguf(src)
    before = _sha(src)
    config, weights, _ = model.load_gguf(str(src))
    out = tmp_path / "elastic.gguf"
    res = CV.convert(str(src), str(out), config=CV.ConvertConfig(
        progress=False, probe_samples=2, compare=False, levels=(0.5, 1.0),
        calib_tokens=CV.tiny_calib_tokens(model.TINY_VOCAB_SIZE, 4, 16),
        heldout_tokens=CV.tiny_calib_tokens(model.TINY_VOCAB_SIZE, 2, 16, 1), train_lora=_cfg(config, steps=5)))
    assert _sha(src) == before
    assert [r.level for r in res.lora.levels] == [0] and "lora" in res.to_json()
    adapters = lora.check_level_adapters(out)
    assert adapters[1] is None and adapters[0] is not None and adapters[0].model_id == res.spec.model_id
    cfg_o, w_o, src_o = model.load_gguf(str(out))
    spec = contract.read_spec(src_o.fields)
    llm = open_llm(out, flash_attn=False, type_kv=GGML_TYPE_F32)
    try:
        llm.set_level(0)
        got, tokens = run_logits(llm)
    finally:
        llm.close()
    with torch.no_grad():
        ref = model.forward(cfg_o, w_o, torch.tensor(tokens), widths=model.level_widths(spec.levels[0]),
                            lora=adapters[0].as_forward_lora(), dtype=torch.float64).numpy()
        plain = model.forward(cfg_o, w_o, torch.tensor(tokens), widths=model.level_widths(spec.levels[0]),
                              dtype=torch.float64).numpy()
    # the default storage on whole-block widths is Q8_0: bound at 1e-3 (see test_runtime's Q8_0 test), far below
    # what the trained adapter changes (control)
    assert adapters[0].storage == "q8_0"
    _assert_close(got, ref, rtol=1e-3)
    assert np.abs(ref - plain).max() > 0.1 * np.abs(ref).max()


def test_convert_refuses_an_unknown_lora_preset_before_any_work(tmp_path, caplog):
    from elms_gguf import convert as CV

    src = tmp_path / "dense.gguf"
    model.make_tiny_gguf(src)
    assert CV.main([str(src), "-o", str(tmp_path / "out.gguf"), "--train-lora", "huge", "--no-progress"]) == 2
    assert "unknown LoRA preset 'huge' (known: demo, full)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.gguf"]
