"""The TLM's decision head (ELMS §3.3-3.4): (model level, prompt ratio) classes from the SLO and the pooled prompt,
with the latency profile's feasibility guard overriding any choice that would miss the SLO.

**Features** of a request (standardised with the training mean / std stored with the head)::

    [ SLO_ttft / dense TTFT(n_full),  SLO_tpot / dense TPOT,      (both capped at 2: "unconstrained")
      log(1 + n_fixed),  log(1 + n_compressible),
      pooled TLM hidden state of the compressible context (n_embd values, the mean over its tokens) ]

The SLO enters as fractions of the dense model's latency on this device, so a head trained on one machine's profile
transfers to another's; the pooled prompt is what ELMS's decision head reads (the [CLS]-side of the TLM).

**Classes**: level ratios (the elastic model's levels when trained; 1.0 = dense) and prompt ratios (fractions of
the compressible tokens kept). At run time the predicted level ratio maps to the nearest level the model has.

**Labels** (:func:`label`), self-induced as the issue and the paper prescribe: every training question is run at
every (level, prompt ratio) class pair (:func:`collect`), giving ``correct[l, r]``; then for each SLO of a grid the
label is ELMS's rule over the pairs the profile predicts feasible: the largest feasible level that answers
correctly at some feasible ratio, then the smallest feasible ratio still correct there. When no feasible pair is
correct the label is the profile rule's own choice (largest feasible level, then largest ratio: nothing better is
known); SLOs with no feasible pair at all are not labelled. Training questions come from apps the SLO benchmark
does not use (commonsense_qa, social_i_qa, arc_challenge).

**Guard** (:func:`guarded_decision`): the head's (level, ratio) is kept when the profile predicts it meets the
SLO; otherwise, at the head's level, the largest ratio that fits; otherwise the profile rule
(:func:`elms_gguf.orchestrate.decide`) decides. ``Decision.reason`` says which.

Stored in the TLM GGUF as ``elms.tlm.decision.*`` keys (llama.cpp ignores them; :func:`write_head`):

=========================================  ============  ================================================
key                                        type          meaning
=========================================  ============  ================================================
``elms.tlm.decision.version``              uint32        1
``elms.tlm.decision.level_ratios``         float32[L]    level classes (ratios; 1.0 = dense)
``elms.tlm.decision.prompt_ratios``        float32[R]    prompt-ratio classes
``elms.tlm.decision.feature_mean/std``     float32[F]    standardisation
``elms.tlm.decision.level.weight/bias``    float32[F*L]  softmax regression, row-major [F, L] / [L]
``elms.tlm.decision.ratio.weight/bias``    float32[F*R]  softmax regression, row-major [F, R] / [R]
``elms.tlm.decision.target_model_id``      string        the elastic model the labels came from
``elms.tlm.decision.report``               string        JSON: training figures (samples, accuracies)
=========================================  ============  ================================================
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import orchestrate as O
from .profile import SLO, LatencyProfile

log = logging.getLogger(__name__)

HEAD_VERSION = 1
PREFIX = "elms.tlm.decision."
KEY_VERSION = PREFIX + "version"
KEY_LEVELS = PREFIX + "level_ratios"
KEY_RATIOS = PREFIX + "prompt_ratios"
KEY_MEAN = PREFIX + "feature_mean"
KEY_STD = PREFIX + "feature_std"
KEY_LEVEL_W = PREFIX + "level.weight"
KEY_LEVEL_B = PREFIX + "level.bias"
KEY_RATIO_W = PREFIX + "ratio.weight"
KEY_RATIO_B = PREFIX + "ratio.bias"
KEY_TARGET_ID = PREFIX + "target_model_id"
KEY_REPORT = PREFIX + "report"

SLO_CAP = 2.0  # SLO fractions above this (or unconstrained) are all "no constraint"
DEFAULT_PROMPT_RATIOS = (1.0, 0.7, 0.4)
DEFAULT_TTFT_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_TPOT_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TRAIN_APPS = ("commonsense_qa", "social_i_qa", "arc_challenge")


class DecisionHeadError(ValueError):
    """A malformed decision head, or one for another model."""


# --------------------------------------------------------------------------------------------------
# features and the head


def slo_fractions(profile: LatencyProfile, slo: SLO | object, n_full: int) -> tuple[float, float]:
    """The SLO as fractions of the dense model's TTFT at ``n_full`` tokens and of its TPOT (capped at SLO_CAP)."""
    t_ms, p_ms = SLO.coerce(slo).resolve(profile, n_full)
    dense = -1 if -1 in profile.levels else max(profile.levels, key=lambda k: profile.levels[k].ratio)
    ft = t_ms / profile.ttft_ms(dense, n_full) if math.isfinite(t_ms) else SLO_CAP
    fp = p_ms / profile.tpot_ms(dense) if math.isfinite(p_ms) else SLO_CAP
    return min(ft, SLO_CAP), min(fp, SLO_CAP)


