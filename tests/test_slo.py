"""Latency profiles, SLOs and the (level, prompt ratio) decision (elms_gguf.profile, elms_gguf.orchestrate).

Synthetic profiles are exact and instant; one test measures a real profile of the tiny elastic model.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest

from elms_gguf import orchestrate, profile
from elms_gguf.orchestrate import SLOInfeasible, decide
from elms_gguf.profile import SLO, Curve, LatencyProfile, LevelProfile, ProfileError, SLOError


def synthetic_profile(levels=((0, 0.3), (1, 0.6), (-1, 1.0)), *, tlm_ms_per_token: float = 0.1,
                      fixed_ms: float = 5.0, ms_per_token: float = 2.0, tpot_dense: float = 20.0,
                      checksum: str = "c0ffee") -> LatencyProfile:
    """TTFT_l(n) = fixed + ms_per_token * ratio * n, TPOT_l = tpot_dense * ratio; scorer 'tlm' linear."""
    lv = {}
    for idx, r in levels:
        lv[idx] = LevelProfile(level=idx, ratio=r, ttft=Curve((fixed_ms, ms_per_token * r, 0.0)), tpot_ms=tpot_dense * r)
    return LatencyProfile(model={"checksum": checksum, "name": "synthetic.gguf", "model_id": "syn", "size": 1},
                          device=profile.device_info(1), levels=lv,
                          scorers={"tlm": Curve((1.0, tlm_ms_per_token, 0.0))})


# -- SLO -----------------------------------------------------------------------------------------------


def test_slo_accepts_ms_and_relative():
    s = SLO(800, 60)
    assert (s.ttft_ms, s.tpot_ms, s.is_relative) == (800.0, 60.0, False)
    r = SLO.relative(0.6, 0.8)
    assert r.is_relative and r.ttft_ms == 0.6
    assert SLO(ttft_ms=100).tpot_ms is None  # unconstrained
    assert SLO.coerce((100, 10)) == SLO(100, 10)
    assert SLO.coerce({"ttft": 0.5, "tpot": 0.7, "relative": True}) == SLO.relative(0.5, 0.7)


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf"), "fast", True, [1]])
def test_slo_refuses_bad_values(bad):
    with pytest.raises(SLOError, match="TTFT SLO"):
        SLO(ttft_ms=bad, tpot_ms=10)
    with pytest.raises(SLOError, match="TPOT SLO"):
        SLO.relative(0.5, bad)


def test_relative_slo_resolves_against_dense():
    p = synthetic_profile()
    ttft, tpot = SLO.relative(0.5, 0.8).resolve(p, 100)
    assert ttft == pytest.approx(0.5 * (5 + 2 * 100))
    assert tpot == pytest.approx(0.8 * 20)
    assert SLO(ttft_ms=50).resolve(p, 100) == (50.0, math.inf)
    with pytest.raises(SLOError, match="needs a latency profile"):
        SLO.relative(0.5, 0.5).resolve(None, 100)


# -- curves and profile I/O ------------------------------------------------------------------------------


def test_fit_quadratic_recovers_and_stays_non_negative():
    a, b, c = profile.fit_quadratic([(n, 3 + 0.5 * n + 0.001 * n * n) for n in (16, 64, 256, 512)])
    assert (a, b, c) == pytest.approx((3, 0.5, 0.001), rel=1e-6)
    # a decreasing cloud must not give negative terms
    coef = profile.fit_quadratic([(10, 9.0), (100, 5.0), (200, 4.0)])
    assert all(x >= 0 for x in coef)
    cv = Curve((2.0, 0.5, 0.01))
    n = cv.max_n(100.0)
    assert cv(n) == pytest.approx(100.0) and cv.max_n(1.0) == 0.0


def test_profile_roundtrip_and_foreign_model_refused(tmp_path, tiny_elastic_llama, tiny_llama):
    fp = profile.model_fingerprint(tiny_elastic_llama.path)
    assert fp["model_id"] == "tiny-test" and fp["size"] == tiny_elastic_llama.path.stat().st_size
    p = synthetic_profile()
    p.model = dict(fp)
    path = p.save(tmp_path / "p.json")
    q = LatencyProfile.load(path, model_path=tiny_elastic_llama.path)
    assert q.ttft_ms(1, 100) == pytest.approx(p.ttft_ms(1, 100)) and q.scorer_ms("tlm", 10) == pytest.approx(2.0)
    with pytest.raises(ProfileError, match="another model"):
        LatencyProfile.load(path, model_path=tiny_llama.path)
    # same bytes under another name: same model; one byte changed: another model
    cp = tmp_path / "copy.gguf"
    shutil.copy(tiny_elastic_llama.path, cp)
    LatencyProfile.load(path, model_path=cp)
    with open(cp, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ProfileError, match="another model"):
        LatencyProfile.load(path, model_path=cp)


def test_profile_refuses_malformed(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(ProfileError, match="not an elms latency profile"):
        LatencyProfile.load(bad)
    d = synthetic_profile().to_json()
    d["levels"][0]["tpot_ms"] = -1
    bad.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="bad tpot_ms"):
        LatencyProfile.load(bad)
    with pytest.raises(ProfileError, match="not found"):
        LatencyProfile.load(tmp_path / "none.json")
    with pytest.raises(ProfileError, match="not profiled"):
        synthetic_profile().scorer_ms("selfinfo", 10)


def test_measure_tiny_model(tiny_elastic_llama, tmp_path, monkeypatch):
    from runtime_helpers import require_runtime

    require_runtime()
    monkeypatch.setenv("ELMS_PROFILE_DIR", str(tmp_path))
    calls = []
    p = profile.measure(tiny_elastic_llama.path, n_threads=1, lengths=(4, 16, 32), runs=1, n_decode=2,
                        scorers={"fake": lambda n: calls.append(n) or 0.5 + 0.01 * n})
    assert sorted(p.levels) == [-1, 0, 1, 2]
    assert p.levels[0].ratio == pytest.approx(0.4) and p.dense.level == -1
    for lp in p.levels.values():
        assert all(c >= 0 for c in lp.ttft.coef) and lp.tpot_ms > 0 and len(lp.ttft.samples) == 3
    assert p.scorer_ms("fake", 10) == pytest.approx(0.6, rel=1e-3) and 32 in calls
    assert p.device["n_threads"] == 1 and p.device["cpu"] == profile.cpu_model()
    out = p.save(profile.default_profile_path(tiny_elastic_llama.path, 1))
    assert profile.find_profile(tiny_elastic_llama.path, 1).checksum == p.checksum
    assert out.startswith(str(tmp_path))
    with pytest.raises(ProfileError, match="level 7 does not exist"):
        profile.measure(tiny_elastic_llama.path, n_threads=1, lengths=(4,), runs=1, levels=[7])


def test_cli_profile(tiny_llama, tmp_path, capsys):
    from runtime_helpers import require_runtime

    require_runtime()
    out = tmp_path / "dense.json"
    rc = profile.main([str(tiny_llama.path), "-t", "1", "--lengths", "4,16", "--runs", "1", "--decode", "2",
                       "-o", str(out)])
    assert rc == 0 and "saved" in capsys.readouterr().out
    p = LatencyProfile.load(out, model_path=tiny_llama.path)
    assert list(p.levels) == [-1]  # a plain GGUF: dense only
    assert profile.main([str(tmp_path / "missing.gguf"), "-o", str(out)]) == 1


# -- decision ----------------------------------------------------------------------------------------------


def feasible(p, d, slo_ttft, slo_tpot):
    return (p.ttft_ms(d.level, d.n_prompt) + d.predicted_scorer_ms <= slo_ttft + 1e-6
            and p.tpot_ms(d.level) <= slo_tpot + 1e-6)


def test_decide_dense_when_no_pressure():
    p = synthetic_profile()
    d = decide(p, SLO.relative(1.0, 1.0), n_fixed=20, n_compressible=200, scorer="tlm")
    assert (d.level, d.prompt_ratio, d.feasible) == (-1, 1.0, True)
    assert d.predicted_scorer_ms == 0.0 and not d.compress  # nothing compressed: no scorer time
    d = decide(p, SLO(), n_fixed=20)
    assert d.level == -1


def test_decide_prefers_largest_level_then_most_prompt():
    p = synthetic_profile()
    # TPOT 0.8x dense rules out the dense level; TTFT allows level 1 (0.6) with the whole prompt
    d = decide(p, SLO.relative(1.0, 0.8), n_fixed=20, n_compressible=200, scorer="tlm")
    assert (d.level, d.prompt_ratio) == (1, 1.0)
    # tighter TTFT: level 1 still, but compressed; the largest ratio that fits
    d = decide(p, SLO.relative(0.45, 0.8), n_fixed=20, n_compressible=200, scorer="tlm")
    assert d.level == 1 and d.prompt_ratio < 1.0 and d.compress
    slo_ttft, slo_tpot = SLO.relative(0.45, 0.8).resolve(p, 220)
    assert feasible(p, d, slo_ttft, slo_tpot)
    bigger = d.prompt_ratio + orchestrate.DEFAULT_RATIO_STEP
    assert p.ttft_ms(1, 20 + round(bigger * 200)) + d.predicted_scorer_ms > slo_ttft  # next ratio up misses
    assert d.predicted_scorer_ms == pytest.approx(1.0 + 0.1 * 200)


def test_decide_respects_feasibility_on_a_grid():
    p = synthetic_profile(levels=((0, 0.2), (1, 0.4), (2, 0.6), (3, 0.8), (-1, 1.0)))
    for tt in (0.2, 0.3, 0.4, 0.6, 0.8, 1.0):
        for tp in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            for n_fixed, n_c in ((10, 300), (100, 50), (50, 0)):
                slo = SLO.relative(tt, tp)
                st, sp = slo.resolve(p, n_fixed + n_c)
                try:
                    d = decide(p, slo, n_fixed=n_fixed, n_compressible=n_c, scorer="tlm")
                except SLOInfeasible as e:
                    # then really no pair on the grid fits
                    for lv in p.levels:
                        for rho in orchestrate.ratio_grid():
                            n = n_fixed + (n_c if rho == 1 else round(rho * n_c))
                            sc = 0 if rho == 1 or n_c == 0 else p.scorer_ms("tlm", n_c)
                            assert not (p.ttft_ms(lv, n) + sc <= st and p.tpot_ms(lv) <= sp)
                    assert not e.decision.feasible
                    continue
                assert d.feasible and feasible(p, d, st, sp)
                assert d.prompt_ratio >= orchestrate.DEFAULT_MIN_PROMPT_RATIO
                # no larger level is feasible at any allowed ratio
                for lv, lp in p.levels.items():
                    if lp.ratio > d.level_ratio and lp.tpot_ms <= sp:
                        for rho in orchestrate.ratio_grid():
                            n = n_fixed + (n_c if rho == 1 else round(rho * n_c))
                            sc = 0 if rho == 1 or n_c == 0 else p.scorer_ms("tlm", n_c)
                            assert p.ttft_ms(lv, n) + sc > st


def test_decide_infeasible_reports_and_best_effort():
    p = synthetic_profile()
    with pytest.raises(SLOInfeasible, match="TPOT SLO 1.00 ms < the fastest level's TPOT 6.00 ms"):
        decide(p, SLO(ttft_ms=1e6, tpot_ms=1.0), n_fixed=10, n_compressible=10, scorer="tlm")
    with pytest.raises(SLOInfeasible, match="TTFT SLO 2.0 ms < the fastest option's TTFT"):
        decide(p, SLO(ttft_ms=2.0), n_fixed=10, n_compressible=100, scorer="tlm")
    with pytest.raises(SLOInfeasible, match="nothing in the prompt is compressible"):
        decide(p, SLO.relative(0.2, 1.0), n_fixed=300)
    # TTFT out of reach: the fastest pair (smallest level, least prompt)
    d = decide(p, SLO.relative(0.05, 1.0), n_fixed=10, n_compressible=300, scorer="tlm", best_effort=True)
    assert not d.feasible and d.level == 0 and d.prompt_ratio == pytest.approx(orchestrate.DEFAULT_MIN_PROMPT_RATIO)
    assert d.reason.startswith("infeasible")
    # TPOT out of reach (6 ms > 4 ms) dominates the overshoot: the smallest level, and the TTFT SLO still met:
    # the largest prompt ratio with 5 + 0.6 * (10 + 300 rho) + 31 <= 125 ms (0.2 x dense 625 ms) is 0.45
    d = decide(p, SLO.relative(0.2, 0.2), n_fixed=10, n_compressible=300, scorer="tlm", best_effort=True)
    assert not d.feasible and d.level == 0 and d.slo_ttft_ms == pytest.approx(125.0)
    assert d.prompt_ratio == pytest.approx(0.45) and d.predicted_ttft_ms <= d.slo_ttft_ms


def test_decide_scorer_cost_counts_only_when_compressing():
    p = synthetic_profile(tlm_ms_per_token=5.0)  # an expensive scorer: compressing does not pay
    slo = SLO.relative(0.7, 1.0)
    d = decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm")
    assert d.prompt_ratio == 1.0 and d.level != -1  # a smaller level with the whole prompt instead
    # cached scores cost nothing: compression becomes worth it on the dense model
    d2 = decide(p, slo, n_fixed=20, n_compressible=200, scorer_ms=lambda n: 0.0)
    assert d2.level == -1 and d2.prompt_ratio < 1.0


def test_decide_validates_input():
    p = synthetic_profile()
    with pytest.raises(SLOError):
        decide(p, SLO.coerce("fast"), n_fixed=1)
    with pytest.raises(ValueError, match="n_fixed"):
        decide(p, SLO(100, 10), n_fixed=-1)
    with pytest.raises(ValueError, match="not in the profile"):
        decide(p, SLO(100, 10), n_fixed=1, levels=[5])
    assert orchestrate.ratio_grid(0.5, 0.25) == [1.0, 0.75, 0.5]


def test_decide_headroom_plans_below_the_slo():
    p = synthetic_profile()
    slo = SLO.relative(0.6, 1.0)
    d0 = decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm")
    d1 = decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm", headroom=0.2)
    assert d1.slo_ttft_ms == d0.slo_ttft_ms  # the reported SLO is the real one
    assert d1.predicted_ttft_ms <= 0.8 * d1.slo_ttft_ms + 1e-9
    assert d0.predicted_ttft_ms > 0.8 * d0.slo_ttft_ms  # without headroom the budget is used beyond 80 %
    with pytest.raises(ValueError, match="headroom"):
        decide(p, slo, n_fixed=1, headroom=1.0)


def test_tpot_of_a_short_generation_uses_the_per_position_profile():
    """The first tokens after a prefill are slower: a request's TPOT is the mean over its own intervals."""
    p = synthetic_profile()
    for lp in p.levels.values():
        lp.tpot_by_position = [2.0 * lp.tpot_ms, 1.5 * lp.tpot_ms, lp.tpot_ms]
    dense = p.levels[-1]
    assert p.tpot_ms(-1) == dense.tpot_ms
    assert p.tpot_ms(-1, 2) == pytest.approx(1.75 * dense.tpot_ms)
    assert p.tpot_ms(-1, 5) == pytest.approx((2.0 + 1.5 + 1 + 1 + 1) / 5 * dense.tpot_ms)
    # a relative SLO is relative to the dense model over as many tokens
    assert SLO.relative(1.0, 0.5).resolve(p, 100, 2)[1] == pytest.approx(0.5 * 1.75 * dense.tpot_ms)
    # an absolute TPOT SLO the small level meets in steady state but not over a 2-token generation
    slo = SLO(ttft_ms=None, tpot_ms=0.3 * 20.0 * 1.2)  # synthetic TPOT_l = 20 ms x ratio; level 0 = 6 ms
    assert decide(p, slo, n_fixed=10, levels=[0, 1, -1]).level == 0
    d = decide(p, slo, n_fixed=10, levels=[0, 1, -1], n_decode=2, best_effort=True)
    assert not d.feasible and d.predicted_tpot_ms == pytest.approx(1.75 * 6.0)
    back = LatencyProfile.from_json(json.loads(json.dumps(p.to_json())))
    assert back.levels[0].tpot_by_position == p.levels[0].tpot_by_position


