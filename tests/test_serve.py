"""SLO-driven serving (elms_gguf.serve.ElasticLlama) on the tiny elastic model.

Decisions are made against a synthetic profile carrying the tiny model's fingerprint, so they are deterministic;
the measured figures only have to exist.
"""
from __future__ import annotations

import pytest

from elms_gguf import orchestrate, profile
from elms_gguf.orchestrate import SLOInfeasible
from elms_gguf.profile import SLO, Curve, LatencyProfile, LevelProfile, ProfileError

from runtime_helpers import require_runtime

CONTEXT = ("You are a science tutor. Answer each question.\n\n"
           "Question: What do plants need to make food?\nAnswer: sunlight\n\n"
           "Question: Which planet is closest to the Sun?\nAnswer: Mercury")
QUESTION = "Question: What gas do animals breathe out?\nAnswer:"


def tiny_profile(path, levels=((0, 0.4), (1, 0.7), (2, 1.0), (-1, 1.0)), *, scorer: str = "selfinfo@L0"):
    lv = {i: LevelProfile(level=i, ratio=r, ttft=Curve((1.0, 0.1 * r + (0.001 if i == -1 else 0), 0.0)),
                          tpot_ms=2.0 * r) for i, r in levels}
    return LatencyProfile(model=profile.model_fingerprint(path), device=profile.device_info(1), levels=lv,
                          scorers={scorer: Curve((0.5, 0.001, 0.0))}, meta={"lengths": [16, 64]})


@pytest.fixture
def served(tiny_elastic_llama):
    require_runtime()
    from elms_gguf.serve import ElasticLlama

    path = str(tiny_elastic_llama.path)
    llm = ElasticLlama(path, scorer="selfinfo", profile=tiny_profile(path), n_ctx=512, n_batch=128, n_threads=1,
                       verbose=False, slo_quantile=None)  # plan on the synthetic medians: deterministic
    yield llm
    llm.close()


def is_subsequence(small, big):
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def test_without_slo_it_is_the_runtime_class(served, tiny_elastic_llama):
    from elms_gguf.runtime import ElasticLlama as RuntimeLlama

    assert served.n_threads_batch == 1  # n_threads also sets the prefill threads
    ref = RuntimeLlama(str(tiny_elastic_llama.path), n_ctx=512, n_batch=128, n_threads=1, n_threads_batch=1,
                       verbose=False)
    a = served.create_completion("Hello world", max_tokens=6, temperature=0.0)
    b = ref.create_completion("Hello world", max_tokens=6, temperature=0.0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and "elms" not in a
    ref.close()


def test_slo_request_picks_level_and_compresses(served):
    slo = SLO.relative(0.6, 0.8)
    n_full = served.count_tokens(CONTEXT + "\n\n" + QUESTION, add_bos=True)
    n_c = served.count_tokens(CONTEXT)
    want = orchestrate.decide(served.profile, slo, n_fixed=n_full - n_c, n_compressible=n_c,
                              scorer="selfinfo@L0", levels=[0, 1, 2, -1])
    assert want.level == 1 and want.compress  # TPOT 0.8x rules out the full levels; TTFT 0.6x needs compression
    out = served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=4, temperature=0.0,
                                   echo=True)
    e = out["elms"]
    assert (e["level"], e["planned_prompt_ratio"]) == (want.level, want.prompt_ratio)
    assert e["predicted_ttft_ms"] == pytest.approx(want.predicted_ttft_ms)
    assert e["predicted_tpot_ms"] == pytest.approx(want.predicted_tpot_ms)
    assert 0 < e["prompt_ratio"] < 1 and e["prompt_tokens"] < e["prompt_tokens_original"]
    assert e["measured_ttft_ms"] > 0 and e["measured_tpot_ms"] > 0 and e["tlm_ms"] > 0
    assert e["scorer"] == "selfinfo@L0" and not e["score_cache_hit"]
    assert e["slo_tpot_ms"] == pytest.approx(0.8 * 2.0) and isinstance(e["ttft_met"], bool)
    assert served.level == 1
    text = out["choices"][0]["text"]
    prompt_part = text[: text.index(QUESTION) + len(QUESTION)]  # echo: the prompt, then the completion
    assert prompt_part.endswith(QUESTION)  # the question is intact, last
    assert is_subsequence(prompt_part[: -len(QUESTION)].split(), CONTEXT.split())  # context words in order
    # the same context again: cached scores, no scorer time (and none predicted)
    out2 = served.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=2, temperature=0.0)
    assert out2["elms"]["score_cache_hit"] and out2["elms"]["tlm_ms"] == 0.0
    assert out2["elms"]["predicted_scorer_ms"] == 0.0