def features(ttft_frac: float, tpot_frac: float, n_fixed: int, n_compressible: int, pooled: np.ndarray) -> np.ndarray:
    return np.concatenate([[ttft_frac, tpot_frac, math.log1p(n_fixed), math.log1p(n_compressible)],
                           np.asarray(pooled, dtype=np.float64).ravel()])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class DecisionHead:
    level_ratios: np.ndarray   # [L]
    prompt_ratios: np.ndarray  # [R]
    mean: np.ndarray           # [F]
    std: np.ndarray            # [F]
    w_level: np.ndarray        # [F, L]
    b_level: np.ndarray        # [L]
    w_ratio: np.ndarray        # [F, R]
    b_ratio: np.ndarray        # [R]
    target_model_id: str = ""
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.mean.size)

    def probabilities(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (level, prompt ratio) for feature rows ``x`` ([F] or [N, F])."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.n_features:
            raise DecisionHeadError(f"decision head expects {self.n_features} features, got {x.shape[-1]} "
                                    "(a TLM of another width?)")
        z = (x - self.mean) / self.std
        return _softmax(z @ self.w_level + self.b_level), _softmax(z @ self.w_ratio + self.b_ratio)

    def predict(self, x: np.ndarray) -> tuple[float, float]:
        """(level ratio, prompt ratio) of one request's features."""
        pl, pr = self.probabilities(x)
        return float(self.level_ratios[int(np.argmax(pl))]), float(self.prompt_ratios[int(np.argmax(pr))])

    # -- GGUF keys --------------------------------------------------------------------------------------

    def kv(self) -> dict[str, tuple[object, str]]:
        """key -> (value, kind) with kind 'u32', 'f32[]' or 'str'."""
        f32 = lambda a: [float(v) for v in np.asarray(a, dtype=np.float32).ravel()]  # noqa: E731
        return {KEY_VERSION: (HEAD_VERSION, "u32"), KEY_LEVELS: (f32(self.level_ratios), "f32[]"),
                KEY_RATIOS: (f32(self.prompt_ratios), "f32[]"), KEY_MEAN: (f32(self.mean), "f32[]"),
                KEY_STD: (f32(self.std), "f32[]"), KEY_LEVEL_W: (f32(self.w_level), "f32[]"),
                KEY_LEVEL_B: (f32(self.b_level), "f32[]"), KEY_RATIO_W: (f32(self.w_ratio), "f32[]"),
                KEY_RATIO_B: (f32(self.b_ratio), "f32[]"), KEY_TARGET_ID: (self.target_model_id, "str"),
                KEY_REPORT: (json.dumps(self.report, sort_keys=True), "str")}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, source: str = "TLM") -> "DecisionHead | None":
        """The head stored in a GGUF's fields (None when it has none); shapes are checked."""
        if KEY_VERSION not in fields:
            return None
        if int(fields[KEY_VERSION]) != HEAD_VERSION:
            raise DecisionHeadError(f"{source}: {KEY_VERSION} = {fields[KEY_VERSION]}, this elms-gguf reads {HEAD_VERSION}")
        try:
            arr = {k: np.asarray(fields[k], dtype=np.float64) for k in (
                KEY_LEVELS, KEY_RATIOS, KEY_MEAN, KEY_STD, KEY_LEVEL_W, KEY_LEVEL_B, KEY_RATIO_W, KEY_RATIO_B)}
        except KeyError as e:
            raise DecisionHeadError(f"{source}: decision head key {e.args[0]} is missing") from None
        L, R, F = arr[KEY_LEVELS].size, arr[KEY_RATIOS].size, arr[KEY_MEAN].size
        for key, n in ((KEY_STD, F), (KEY_LEVEL_W, F * L), (KEY_LEVEL_B, L), (KEY_RATIO_W, F * R), (KEY_RATIO_B, R)):
            if arr[key].size != n:
                raise DecisionHeadError(f"{source}: {key} has {arr[key].size} values, expected {n}")
        if L == 0 or R == 0 or np.any(arr[KEY_STD] <= 0):
            raise DecisionHeadError(f"{source}: empty classes or non-positive feature std in the decision head")
        report = fields.get(KEY_REPORT)
        # class values were float32: back to the decimals they were (0.7, not 0.699999988)
        return cls(level_ratios=np.round(arr[KEY_LEVELS], 6), prompt_ratios=np.round(arr[KEY_RATIOS], 6), mean=arr[KEY_MEAN], std=arr[KEY_STD],
                   w_level=arr[KEY_LEVEL_W].reshape(F, L), b_level=arr[KEY_LEVEL_B],
                   w_ratio=arr[KEY_RATIO_W].reshape(F, R), b_ratio=arr[KEY_RATIO_B],
                   target_model_id=str(fields.get(KEY_TARGET_ID, "")),
                   report=json.loads(str(report)) if report else {})


