"""Choose (level, prompt ratio) for one request so that it meets a latency SLO (the ELMS orchestration).

A request has ``n_fixed`` tokens that are never compressed (the question or last user turn, the chat template)
and ``n_compressible`` tokens that may be (the instruction and in-context examples). Keeping a fraction ``rho``
of the compressible part gives a prompt of ``n_fixed + rho * n_compressible`` tokens. With a
:class:`~elms_gguf.profile.LatencyProfile` the predicted latencies of running it on level ``l`` are

    TTFT = TTFT_l(n_fixed + rho * n_compressible) + scorer(n_compressible)   (scorer only when rho < 1)
    TPOT = TPOT_l

The rule (:func:`decide`), the ELMS labelling rule of paper §3.4 made deterministic:

1. **the largest level** whose TPOT meets the TPOT SLO and that meets the TTFT SLO with some prompt ratio
   ``rho >= min_prompt_ratio`` (model capacity is what the TPOT budget buys and the prompt cannot give back);
2. at that level, **the largest prompt ratio** that fits (keep as much of the prompt as the budget allows; no
   compression at all when the uncompressed prompt fits, so no scorer time is spent either).

The ratio grid is ``1.0, 1 - step, ..., min_prompt_ratio``. When no pair is feasible, :func:`decide` raises
:class:`SLOInfeasible` (with the fastest option and why it misses) or, with ``best_effort=True``, returns the pair
with the smallest worst-case SLO overshoot (``max(TTFT/TTFT_slo, TPOT/TPOT_slo)``), marked ``feasible=False``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from .profile import SLO, LatencyProfile, SLOError

DEFAULT_MIN_PROMPT_RATIO = 0.2
DEFAULT_RATIO_STEP = 0.05
_EPS = 1e-9


class SLOInfeasible(RuntimeError):
    """No (level, prompt ratio) meets the SLO; ``.decision`` is the best effort, ``.fastest`` the fastest option."""

    def __init__(self, message: str, decision: "Decision") -> None:
        super().__init__(message)
        self.decision = decision


@dataclass
class Decision:
    """What to run: a level (-1 = dense) and the fraction ``prompt_ratio`` of the compressible tokens to keep."""

    level: int
    level_ratio: float
    prompt_ratio: float
    n_fixed: int
    n_compressible: int
    n_prompt: int                 # predicted prompt tokens after compression
    predicted_prefill_ms: float
    predicted_scorer_ms: float
    predicted_ttft_ms: float      # prefill + scorer
    predicted_tpot_ms: float
    slo_ttft_ms: float            # the SLO in ms for this request (inf = unconstrained)
    slo_tpot_ms: float
    feasible: bool = True
    reason: str = ""
    options: int = 0              # how many (level, ratio) pairs were considered
    margin_ttft: float = 1.0      # the predictions were tested against the SLO multiplied by these
    margin_tpot: float = 1.0      # (LatencyCalibration: measured/predicted quantiles of served requests)

    @property
    def compress(self) -> bool:
        return self.prompt_ratio < 1.0 and self.n_compressible > 0

    @property
    def n_keep(self) -> int:
        """Compressible tokens to keep."""
        return self.n_prompt - self.n_fixed

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        for k in ("slo_ttft_ms", "slo_tpot_ms"):
            if math.isinf(d[k]):
                d[k] = None
        return d


def ratio_grid(min_prompt_ratio: float = DEFAULT_MIN_PROMPT_RATIO, step: float = DEFAULT_RATIO_STEP) -> list[float]:
    """``1.0, 1 - step, ..., >= min_prompt_ratio`` (descending)."""
    if not (0 < min_prompt_ratio <= 1):
        raise ValueError(f"min_prompt_ratio must be in (0, 1], got {min_prompt_ratio}")
    if not (0 < step <= 1):
        raise ValueError(f"ratio step must be in (0, 1], got {step}")
    out, k = [], 0
    while True:
        r = round(1.0 - k * step, 6)
        if r < min_prompt_ratio - _EPS:
            break
        out.append(r)
        k += 1
    return out


def _kept(n_compressible: int, rho: float) -> int:
    return n_compressible if rho >= 1.0 else int(round(rho * n_compressible))


def decide(
    profile: LatencyProfile,
    slo: SLO | object,
    *,
    n_fixed: int,
    n_compressible: int = 0,
    scorer: str | None = None,
    scorer_ms: Callable[[int], float] | None = None,
    min_prompt_ratio: float = DEFAULT_MIN_PROMPT_RATIO,
    ratio_step: float = DEFAULT_RATIO_STEP,
    levels: Sequence[int] | None = None,
    best_effort: bool = False,
    headroom: float = 0.0,
    prompt_ratios: Sequence[float] | None = None,
    overhead_ms: float = 0.0,
    n_decode: int | None = None,
    margin: tuple[float, float] = (1.0, 1.0),
) -> Decision:
    """The (level, prompt ratio) to run a request with (see the module docstring).

    Args:
        profile: the model's latency profile on this device.
        slo: an :class:`~elms_gguf.profile.SLO` (or what :meth:`SLO.coerce` accepts); relative SLOs are fractions
            of the dense model at the full (uncompressed) prompt length.
        n_fixed: prompt tokens never compressed (question, template, BOS).
        n_compressible: prompt tokens that may be compressed (instruction, examples).
        scorer: name of the prompt scorer in ``profile.scorers`` whose cost counts when compressing.
        scorer_ms: alternatively a function n_compressible -> ms (e.g. 0 when the scores are cached).
            With neither, compression is not considered.
        min_prompt_ratio: never keep less than this fraction of the compressible tokens.
        levels: the levels allowed (default: every level in the profile).
        best_effort: return the least-bad pair (``feasible=False``) instead of raising :class:`SLOInfeasible`.
        headroom: plan against ``(1 - headroom)`` of the SLO (absorbs latency noise; the reported SLO is the real
            one).
        prompt_ratios: consider exactly these prompt ratios (largest first) instead of the grid
            ``min_prompt_ratio .. 1`` (e.g. the one ratio a decision head chose).
        overhead_ms: time already spent on this request before prefill whatever is chosen (e.g. the TLM pass
            that fed a decision head); added to every predicted TTFT and reported as scorer time.
        n_decode: output tokens after the first (``max_tokens - 1``): TPOT is predicted as the mean over that many
            intervals (the first tokens after a prefill are slower); None = steady state.
        margin: (TTFT, TPOT) multipliers of the predictions when testing them against the SLO, e.g.
            :meth:`~elms_gguf.profile.LatencyCalibration.margins` (plan for a quantile, not the median); the
            reported predictions stay the profile's.
    """
    slo = SLO.coerce(slo)
    if isinstance(n_fixed, bool) or int(n_fixed) != n_fixed or n_fixed < 0:
        raise ValueError(f"n_fixed must be a non-negative integer, got {n_fixed!r}")
    if isinstance(n_compressible, bool) or int(n_compressible) != n_compressible or n_compressible < 0:
        raise ValueError(f"n_compressible must be a non-negative integer, got {n_compressible!r}")
    n_fixed, n_compressible = int(n_fixed), int(n_compressible)
    n_full = n_fixed + n_compressible
    if not (0.0 <= headroom < 1.0):
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    m_ttft, m_tpot = (float(m) for m in margin)
    if not (m_ttft > 0 and m_tpot > 0 and math.isfinite(m_ttft) and math.isfinite(m_tpot)):
        raise ValueError(f"margin must be two positive numbers, got {margin!r}")
    slo_ttft, slo_tpot = slo.resolve(profile, n_full, n_decode)
    # testing prediction x margin against SLO x (1 - headroom) == testing the prediction against plan_*
    plan_ttft, plan_tpot = slo_ttft * (1 - headroom) / m_ttft, slo_tpot * (1 - headroom) / m_tpot
    can_compress = n_compressible > 0 and (scorer is not None or scorer_ms is not None)
    cost = 0.0
    if can_compress:
        cost = float(scorer_ms(n_compressible)) if scorer_ms is not None else profile.scorer_ms(scorer, n_compressible)
    if prompt_ratios is not None:
        if not prompt_ratios or any(not (0 < float(r) <= 1) for r in prompt_ratios):
            raise ValueError(f"prompt_ratios must be non-empty, each in (0, 1], got {list(prompt_ratios)}")
        grid = sorted({float(r) for r in prompt_ratios}, reverse=True) if can_compress else [1.0]
    else:
        grid = ratio_grid(min_prompt_ratio, ratio_step) if can_compress else [1.0]
    lvls = list(profile.level_order()) if levels is None else [int(x) for x in levels]
    for lv in lvls:
        if lv not in profile.levels:
            raise ValueError(f"level {lv} is not in the profile (levels {sorted(profile.levels)})")
    lvls.sort(key=lambda lv: (profile.levels[lv].ratio, lv == -1), reverse=True)  # largest first

    def make(lv: int, rho: float, feasible: bool, reason: str) -> Decision:
        n_prompt = n_fixed + _kept(n_compressible, rho)
        prefill = profile.ttft_ms(lv, n_prompt)
        sc = (cost if (rho < 1.0 and can_compress) else 0.0) + float(overhead_ms)
        return Decision(level=lv, level_ratio=profile.levels[lv].ratio, prompt_ratio=rho, n_fixed=n_fixed,
                        n_compressible=n_compressible, n_prompt=n_prompt, predicted_prefill_ms=prefill,
                        predicted_scorer_ms=sc, predicted_ttft_ms=prefill + sc,
                        predicted_tpot_ms=profile.tpot_ms(lv, n_decode), slo_ttft_ms=slo_ttft, slo_tpot_ms=slo_tpot,
                        feasible=feasible, reason=reason, options=len(lvls) * len(grid),
                        margin_ttft=m_ttft, margin_tpot=m_tpot)

    def fits(value: float, limit: float) -> bool:
        return value <= limit * (1 + _EPS) + _EPS

    for lv in lvls:
        if not fits(profile.tpot_ms(lv, n_decode), plan_tpot):
            continue
        for rho in grid:
            d = make(lv, rho, True, "")
            if fits(d.predicted_ttft_ms, plan_ttft):
                d.reason = ("largest level meeting the TPOT SLO; " +
                            ("the whole prompt fits" if rho >= 1.0 else f"largest prompt ratio that fits ({rho:g})"))
                return d

    # infeasible: the least-bad pair, and a report
    def overshoot(d: Decision) -> float:
        return max(d.predicted_ttft_ms * m_ttft / slo_ttft if slo_ttft > 0 else math.inf,
                   d.predicted_tpot_ms * m_tpot / slo_tpot if slo_tpot > 0 else math.inf)

    def missed(d: Decision) -> int:  # how many of the two targets the plan misses
        return int(not fits(d.predicted_ttft_ms, plan_ttft)) + int(not fits(d.predicted_tpot_ms, plan_tpot))

    # the smallest worst-case overshoot; among equals, one that still meets the other target (a TPOT SLO out of
    # reach must not also cost the TTFT: cut the prompt until that fits), then the largest level and prompt
    cands = [make(lv, rho, False, "") for lv in lvls for rho in grid]
    best = min(cands, key=lambda d: (overshoot(d), missed(d), -d.level_ratio, -d.prompt_ratio))
    fastest_ttft = min(cands, key=lambda d: d.predicted_ttft_ms)
    fastest_tpot = min(cands, key=lambda d: d.predicted_tpot_ms)
    why = []
    calibrated = m_ttft != 1.0 or m_tpot != 1.0
    with_m = " x margin" if calibrated else ""
    if not fits(fastest_tpot.predicted_tpot_ms, plan_tpot):
        why.append(f"TPOT SLO {slo_tpot:.2f} ms < the fastest level's TPOT{with_m} "
                   f"{fastest_tpot.predicted_tpot_ms * m_tpot:.2f} ms "
                   f"(level {fastest_tpot.level}, ratio {fastest_tpot.level_ratio:.2f})")
    if not fits(fastest_ttft.predicted_ttft_ms, plan_ttft):
        why.append(f"TTFT SLO {slo_ttft:.1f} ms < the fastest option's TTFT{with_m} "
                   f"{fastest_ttft.predicted_ttft_ms * m_ttft:.1f} ms "
                   f"(level {fastest_ttft.level}, prompt ratio {fastest_ttft.prompt_ratio:g}: "
                   f"{fastest_ttft.n_prompt} tokens, scorer {fastest_ttft.predicted_scorer_ms:.1f} ms)")
    if calibrated:
        why.append(f"planning for the calibrated quantile: margins x {m_ttft:.2f} (TTFT), x {m_tpot:.2f} (TPOT)")
    if len(why) == int(calibrated):
        why.insert(0, "no single level meets both the TTFT and the TPOT SLO "
                   f"(TTFT {slo_ttft:.1f} ms, TPOT {slo_tpot:.2f} ms)")
    if not can_compress and n_compressible == 0:
        why.append("nothing in the prompt is compressible (pass context=)")
    elif not can_compress:
        why.append("no prompt scorer to compress with")
    msg = f"{slo} cannot be met for a {n_full}-token prompt: " + "; ".join(why)
    best.reason = "infeasible, best effort (smallest SLO overshoot): " + "; ".join(why)
    if best_effort:
        return best
    raise SLOInfeasible(msg, best)


__all__ = ["Decision", "SLOInfeasible", "decide", "ratio_grid", "DEFAULT_MIN_PROMPT_RATIO", "DEFAULT_RATIO_STEP",
           "SLOError"]
