"""The TLM's decision head (elms_gguf.decision): ELMS's labelling rule, the softmax heads, the feasibility guard,
storage in the TLM GGUF, and serving with it.

References: labels are checked against the rule written out by hand; guarded decisions against
orchestrate.decide's feasibility on synthetic profiles (exact, instant).
"""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest

from elms_gguf import decision as D
from elms_gguf import orchestrate
from elms_gguf.profile import SLO

from test_slo import synthetic_profile

LEVELS = [-1, 1, 0]         # largest first, as decision.collect orders them
LEVEL_RATIOS = [1.0, 0.6, 0.3]
RATIOS = [1.0, 0.7, 0.4]


# -- labels --------------------------------------------------------------------------------------------


def test_label_is_the_largest_correct_feasible_level_then_the_smallest_correct_ratio():
    correct = np.array([[0, 0, 0],     # dense: never correct
                        [1, 1, 0],     # 0.6: correct at 1.0 and 0.7
                        [1, 1, 1]], dtype=bool)
    feasible = np.ones((3, 3), dtype=bool)
    assert D.label(correct, feasible, LEVEL_RATIOS, RATIOS) == (1, 1)  # level 0.6, ratio 0.7
    feasible[1, 1] = False  # 0.6 @ 0.7 too slow: 0.6 @ 1.0 is still correct
    assert D.label(correct, feasible, LEVEL_RATIOS, RATIOS) == (1, 0)
    feasible[1, :] = False  # level 0.6 infeasible: the smaller level, smallest correct ratio
    assert D.label(correct, feasible, LEVEL_RATIOS, RATIOS) == (2, 2)