def read_head(path: str | os.PathLike[str]) -> DecisionHead | None:
    """The decision head of a TLM GGUF, or None if it has none."""
    import gguf

    path = os.fspath(path)
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if k.startswith(PREFIX)}
    return DecisionHead.from_fields(fields, source=path)


def write_head(src: str | os.PathLike[str], dst: str | os.PathLike[str], head: DecisionHead) -> None:
    """Copy the TLM GGUF ``src`` to ``dst`` (atomically; ``dst`` may be ``src``) with ``head``'s keys replacing any
    previous decision head. Every other key and tensor is copied unchanged."""
    import gguf

    from .model import atomic_output
    from .tlm import copy_with_keys

    VT = gguf.GGUFValueType
    src, dst = os.fspath(src), os.fspath(dst)
    if "elms.tlm.score_head.weight" not in gguf.GGUFReader(src).fields:
        raise DecisionHeadError(f"{src}: not an elms TLM (no elms.tlm.score_head.weight)")
    types = {"u32": (VT.UINT32, None), "str": (VT.STRING, None), "f32[]": (VT.ARRAY, VT.FLOAT32)}
    extra = [(key, value, *types[kind]) for key, (value, kind) in head.kv().items()]
    with atomic_output(dst) as tmp:
        copy_with_keys(src, tmp, extra, drop_prefix=PREFIX)


# --------------------------------------------------------------------------------------------------
# labels and training


@dataclass
class Outcome:
    """One training question run at every (level, prompt ratio) class pair."""

    n_fixed: int
    n_compressible: int
    pooled: np.ndarray         # [n_embd]
    correct: np.ndarray        # bool [L, R]
    app: str = ""


def feasible_mask(profile: LatencyProfile, levels: Sequence[int], prompt_ratios: Sequence[float], *, n_fixed: int,
                  n_compressible: int, slo: SLO, scorer_ms: Callable[[int], float] | None = None) -> np.ndarray:
    """bool [L, R]: which (level, prompt ratio) pairs the profile predicts meet ``slo``."""
    n_full = n_fixed + n_compressible
    t_ms, p_ms = slo.resolve(profile, n_full)
    out = np.zeros((len(levels), len(prompt_ratios)), dtype=bool)
    for i, lv in enumerate(levels):
        if profile.tpot_ms(lv) > p_ms * (1 + 1e-9):
            continue
        for j, rho in enumerate(prompt_ratios):
            n = n_fixed + (n_compressible if rho >= 1.0 else int(round(rho * n_compressible)))
            ttft = profile.ttft_ms(lv, n) + (scorer_ms(n_compressible) if (rho < 1.0 and scorer_ms) else 0.0)
            out[i, j] = ttft <= t_ms * (1 + 1e-9)
    return out