def test_loose_slo_runs_dense_uncompressed(served):
    out = served.create_completion(prompt=QUESTION, context=CONTEXT, slo=SLO.relative(1.0, 1.0), max_tokens=3)
    e = out["elms"]
    assert (e["level"], e["prompt_ratio"], e["tlm_ms"]) == (-1, 1.0, 0.0)
    # context without an SLO: concatenated, current level
    out = served.create_completion(prompt=QUESTION, context=CONTEXT, max_tokens=2, echo=True)
    assert "elms" not in out and out["choices"][0]["text"].startswith(CONTEXT[:20])


def test_infeasible_slo(served):
    with pytest.raises(SLOInfeasible, match="cannot be met"):
        served.create_completion(prompt=QUESTION, context=CONTEXT, slo=SLO(ttft_ms=0.01, tpot_ms=0.01))
    out = served.create_completion(prompt=QUESTION, context=CONTEXT, slo=SLO(ttft_ms=0.01, tpot_ms=0.01),
                                   best_effort=True, max_tokens=2)
    assert not out["elms"]["feasible"] and out["elms"]["level"] == 0
    assert out["elms"]["ttft_met"] is False
    with pytest.raises(profile.SLOError):
        served.create_completion(prompt=QUESTION, slo=SLO(ttft_ms=-5))