def test_decide_margin_plans_for_a_quantile_and_says_so():
    """Predictions x margin must fit the SLO: with a TTFT margin of 1.3 the chosen pair's median prediction leaves
    30 % room, the reported prediction is still the profile's, and an infeasible report names the margins."""
    p = synthetic_profile()
    slo = SLO.relative(0.6, 0.7)
    d0 = decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm")
    d1 = decide(p, slo, n_fixed=20, n_compressible=200, scorer="tlm", margin=(1.3, 1.0))
    assert (d1.margin_ttft, d1.margin_tpot) == (1.3, 1.0) and d1.feasible
    assert d1.predicted_ttft_ms * 1.3 <= d1.slo_ttft_ms + 1e-9 < d0.predicted_ttft_ms * 1.3
    assert d1.predicted_ttft_ms == pytest.approx(p.ttft_ms(d1.level, d1.n_prompt) + d1.predicted_scorer_ms)
    # a TPOT margin moves the level down: level 1 (12 ms) meets a 14 ms TPOT SLO, but not x 1.25
    assert decide(p, SLO(tpot_ms=14.0), n_fixed=10).level == 1
    assert decide(p, SLO(tpot_ms=14.0), n_fixed=10, margin=(1.0, 1.25)).level == 0
    with pytest.raises(SLOInfeasible, match=r"TPOT x margin 7.50 ms.*margins x 1.00 \(TTFT\), x 1.25 \(TPOT\)"):
        decide(p, SLO(tpot_ms=7.0), n_fixed=10, margin=(1.0, 1.25))
    for bad in ((0.0, 1.0), (1.0, float("nan")), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="margin"):
            decide(p, slo, n_fixed=1, margin=bad)