def label(correct: np.ndarray, feasible: np.ndarray, level_ratios: Sequence[float],
          prompt_ratios: Sequence[float]) -> tuple[int, int] | None:
    """(level class, ratio class) by ELMS's rule (module docstring), or None when nothing is feasible."""
    if not feasible.any():
        return None
    lv_order = sorted(range(len(level_ratios)), key=lambda i: level_ratios[i], reverse=True)
    r_small = sorted(range(len(prompt_ratios)), key=lambda j: prompt_ratios[j])
    for i in lv_order:
        ok = [j for j in r_small if feasible[i, j] and correct[i, j]]
        if ok:
            return i, ok[0]
    for i in lv_order:  # none correct: the profile rule (largest level, then largest ratio)
        ok = [j for j in reversed(r_small) if feasible[i, j]]
        if ok:
            return i, ok[0]
    return None  # pragma: no cover - feasible.any() guarantees a return above


def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2, iters: int = 400,
                lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised ``x`` [N, F] (full-batch gradient descent + L2)."""
    n, f = x.shape
    w, b = np.zeros((f, n_classes)), np.zeros(n_classes)
    onehot = np.eye(n_classes)[y]
    for _ in range(iters):
        p = _softmax(x @ w + b)
        g = (p - onehot) / n
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return w, b


def samples(outcomes: Sequence[Outcome], profile: LatencyProfile, levels: Sequence[int],
            prompt_ratios: Sequence[float], *, ttft_grid: Sequence[float] = DEFAULT_TTFT_GRID,
            tpot_grid: Sequence[float] = DEFAULT_TPOT_GRID, scorer_ms: Callable[[int], float] | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, SLO]]]:
    """Feature rows, level labels, ratio labels and (outcome index, SLO) of every labelled (question, SLO)."""
    level_ratios = [profile.levels[lv].ratio for lv in levels]
    xs, yl, yr, where = [], [], [], []
    for k, o in enumerate(outcomes):
        n_full = o.n_fixed + o.n_compressible
        for ft in ttft_grid:
            for fp in tpot_grid:
                slo = SLO.relative(ft, fp)
                feas = feasible_mask(profile, levels, prompt_ratios, n_fixed=o.n_fixed,
                                     n_compressible=o.n_compressible, slo=slo, scorer_ms=scorer_ms)
                lab = label(o.correct, feas, level_ratios, prompt_ratios)
                if lab is None:
                    continue
                xs.append(features(*slo_fractions(profile, slo, n_full), o.n_fixed, o.n_compressible, o.pooled))
                yl.append(lab[0])
                yr.append(lab[1])
                where.append((k, slo))
    return np.asarray(xs), np.asarray(yl, dtype=np.int64), np.asarray(yr, dtype=np.int64), where


def train(outcomes: Sequence[Outcome], profile: LatencyProfile, levels: Sequence[int],
          prompt_ratios: Sequence[float] = DEFAULT_PROMPT_RATIOS, *, heldout: Sequence[Outcome] = (),
          l2: float = 1e-2, target_model_id: str = "", scorer_ms: Callable[[int], float] | None = None,
          **grid: Any) -> DecisionHead:
    """Fit the head on ``outcomes``; the report compares it with the profile rule on ``heldout`` questions."""
    x, yl, yr, _ = samples(outcomes, profile, levels, prompt_ratios, scorer_ms=scorer_ms, **grid)
    if len(x) == 0:
        raise DecisionHeadError("no labelled (question, SLO) pair: the SLO grid is infeasible for every question")
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0
    z = (x - mean) / std
    wl, bl = fit_softmax(z, yl, len(levels), l2=l2)
    wr, br = fit_softmax(z, yr, len(prompt_ratios), l2=l2)
    head = DecisionHead(level_ratios=np.array([profile.levels[lv].ratio for lv in levels]),
                        prompt_ratios=np.asarray(prompt_ratios, dtype=np.float64), mean=mean, std=std, w_level=wl,
                        b_level=bl, w_ratio=wr, b_ratio=br, target_model_id=target_model_id)
    pl, pr = head.probabilities(x)
    head.report = {"train_questions": len(outcomes), "train_samples": int(len(x)),
                   "train_level_acc": float((pl.argmax(1) == yl).mean()),
                   "train_ratio_acc": float((pr.argmax(1) == yr).mean()), "l2": l2}
    if heldout:
        head.report["heldout"] = compare_with_rule(head, heldout, profile, levels, prompt_ratios,
                                                   scorer_ms=scorer_ms, **grid)
    return head


def compare_with_rule(head: DecisionHead, outcomes: Sequence[Outcome], profile: LatencyProfile,
                      levels: Sequence[int], prompt_ratios: Sequence[float], *,
                      scorer_ms: Callable[[int], float] | None = None, **grid: Any) -> dict[str, float]:
    """On questions whose every outcome is known: accuracy of the guarded head's pick vs the profile rule's pick
    (restricted to the same class grid) and the oracle's, over the labelled (question, SLO) pairs."""
    level_ratios = [profile.levels[lv].ratio for lv in levels]
    x, yl, yr, where = samples(outcomes, profile, levels, prompt_ratios, scorer_ms=scorer_ms, **grid)
    acc_head, acc_rule, acc_oracle, overridden = [], [], [], 0
    for row, (k, slo) in zip(x, where):
        o = outcomes[k]
        feas = feasible_mask(profile, levels, prompt_ratios, n_fixed=o.n_fixed, n_compressible=o.n_compressible,
                             slo=slo, scorer_ms=scorer_ms)
        li, ri = _head_pick(head, row, level_ratios, prompt_ratios)
        if not feas[li, ri]:
            overridden += 1
            ok = [j for j in range(len(prompt_ratios)) if feas[li, j]]
            if ok:
                ri = max(ok, key=lambda j: prompt_ratios[j])
            else:
                li, ri = _rule_pick(feas, level_ratios, prompt_ratios)
        acc_head.append(o.correct[li, ri])
        acc_rule.append(o.correct[_rule_pick(feas, level_ratios, prompt_ratios)])
        acc_oracle.append(bool((o.correct & feas).any()))
    n = max(1, len(where))
    return {"questions": len(outcomes), "samples": len(where), "acc_head": float(np.mean(acc_head)) if where else 0.0,
            "acc_rule": float(np.mean(acc_rule)) if where else 0.0,
            "acc_oracle": float(np.mean(acc_oracle)) if where else 0.0,
            "level_acc": float((head.probabilities(x)[0].argmax(1) == yl).mean()) if where else 0.0,
            "ratio_acc": float((head.probabilities(x)[1].argmax(1) == yr).mean()) if where else 0.0,
            "guard_overrides": overridden / n}