def test_streamed_slo_requests_yield_the_same_text_and_end_with_the_elms_block(served):
    slo = SLO.relative(0.6, 0.8)
    kw = dict(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=5, temperature=0.0)
    served.create_completion(**kw)  # scores the context: both requests below plan with it cached
    whole = served.create_completion(**kw)
    served.set_level(-1)  # the stream must switch level itself
    chunks = list(served.create_completion(**kw, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [("elms" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    e, w = chunks[-1]["elms"], whole["elms"]
    for key in ("level", "planned_prompt_ratio", "prompt_ratio", "prompt_tokens", "prompt_tokens_original",
                "predicted_ttft_ms", "predicted_tpot_ms", "slo_ttft_ms", "slo_tpot_ms"):
        assert e[key] == w[key], key
    assert e["level"] == 1 and e["measured_ttft_ms"] > 0 and e["measured_tpot_ms"] > 0
    # chat
    msgs = [{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}]
    whole = served.create_chat_completion(msgs, slo=slo, max_tokens=4, temperature=0.0)
    chunks = list(served.create_chat_completion(msgs, slo=slo, max_tokens=4, temperature=0.0, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert "elms" in chunks[-1] and chunks[-1]["elms"]["prompt_tokens"] == whole["elms"]["prompt_tokens"]
    assert chunks[-1]["elms"]["level"] == whole["elms"]["level"] == 1


def test_chat_keeps_last_user_turn(served):
    msgs = [{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}]
    plain = served.create_chat_completion(msgs, max_tokens=2)
    out = served.create_chat_completion(msgs, slo=SLO.relative(0.6, 0.8), max_tokens=2)
    e = out["elms"]
    assert e["level"] == 1 and e["prompt_ratio"] < 1
    assert out["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"]
    assert served.compressor.is_cached(CONTEXT) and not served.compressor.is_cached(QUESTION)
    assert msgs[0]["content"] == CONTEXT  # the caller's messages are not modified


def test_profile_checks(tiny_elastic_llama, tiny_llama, tmp_path, monkeypatch):
    require_runtime()
    from elms_gguf.serve import ElasticLlama

    path = str(tiny_elastic_llama.path)
    with pytest.raises(ProfileError, match="another model"):
        ElasticLlama(path, profile=tiny_profile(str(tiny_llama.path), levels=((-1, 1.0),)), n_threads=1,
                     verbose=False)
    monkeypatch.setenv("ELMS_PROFILE_DIR", str(tmp_path))
    # planning on medians: this test is about finding and checking profiles; with calibrated margins a 1-round
    # profile's spread on a busy machine can make even the dense model miss a 1.0x SLO (tested elsewhere)
    llm = ElasticLlama(path, scorer="selfinfo", n_ctx=256, n_batch=128, n_threads=1, verbose=False, slo_quantile=None)
    assert llm.profile is None  # nothing saved yet
    with pytest.raises(ProfileError, match="no latency profile"):
        llm.create_completion(prompt=QUESTION, context=CONTEXT, slo=SLO.relative(0.5, 0.9))
    prof = llm.measure_profile(lengths=(8, 32), runs=1, n_decode=2)
    assert sorted(prof.levels) == [-1, 0, 1, 2] and "selfinfo@L0" in prof.scorers
    out = llm.create_completion(prompt=QUESTION, context=CONTEXT, slo=SLO.relative(1.0, 1.0), max_tokens=2)
    assert out["elms"]["level"] in (-1, 2)
    llm.close()
    # a second instance finds the saved profile by model, CPU and threads
    llm2 = ElasticLlama(path, n_ctx=256, n_threads=1, verbose=False)
    assert llm2.profile is not None and llm2.profile.checksum == prof.checksum and llm2.scorer is None
    llm2.close()


def test_calibration_learns_from_served_requests_and_widens_the_plan(tiny_elastic_llama):
    """With slo_quantile, every SLO request records measured/predicted; the planner then multiplies the
    predictions by that quantile, so a measured slowdown makes it pick a smaller (level, prompt) pair."""
    require_runtime()
    from elms_gguf.serve import ElasticLlama

    path = str(tiny_elastic_llama.path)
    llm = ElasticLlama(path, scorer="selfinfo", profile=tiny_profile(path), n_ctx=512, n_batch=128, n_threads=1,
                       verbose=False, slo_quantile=0.9)
    try:
        cal = llm.calibration
        assert cal is not None and cal.quantile == 0.9 and cal.margins() == (1.0, 1.0)  # no spread in the profile
        slo = SLO.relative(0.6, 0.8)
        out = llm.create_completion(prompt=QUESTION, context=CONTEXT, slo=slo, max_tokens=3, temperature=0.0)
        e = out["elms"]
        assert e["margins"] == [1.0, 1.0]
        assert cal.ttft == pytest.approx([e["measured_ttft_ms"] / e["predicted_ttft_ms"]])
        assert cal.tpot == pytest.approx([e["measured_tpot_ms"] / e["predicted_tpot_ms"]])
        n_full = llm.count_tokens(CONTEXT + "\n\n" + QUESTION, add_bos=True)
        n_c = llm.count_tokens(CONTEXT)
        cal.ttft[:], cal.tpot[:] = [1.0] * 40, [1.0] * 40  # requests exactly as predicted
        before = llm.plan(slo, n_fixed=n_full - n_c, n_compressible=n_c, contexts=[CONTEXT])
        assert (before.margin_ttft, before.margin_tpot) == (1.0, 1.0) and before.feasible
        cal.ttft[:] = [1.0] * 30 + [1.5] * 10  # the last requests: a quarter 1.5x slower than predicted
        assert cal.margins() == (1.5, 1.0)
        after = llm.plan(slo, n_fixed=n_full - n_c, n_compressible=n_c, contexts=[CONTEXT], best_effort=True)
        assert (after.margin_ttft, after.margin_tpot) == (1.5, 1.0)
        assert after.predicted_ttft_ms < before.predicted_ttft_ms
        assert not after.feasible or after.predicted_ttft_ms * 1.5 <= after.slo_ttft_ms + 1e-9
        llm.profile = tiny_profile(path)  # a new profile restarts the calibration
        assert llm.calibration is not cal and llm.calibration.ttft == []
        with pytest.raises(ValueError, match="slo_quantile"):
            ElasticLlama(path, profile=None, n_ctx=64, n_threads=1, verbose=False, slo_quantile=1.5)
    finally:
        llm.close()