def test_calibration_starts_from_the_profile_spread_then_follows_served_requests():
    p = synthetic_profile()
    p.meta["raw_ttft_ms"] = {"0@100": [p.ttft_ms(0, 100) * f for f in (0.9, 1.0, 1.2)],
                             "-1@100": [p.ttft_ms(-1, 100) * f for f in (1.0, 1.1, 1.5)]}
    for lp in p.levels.values():
        lp.tpot_by_position = [lp.tpot_ms, lp.tpot_ms]
        lp.tpot_samples = [lp.tpot_ms * f for f in (1.0, 1.05, 0.95, 1.1)]
    cal = profile.LatencyCalibration.from_profile(p, quantile=0.8, min_observed=4, window=5)
    assert sorted(cal.prior_ttft) == pytest.approx([0.9, 1.0, 1.0, 1.1, 1.2, 1.5])
    assert cal.margins() == pytest.approx((1.2, 1.1))  # 0.8 quantile ("higher") of the prior
    # fewer than min_observed requests: the larger of the prior's quantile and theirs
    cal.observe(predicted_ttft_ms=100.0, measured_ttft_ms=110.0, predicted_tpot_ms=10.0, measured_tpot_ms=None)
    assert cal.margins() == pytest.approx((1.2, 1.1))  # 1.1 < the prior's 1.2
    for f in (2.0, 2.0):
        cal.observe(predicted_ttft_ms=100.0, measured_ttft_ms=100.0 * f, predicted_tpot_ms=10.0, measured_tpot_ms=None)
    assert cal.margins()[0] == pytest.approx(2.0) and cal.margins()[1] == pytest.approx(1.1)
    # a large prior near 1 does not dilute the first served requests (pooled, 2 of 102 would not move a 0.8 quantile)
    big = profile.LatencyCalibration(quantile=0.8, min_observed=4, prior_ttft=[1.0] * 100, prior_tpot=[1.0] * 100)
    for _ in range(2):
        big.observe(predicted_ttft_ms=100.0, measured_ttft_ms=130.0, predicted_tpot_ms=10.0, measured_tpot_ms=12.0)
    assert big.margins() == pytest.approx((1.3, 1.2))
    # enough requests: only the window of observed ones counts (oldest dropped), never below the floor of 1
    for f in (0.5, 0.6, 0.7, 0.8, 0.9):
        cal.observe(predicted_ttft_ms=100.0, measured_ttft_ms=100.0 * f, predicted_tpot_ms=10.0, measured_tpot_ms=5.0)
    assert cal.ttft == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9]) and cal.margins() == (1.0, 1.0)
    cal.observe(predicted_ttft_ms=100.0, measured_ttft_ms=float("nan"))  # ignored
    assert len(cal.ttft) == 5 and cal.summary()["observed"] == 5
    with pytest.raises(ValueError, match="quantile"):
        profile.LatencyCalibration(quantile=1.0)