def _head_pick(head: DecisionHead, row: np.ndarray, level_ratios: Sequence[float],
               prompt_ratios: Sequence[float]) -> tuple[int, int]:
    lr, rr = head.predict(row)
    li = int(np.argmin([abs(r - lr) for r in level_ratios]))
    ri = int(np.argmin([abs(r - rr) for r in prompt_ratios]))
    return li, ri


def _rule_pick(feas: np.ndarray, level_ratios: Sequence[float], prompt_ratios: Sequence[float]) -> tuple[int, int]:
    for i in sorted(range(len(level_ratios)), key=lambda i: level_ratios[i], reverse=True):
        ok = [j for j in range(len(prompt_ratios)) if feas[i, j]]
        if ok:
            return i, max(ok, key=lambda j: prompt_ratios[j])
    raise DecisionHeadError("no feasible pair")  # pragma: no cover - callers only pass labelled SLOs


# --------------------------------------------------------------------------------------------------
# serving: the guarded decision


def guarded_decision(head: DecisionHead, profile: LatencyProfile, slo: SLO | object, *, n_fixed: int,
                     n_compressible: int, pooled: np.ndarray, levels: Sequence[int],
                     scorer_ms: Callable[[int], float] | None, min_prompt_ratio: float = O.DEFAULT_MIN_PROMPT_RATIO,
                     best_effort: bool = False, headroom: float = 0.0, overhead_ms: float = 0.0,
                     n_decode: int | None = None, margin: tuple[float, float] = (1.0, 1.0)) -> O.Decision:
    """The head's (level, prompt ratio) for this request when the profile predicts it meets the SLO (with the
    calibration ``margin``); else the largest ratio that fits at the head's level; else :func:`orchestrate.decide`
    (the guard)."""
    slo = SLO.coerce(slo)
    n_full = n_fixed + n_compressible
    x = features(*slo_fractions(profile, slo, n_full), n_fixed, n_compressible, pooled)
    want_level, want_ratio = head.predict(x)
    lv = min(levels, key=lambda k: (abs(profile.levels[k].ratio - want_level), -profile.levels[k].ratio))
    rho = max(want_ratio, min_prompt_ratio) if (n_compressible and scorer_ms is not None) else 1.0
    common = dict(n_fixed=n_fixed, n_compressible=n_compressible, scorer_ms=scorer_ms,
                  min_prompt_ratio=min_prompt_ratio, headroom=headroom, overhead_ms=overhead_ms, n_decode=n_decode,
                  margin=margin)
    d = O.decide(profile, slo, levels=[lv], prompt_ratios=[rho], best_effort=True, **common)
    if d.feasible:
        d.reason = f"decision head: level ratio {want_level:.2f}, prompt ratio {want_ratio:g} (feasible)"
        return d
    d = O.decide(profile, slo, levels=[lv], best_effort=True, **common)  # the head's level, largest ratio that fits
    if d.feasible:
        d.reason = (f"decision head: level ratio {want_level:.2f} kept, prompt ratio {want_ratio:g} did not fit; "
                    f"guard: largest ratio that fits ({d.prompt_ratio:g})")
        return d
    d = O.decide(profile, slo, levels=levels, best_effort=best_effort, **common)
    d.reason = f"guard overrode the decision head (level ratio {want_level:.2f} infeasible): {d.reason}"
    return d