def test_label_without_a_correct_pair_is_the_profile_rule_and_none_when_nothing_fits():
    correct = np.zeros((3, 3), dtype=bool)
    feasible = np.array([[0, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=bool)
    assert D.label(correct, feasible, LEVEL_RATIOS, RATIOS) == (1, 1)  # largest feasible level, largest ratio
    assert D.label(correct, np.zeros((3, 3), dtype=bool), LEVEL_RATIOS, RATIOS) is None


def test_feasible_mask_agrees_with_decide():
    p = synthetic_profile()
    slo = SLO.relative(0.5, 0.7)
    mask = D.feasible_mask(p, LEVELS, RATIOS, n_fixed=20, n_compressible=200, slo=slo,
                           scorer_ms=lambda n: p.scorer_ms("tlm", n))
    for i, lv in enumerate(LEVELS):
        for j, rho in enumerate(RATIOS):
            d = orchestrate.decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm", levels=[lv],
                                   prompt_ratios=[rho], best_effort=True)
            assert d.feasible == mask[i, j], (lv, rho)
    assert mask.any() and not mask.all()


# -- the heads -----------------------------------------------------------------------------------------


def _outcomes(n: int, seed: int = 0) -> list[D.Outcome]:
    """Questions whose first pooled feature decides which level answers them (a learnable pattern)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pooled = rng.normal(size=8)
        correct = np.zeros((3, 3), dtype=bool)
        if pooled[0] > 0:
            correct[2, :] = True   # only the smallest level is right (e.g. the dense model overthinks)
        else:
            correct[:, 0] = True   # right at every level with the whole prompt
        out.append(D.Outcome(n_fixed=20, n_compressible=200, pooled=pooled, correct=correct))
    return out


def test_head_learns_a_learnable_rule_and_beats_the_profile_rule_on_held_out_questions():
    p = synthetic_profile()
    head = D.train(_outcomes(60), p, LEVELS, RATIOS, heldout=_outcomes(30, seed=1), l2=1e-3,
                   scorer_ms=lambda n: p.scorer_ms("tlm", n))
    assert head.report["train_level_acc"] > 0.8 and head.report["train_ratio_acc"] > 0.8  # labels also hinge on
    # feasibility, which a linear head only approximates
    h = head.report["heldout"]
    # the rule always takes the largest feasible level: wrong for half the questions; the head learned which
    assert h["acc_head"] > h["acc_rule"] + 0.2 and h["acc_head"] <= h["acc_oracle"]
    assert h["samples"] > 0 and 0 <= h["guard_overrides"] <= 1


def _constant_head(level_ratio: float, prompt_ratio: float, n_features: int = 12) -> D.DecisionHead:
    """A head whose biases alone pick one (level, ratio) class."""
    lv = np.array(LEVEL_RATIOS)
    rr = np.array(RATIOS)
    return D.DecisionHead(level_ratios=lv, prompt_ratios=rr, mean=np.zeros(n_features), std=np.ones(n_features),
                          w_level=np.zeros((n_features, 3)), b_level=np.where(lv == level_ratio, 5.0, 0.0),
                          w_ratio=np.zeros((n_features, 3)), b_ratio=np.where(rr == prompt_ratio, 5.0, 0.0),
                          target_model_id="syn")


@pytest.mark.parametrize("ttft,tpot", [(1.0, 1.0), (0.6, 0.8), (0.4, 0.7), (0.25, 0.4), (0.8, 0.35)])
@pytest.mark.parametrize("want", [(1.0, 1.0), (0.6, 0.4), (0.3, 0.7)])
def test_guarded_decision_keeps_a_feasible_head_choice_and_otherwise_is_feasible(ttft, tpot, want):
    p = synthetic_profile()
    slo = SLO.relative(ttft, tpot)
    head = _constant_head(*want)
    kw = dict(n_fixed=20, n_compressible=200, levels=LEVELS, scorer_ms=lambda n: p.scorer_ms("tlm", n))
    rule = orchestrate.decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm", levels=LEVELS, best_effort=True)
    d = D.guarded_decision(head, p, slo, pooled=np.zeros(8), best_effort=True, **kw)
    lv_want = {1.0: -1, 0.6: 1, 0.3: 0}[want[0]]
    exact = orchestrate.decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm", levels=[lv_want],
                               prompt_ratios=[want[1]], best_effort=True)
    if exact.feasible:  # the head's own choice meets the SLO: it is what runs
        assert (d.level, d.prompt_ratio) == (lv_want, want[1]) and d.reason.startswith("decision head")
    elif rule.feasible:  # otherwise the guard: still feasible whenever anything is
        assert d.feasible and ("guard" in d.reason)
    else:
        assert not d.feasible and not rule.feasible
    assert d.predicted_tpot_ms == pytest.approx(p.tpot_ms(d.level))


def test_guarded_decision_counts_time_already_spent_on_the_tlm():
    p = synthetic_profile()
    head = _constant_head(1.0, 1.0)
    kw = dict(n_fixed=20, n_compressible=200, levels=LEVELS, pooled=np.zeros(8), scorer_ms=lambda n: 0.0,
              best_effort=True)
    free = D.guarded_decision(head, p, SLO(ttft_ms=1000, tpot_ms=100), **kw)
    spent = D.guarded_decision(head, p, SLO(ttft_ms=1000, tpot_ms=100), overhead_ms=30.0, **kw)
    assert spent.predicted_ttft_ms == pytest.approx(free.predicted_ttft_ms + 30.0)


# -- storage -------------------------------------------------------------------------------------------


def _fake_tlm(path, n_embd: int = 8) -> None:
    w = gguf.GGUFWriter(str(path), arch="bert")
    w.add_uint32("bert.embedding_length", n_embd)
    w.add_array("elms.tlm.score_head.weight", [0.5] * n_embd)
    w.add_tensor("token_embd.weight", np.arange(4 * n_embd, dtype=np.float32).reshape(4, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_head_round_trips_through_the_tlm_gguf_and_leaves_the_input_alone(tmp_path):
    src, dst = tmp_path / "tlm.gguf", tmp_path / "tlm-head.gguf"
    _fake_tlm(src)
    before = src.read_bytes()
    head = D.train(_outcomes(20), synthetic_profile(), LEVELS, RATIOS, target_model_id="syn")
    D.write_head(src, dst, head)
    assert src.read_bytes() == before and D.read_head(src) is None
    back = D.read_head(dst)
    x = np.random.default_rng(3).normal(size=(5, head.n_features))
    for a, b in zip(head.probabilities(x), back.probabilities(x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float32 storage
    assert back.target_model_id == "syn" and back.report["train_samples"] == head.report["train_samples"]
    r = gguf.GGUFReader(str(dst))
    assert np.array_equal(r.get_tensor(0).data, gguf.GGUFReader(str(src)).get_tensor(0).data)
    D.write_head(dst, dst, D.train(_outcomes(10, seed=5), synthetic_profile(), LEVELS, RATIOS))  # in place: replaced
    assert D.read_head(dst).report["train_questions"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tlm-head.gguf", "tlm.gguf"]


def test_malformed_heads_and_non_tlm_files_are_refused(tmp_path):
    head = _constant_head(1.0, 1.0)
    fields = {k: v for k, (v, _) in head.kv().items()}
    fields[D.KEY_LEVEL_W] = fields[D.KEY_LEVEL_W][:-1]
    with pytest.raises(D.DecisionHeadError, match=r"elms.tlm.decision.level.weight has 35 values, expected 36"):
        D.DecisionHead.from_fields(fields, source="x.gguf")
    with pytest.raises(D.DecisionHeadError, match="expects 12 features, got 5"):
        head.predict(np.zeros(5))
    plain = tmp_path / "plain.gguf"
    w = gguf.GGUFWriter(str(plain), arch="bert")
    w.add_tensor("t", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(D.DecisionHeadError, match="not an elms TLM"):
        D.write_head(plain, tmp_path / "out.gguf", head)
    assert not (tmp_path / "out.gguf").exists()


# -- serving -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serving_uses_the_tlm_head_and_refuses_one_of_another_model(tiny_elastic_llama, tlm_pair, tmp_path, caplog):
    from test_serve import CONTEXT, QUESTION, tiny_profile

    from elms_gguf.serve import ElasticLlama

    _, tlm_path = tlm_pair
    path = str(tiny_elastic_llama.path)
    prof = tiny_profile(path)  # the TLM's cost curve is measured by the constructor
    n_embd = 384
    lv = np.array([1.0, 0.7, 0.4])
    head = D.DecisionHead(level_ratios=lv, prompt_ratios=np.array(RATIOS), mean=np.zeros(4 + n_embd),
                          std=np.ones(4 + n_embd), w_level=np.zeros((4 + n_embd, 3)),
                          b_level=np.where(lv == 0.7, 5.0, 0.0), w_ratio=np.zeros((4 + n_embd, 3)),
                          b_ratio=np.array([0.0, 5.0, 0.0]), target_model_id=tiny_elastic_llama.spec.model_id)
    with_head = tmp_path / "tlm-head.gguf"
    D.write_head(tlm_path, with_head, head)
    llm = ElasticLlama(path, tlm=str(with_head), profile=prof, n_ctx=512, n_batch=128, n_threads=1, verbose=False)
    try:
        assert llm.decision_head is not None
        out = llm.create_completion(prompt=QUESTION, context=CONTEXT, slo=SLO(ttft_ms=1e6, tpot_ms=1e6),
                                    max_tokens=2, temperature=0.0)
        e = out["elms"]
        assert e["reason"].startswith("decision head") and (e["level_ratio"], e["planned_prompt_ratio"]) == (0.7, 0.7)
        pooled = llm.compressor.pooled(__import__("elms_gguf.compress", fromlist=["x"]).split_words(CONTEXT))
        assert pooled.shape == (n_embd,) and np.isfinite(pooled).all()
    finally:
        llm.close()
    rule = ElasticLlama(path, tlm=str(with_head), profile=prof, n_ctx=512, n_batch=128, n_threads=1, verbose=False,
                        decision_head="rule")
    assert rule.decision_head is None
    rule.close()
    head.target_model_id = "another-model"
    D.write_head(tlm_path, with_head, head)
    with caplog.at_level(logging.WARNING):
        other = ElasticLlama(path, tlm=str(with_head), profile=prof, n_ctx=512, n_threads=1, verbose=False)
    assert other.decision_head is None and "trained for model 'another-model'" in caplog.text
    other.close()
    with pytest.raises(ValueError, match="trained for model 'another-model'"):
        ElasticLlama(path, tlm=str(with_head), profile=prof, n_ctx=512, n_threads=1, verbose=False,
                     decision_head="head")