# -- the end-to-end benchmark's scoring (bench/bench_slo.py) ---------------------------------------------------


def _bench_slo():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_slo.py"
    spec = importlib.util.spec_from_file_location("bench_slo_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _request(correct: bool, met: bool) -> dict:
    return {"correct": correct, "met": met, "ttft_met": met, "level_ratio": 0.5, "prompt_ratio": 1.0,
            "measured_ttft_ms": 90.0, "slo_ttft_ms": 100.0, "predicted_ttft_ms": 80.0, "measured_tpot_ms": 9.0,
            "predicted_tpot_ms": 8.0, "tlm_ms": 0.0}


def test_bench_slo_counts_an_answer_on_time_only_when_its_slo_was_met():
    b = _bench_slo()
    # a: right+on time, right+late, wrong+on time, right+on time; b: right+late x2, wrong+on time, right+on time
    a = [_request(True, True), _request(True, False), _request(False, True), _request(True, True)]
    c = [_request(True, False), _request(True, False), _request(False, True), _request(True, True)]
    results = {"a": {"piqa": a}, "b": {"piqa": c}}
    s = b.summarize(results, [("piqa", (0.2, 0.6))], [0.0])
    assert s["a"]["apps"]["piqa"]["accuracy"] == 0.75 and s["b"]["apps"]["piqa"]["accuracy"] == 0.75
    assert s["a"]["apps"]["piqa"]["on_time_accuracy"] == 0.5 and s["b"]["apps"]["piqa"]["on_time_accuracy"] == 0.25
    assert s["a"]["trace"]["alpha=0"]["on_time_accuracy"] == 0.5
    p = b.paired(results, "a", "b", ["piqa"])
    # per-question on-time differences: 1, 0, 0, 0 -> mean 0.25, sample sd 0.5, se 0.5 / 2
    assert p["n"] == 4 and p["accuracy_diff"] == 0.0 and p["accuracy_se"] == 0.0
    assert p["on_time_accuracy_diff"] == pytest.approx(0.25) and p["on_time_accuracy_se"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same questions"):
        b.paired({"a": {"piqa": a}, "b": {"piqa": c[:3]}}, "a", "b", ["piqa"])
    assert "a - b" in b.format_pairs(results, "a")
    one = {"a": {"piqa": a, "sciq": a[:1]}, "b": {"piqa": c, "sciq": c[:1]}}  # one sciq question: no SE there
    report = b.format_pairs(one, "a")
    assert "sciq        fewer than 2 questions" in report and "a - b            piqa" in report


def test_bench_slo_splits_attainment_by_reachable_slo_and_by_the_first_requests_of_the_process():
    b = _bench_slo()
    rs = [_request(True, met) for met in (False, False, True, True, True, False)]
    for i, (r, reach) in enumerate(zip(rs, (True, False, True, True, True, False))):
        r["reachable"], r["seq"] = reach, i
    rs[1]["measured_ttft_ms"] = 160.0  # 2.0x its prediction, among the first FIRST
    rs[0].update(tlm_ms=30.0, predicted_scorer_ms=20.0, score_cache_hit=False)  # scored a new context
    rs[2].update(tlm_ms=0.0, predicted_scorer_ms=0.0, score_cache_hit=True)
    s = b.summarize({"a": {"piqa": rs}}, [("piqa", (0.2, 0.6))], [0.0])["a"]["pooled"]
    assert b.FIRST == 3
    assert s["n"] == 6 and s["attainment"] == 0.5
    assert s["n_reachable"] == 4 and s["attainment_reachable"] == 0.75  # met on seq 2, 3, 4 of 0, 2, 3, 4
    assert s["n_first"] == 3 and s["attainment_first"] == pytest.approx(1 / 3)
    assert s["attainment_later"] == pytest.approx(2 / 3)
    assert s["ttft_err_first"] == 90.0 / 80.0 and s["ttft_err_later"] == 90.0 / 80.0
    assert s["n_scored"] == 1 and s["scorer_err"] == 1.5
    old = b.summarize({"a": {"piqa": [_request(True, True)]}}, [("piqa", (0.2, 0.6))], [0.0])["a"]["pooled"]
    assert old["attainment"] == 1.0 and math.isnan(old["n_reachable"]) and math.isnan(old["attainment_first"])
    assert "SLO reachable" in b.format_summary(b.summarize({"a": {"piqa": rs}}, [("piqa", (0.2, 0.6))], [0.0]),
                                               ["a"], [("piqa", (0.2, 0.6))])


def test_bench_slo_holds_every_mode_to_the_reference_profiles_milliseconds():
    b = _bench_slo()

    class Tok:
        def count_tokens(self, text, add_bos=False):
            return len(text.split()) + int(add_bos)

    class App:
        context = "a b c d e f g h"

        def question(self, item):
            return "q r"

    n_full, n_c = b.request_tokens(Tok(), App(), None)
    assert (n_full, n_c) == (11, 8)  # 8 + 2 words + BOS
    ref, other = synthetic_profile(tpot_dense=20.0), synthetic_profile(tpot_dense=30.0, ms_per_token=3.0)
    s = b.shared_slo(ref, SLO.relative(0.5, 0.8), n_full, 4)
    assert not s.is_relative
    assert s.ttft_ms == pytest.approx(0.5 * (5.0 + 2.0 * 11)) and s.tpot_ms == pytest.approx(0.8 * 20.0)
    assert s.resolve(other, 11, 4) == s.resolve(ref, 11, 4)  # the other model's profile no longer moves it
    assert SLO.relative(0.5, 0.8).resolve(other, 11, 4) != s.resolve(ref, 11, 4)
    assert b.shared_slo(ref, SLO.relative(None, 0.8), n_full, 4).ttft_ms is None