# --------------------------------------------------------------------------------------------------
# collecting outcomes with the real model, and the CLI


def mc_correct(llm: Any, prompt: str, choices: Sequence[str], answer: int) -> bool:
    """Whether the choice with the highest mean token log-probability after ``prompt`` is ``answer`` (cloze, as the
    SLO benchmark scores); ``llm`` needs ``logits_all=True`` (the KV cache is reused across the choices)."""
    from .evaluate import Scorer

    scorer = Scorer(llm)
    ctx = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    lps = [float(scorer.token_logprobs(ctx, llm.tokenize((" " + c).encode("utf-8"), add_bos=False,
                                                        special=False)).mean()) for c in choices]
    return int(np.argmax(lps)) == int(answer)


def collect(llm: Any, *, apps: Sequence[str] = TRAIN_APPS, n_items: int = 16, seed: int = 7,
            prompt_ratios: Sequence[float] = DEFAULT_PROMPT_RATIOS, levels: Sequence[int] | None = None,
            progress: bool = True) -> tuple[list[Outcome], list[int]]:
    """Run ``n_items`` questions of every training app at every (level, prompt ratio): the outcomes and the level
    indices (largest first). ``llm``: :class:`elms_gguf.serve.ElasticLlama` with a TLM and ``logits_all=True``."""
    from tqdm import tqdm

    from . import compress as C
    from .tasks import app_prompts

    if llm.compressor is None or llm.tlm is None:
        raise DecisionHeadError("collecting decision labels needs an ElasticLlama with tlm=")
    if levels is None:  # every level once: the full-width level runs the same model as dense (-1), keep -1
        by_ratio: dict[float, int] = {}
        for li in sorted(llm.levels, key=lambda li: li.index != -1):
            by_ratio.setdefault(round(float(li.ratio), 6), li.index)
        levels = list(by_ratio.values())
    lv = sorted(levels, key=lambda k: llm.profile.levels[k].ratio if llm.profile else k, reverse=True)
    jobs = [(a, it) for a in apps for it in app_prompts(a, n_items=n_items, seed=seed).items]
    contexts = {a: app_prompts(a, n_items=0).context for a in apps}
    out: list[Outcome] = []
    for app, item in tqdm(jobs, desc="decision labels", unit="q", disable=not progress):
        ctx = contexts[app]
        q = f"Question: {item.question}\nAnswer:"
        n_full = llm.count_tokens(ctx + "\n\n" + q, add_bos=True)
        n_c = llm.count_tokens(ctx)
        pooled = llm.compressor.pooled(C.split_words(ctx))
        correct = np.zeros((len(lv), len(prompt_ratios)), dtype=bool)
        for j, rho in enumerate(prompt_ratios):
            ctx_r = llm._compress(ctx, rho)[0]
            for i, level in enumerate(lv):
                llm.set_level(level)
                correct[i, j] = mc_correct(llm, ctx_r + "\n\n" + q, item.choices, item.answer)
        out.append(Outcome(n_fixed=n_full - n_c, n_compressible=n_c, pooled=pooled, correct=correct, app=app))
    return out, lv


def save_outcomes(path: str, outcomes: Sequence[Outcome], levels: Sequence[int],
                  prompt_ratios: Sequence[float]) -> None:
    np.savez(path, n_fixed=[o.n_fixed for o in outcomes], n_compressible=[o.n_compressible for o in outcomes],
             pooled=np.stack([o.pooled for o in outcomes]), correct=np.stack([o.correct for o in outcomes]),
             app=np.array([o.app for o in outcomes]), levels=np.asarray(levels),
             prompt_ratios=np.asarray(prompt_ratios))


def load_outcomes(path: str) -> tuple[list[Outcome], list[int], list[float]]:
    z = np.load(path)
    outs = [Outcome(int(a), int(b), p, c, str(app)) for a, b, p, c, app in
            zip(z["n_fixed"], z["n_compressible"], z["pooled"], z["correct"], z["app"])]
    return outs, [int(x) for x in z["levels"]], [float(x) for x in z["prompt_ratios"]]


EPILOG = """
example (SmolLM2 elastic + the 1-layer TLM, the profile saved by elms-profile for 2 threads):
  elms-train-decision models/tlm-minilm-l1.gguf --model models/smollm2-135m-elastic-q4_0.gguf -t 2 -n 16

Runs every training question (commonsense_qa, social_i_qa, arc_challenge apps; the SLO benchmark uses other
tasks) at every level x prompt ratio (-n 16: 48 questions x 9 levels x 3 ratios, ~10 min on 2 cores), labels an
SLO grid with ELMS's rule, fits the two softmax heads on 3/4 of the questions and reports, on the held-out
quarter, the accuracy of the guarded head's choices vs the profile rule's and the oracle's. The head is then
refitted on every question and written into the TLM GGUF (in place, atomically, unless -o) -- only if it did at
least as well as the rule on the held-out questions (exit status 3 otherwise; --force overrides).
"""


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="elms-train-decision", description="Train the TLM's decision head (level and "
                                 "prompt-ratio classes from the SLO and the pooled prompt) on self-induced labels.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tlm", help="TLM GGUF (elms-train-tlm); the head is added to it")
    ap.add_argument("--model", required=True, help="the elastic GGUF the TLM serves")
    ap.add_argument("-o", "--output", help="write the TLM with its head here (default: rewrite TLM in place)")
    ap.add_argument("-n", type=int, default=16, help="questions per training app (default %(default)s)")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_PROMPT_RATIOS),
                    help="prompt-ratio classes (default %(default)s)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="llama.cpp threads; the saved profile of this "
                    "thread count is used (default %(default)s)")
    ap.add_argument("--profile", default="auto", help="latency profile JSON (default: the saved one)")
    ap.add_argument("--heldout", type=float, default=0.25, help="fraction of questions held out (default %(default)s)")
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--outcomes", help=".npz cache of the collected outcomes (read if present, else written)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--force", action="store_true", help="write the head even if it does worse than the profile rule "
                    "on the held-out questions")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ratios = [float(x) for x in args.ratios.split(",") if x]
        if not ratios or any(not 0 < r <= 1 for r in ratios) or 1.0 not in ratios:
            raise DecisionHeadError(f"--ratios must be in (0, 1] and include 1: {args.ratios}")
        from .serve import ElasticLlama

        llm = ElasticLlama(args.model, tlm=args.tlm, profile=args.profile, n_threads=args.threads, n_ctx=2048,
                           logits_all=True, verbose=False, decision_head="rule")
        if llm.profile is None:
            raise DecisionHeadError(f"no latency profile for {args.model} at {args.threads} threads: run "
                                    f"elms-profile {args.model} -t {args.threads} --tlm {args.tlm}")
        if args.outcomes and os.path.exists(args.outcomes):
            outcomes, levels, ratios = load_outcomes(args.outcomes)
            log.info("%d outcomes from %s", len(outcomes), args.outcomes)
            # one class per level ratio (the full-width level and dense -1 are the same model: keep -1)
            keep, seen = [], set()
            for i in sorted(range(len(levels)), key=lambda i: levels[i] != -1):
                r = round(llm.profile.levels[levels[i]].ratio, 6)
                if r not in seen:
                    seen.add(r)
                    keep.append(i)
            keep.sort()
            levels = [levels[i] for i in keep]
            for o in outcomes:
                o.correct = o.correct[keep]
        else:
            outcomes, levels = collect(llm, n_items=args.n, seed=args.seed, prompt_ratios=ratios,
                                       progress=sys.stderr.isatty())
            if args.outcomes:
                save_outcomes(args.outcomes, outcomes, levels, ratios)
        scorer_ms = (lambda n: llm.profile.scorer_ms(llm.scorer.name, n))  # noqa: E731 (cold TLM cost)
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(outcomes))
        n_held = int(round(args.heldout * len(outcomes)))
        held, train_set = [outcomes[i] for i in order[:n_held]], [outcomes[i] for i in order[n_held:]]
        model_id = str(llm._fingerprint.get("model_id") or "")
        probe = train(train_set, llm.profile, levels, ratios, heldout=held, l2=args.l2, scorer_ms=scorer_ms,
                      target_model_id=model_id)
        head = train(outcomes, llm.profile, levels, ratios, l2=args.l2, scorer_ms=scorer_ms, target_model_id=model_id)
        head.report["heldout_probe"] = probe.report.get("heldout", {})
        head.report["heldout_probe"]["train_questions"] = len(train_set)
        llm.close()
    except (DecisionHeadError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    h = head.report["heldout_probe"]
    worse = h.get("acc_head", 0.0) < h.get("acc_rule", 0.0)
    if not worse or args.force:
        write_head(args.tlm, args.output or args.tlm, head)
    print(f"outcomes: {len(outcomes)} questions x {len(levels)} levels x {len(ratios)} prompt ratios; "
          f"accuracy of every pair: " + ", ".join(f"{np.mean([o.correct[i].mean() for o in outcomes]):.2f}"
                                                   for i in range(len(levels))) + " (levels, largest first)")
    print(f"held-out ({h.get('questions')} questions, {h.get('samples')} question x SLO pairs): accuracy of the "
          f"guarded head {h.get('acc_head', 0):.3f}, profile rule {h.get('acc_rule', 0):.3f}, oracle "
          f"{h.get('acc_oracle', 0):.3f}; class accuracy level {h.get('level_acc', 0):.2f} / ratio "
          f"{h.get('ratio_acc', 0):.2f}; guard overrides {h.get('guard_overrides', 0):.2f}")
    if worse and not args.force:
        log.error("the decision head answers fewer held-out questions correctly (%.3f) than the profile rule (%.3f): "
                  "not written, serving keeps the rule (--force writes it anyway; more questions, or a target model "
                  "well above chance on the training apps, give the head something to learn)",
                  h.get("acc_head", 0.0), h.get("acc_rule", 0.0))
        return 3
    print(f"wrote the decision head ({head.report['train_samples']} samples) into {args.output or args.tlm}")
    return 0


__all__ = ["DecisionHead", "DecisionHeadError", "Outcome", "features", "slo_fractions", "feasible_mask", "label",
           "fit_softmax", "samples", "train", "compare_with_rule", "guarded_decision", "read_head", "write_head",
           "HEAD_VERSION", "TRAIN_APPS", "DEFAULT_PROMPT_RATIOS", "collect", "mc_correct", "save_outcomes",
           "load_outcomes", "main"]
