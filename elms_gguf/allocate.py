"""Per-level, per-layer width allocation (which KV groups / FFN widths each level keeps).

Three allocators, all producing nested levels that obey the contract's width rules:

* :func:`searched` (default): level by level from the full model down. Each non-anchor layer has a cost curve for
  its attention block (by kept KV groups) and its FFN block (by kept width), plus an interaction term for skipping
  the whole layer. A greedy segment repeatedly takes the move with the least estimated loss increase per decoder
  parameter saved: drop the next KV group, the next FFN chunk (one quantization block of the ``ffn_down`` type), or
  a whole block / layer (width 0 = skipped: depth elasticity through the same mechanism), until the level's budget
  is met. Several move policies (attention cost multipliers, no skips, whole layers only) are run from the previous
  level's widths and the candidate with the lowest *measured* loss is kept, so levels are nested by construction
  and the estimate's blind spot (how removals compound across layers) is settled by measurement. The measured
  loss is the calibration loss by default; ``elms-convert --select tasks`` measures question sets instead
  (:class:`elms_gguf.measure.TaskProbe`), since on SmolLM2-135M the calibration loss does not rank candidates the
  way multiple-choice accuracy does (docs/quality.md). With ``beam`` > 1 (``--select-beam``) whole nested chains
  of levels are searched instead of one level at a time.
* :func:`uniform`: ELMS' rule, the same kept fraction ``k = (L*r - A)/(L - A)`` in every non-anchor layer for KV
  groups and FFN, rounded as in quality-feasibility.md section 3.
* :func:`layerdrop`: whole non-anchor layers removed in order of least single-skip loss (the LayerReduction
  baseline, expressed as widths 0/0).

Widths are aligned by :class:`WidthGrid`: KV counts whose ``attn_output`` column width is a multiple of that
tensor's block size, FFN widths that are multiples of ``ffn_down``'s block size (the full width is always allowed).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from .contract import ContractError, Level, ModelDims, layer_params, level_ratio

log = logging.getLogger(__name__)

ALLOCATIONS = ("searched", "uniform", "layerdrop")
#: how the beam search ranks nested chains of levels: "sum" = the lowest summed loss over the levels; "worst" = the
#: smallest worst regret, a level's regret being its loss minus the best loss measured at that level (minimax)
CHAIN_OBJECTIVES = ("sum", "worst")


@dataclass(frozen=True)
class WidthGrid:
    """The widths a layer may take, given the block sizes of the column-sliced tensors' output types."""

    dims: ModelDims
    attn_block: int = 1  # block size of attn_output's type
    ffn_block: int = 1  # block size of ffn_down's type
    min_ffn: int = 0  # smallest non-zero FFN width (narrow ffn_down column prefixes waste cache lines at decode)

    @property
    def kv_values(self) -> list[int]:
        d = self.dims
        vals = [k for k in range(d.n_head_kv + 1) if (k * d.group * d.head_dim) % self.attn_block == 0]
        return sorted(set(vals) | {d.n_head_kv})

    @property
    def ffn_step(self) -> int:
        """FFN search granularity: the block size, but at least 32 neurons (float types would allow single ones)."""
        return self.ffn_block if self.ffn_block >= 32 or 32 % self.ffn_block else 32

    @property
    def ff_values(self) -> list[int]:
        n = self.dims.n_ff
        return sorted({v for v in range(0, n + 1, self.ffn_step) if v == 0 or v >= self.min_ffn} | {n})

    def check(self) -> None:
        d = self.dims
        if (d.n_head_kv * d.group * d.head_dim) % self.attn_block:
            raise ContractError(
                f"attn_output has {d.n_head * d.head_dim} columns, not a multiple of its block size {self.attn_block}")
        if d.n_ff % self.ffn_block:
            raise ContractError(f"ffn_down has {d.n_ff} columns, not a multiple of its block size {self.ffn_block}")


@dataclass
class LayerCost:
    """Estimated calibration-loss increase of one layer as a function of its widths (the rest dense).

    ``attn[k]`` for ``k`` kept KV groups (``attn[n_head_kv] == 0``), ``ffn[f]`` for kept FFN width ``f`` (a dict
    over the grid's FFN values), ``interaction`` is added when both blocks are 0 (whole layer skipped).
    """

    attn: dict[int, float]
    ffn: dict[int, float]
    interaction: float = 0.0

    def __call__(self, kv: int, ff: int) -> float:
        c = self.attn[kv] + self.ffn[ff]
        if kv == 0 and ff == 0:
            c += self.interaction
        return c


@dataclass(frozen=True)
class Policy:
    """How one greedy segment scores moves: attention costs x ``attn_mult`` (inf = never narrow attention),
    ``skips`` = whether a block may go to width 0, ``layers_only`` = only whole-layer removals (layer-drop)."""

    attn_mult: float = 1.0
    skips: bool = True
    layers_only: bool = False
    reference: bool = False  # not a greedy policy: the `reference` level's widths (clamped to stay nested)

    def label(self) -> str:
        if self.layers_only:
            return "layer-drop"
        if self.reference:
            return "uniform widths"
        a = "attention kept" if self.attn_mult == float("inf") else f"attention cost x{self.attn_mult:g}"
        return a + ("" if self.skips else ", no block skips")


#: the candidate policies tried for every level (each measured; the best is kept). On SmolLM2-135M every one of
#: the width policies won at least one level; "attention kept" and "x10 with skips" never did and were dropped.
DEFAULT_POLICIES = (Policy(1.0), Policy(3.0), Policy(1.0, skips=False), Policy(3.0, skips=False),
                    Policy(10.0, skips=False), Policy(layers_only=True))
#: with question sets as the criterion (elms-convert --select tasks) "attention kept" is tried again, one more
#: candidate per level (on SmolLM2-135M it was never kept there either: second best at 0.9 and 0.8)
TASK_POLICIES = DEFAULT_POLICIES + (Policy(float("inf")),)


@dataclass
class SearchTrace:
    """What the search did, for the report: per level, the loss of every candidate policy and the one kept."""

    levels: list[dict] = field(default_factory=list)


def _targets_desc(ratios: Sequence[float]) -> list[float]:
    return sorted(set(float(r) for r in ratios), reverse=True)


def _segment(
    dims: ModelDims, state: list[tuple[int, int]], target_params: float, costs: Sequence[LayerCost | None],
    grid: WidthGrid, policy: Policy, ok: Callable[[int, int, int], bool], qkv_bias: bool, slack_params: float,
) -> list[tuple[int, int]] | None:
    """Greedy removals from ``state`` until at most ``target_params`` decoder parameters remain (None: unreachable)."""
    kv_vals, ff_vals = grid.kv_values, grid.ff_values
    state = list(state)
    lp = lambda kv, ff: layer_params(dims, kv, ff, qkv_bias=qkv_bias)  # noqa: E731
    kept = float(sum(lp(kv, ff) for kv, ff in state))
    inf = float("inf")

    def cost(c: LayerCost, kv: int, ff: int) -> float:
        a = c.attn[kv]
        if policy.attn_mult != 1.0:
            a = 0.0 if a == 0.0 else a * policy.attn_mult
        v = a + c.ffn[ff]
        if kv == 0 and ff == 0:
            v += c.interaction
        return v

    while kept > target_params + 1e-6:
        need = kept - target_params
        moves = []  # (efficiency, dparams, layer, new_kv, new_ff)
        for il, c in enumerate(costs):
            if c is None:
                continue
            kv, ff = state[il]
            if kv == 0 and ff == 0:
                continue
            cand = {(0, 0)}
            if not policy.layers_only:
                lower_kv = [k for k in kv_vals if k < kv]
                lower_ff = [f for f in ff_vals if f < ff]
                if lower_kv and policy.attn_mult != inf:
                    cand.add((lower_kv[-1], ff))
                    cand.add((0, ff))
                if lower_ff:
                    cand.add((kv, lower_ff[-1]))
                    cand.add((kv, 0))
            p0, c0 = lp(kv, ff), cost(c, kv, ff)
            for nkv, nff in cand:
                if not ok(il, nkv, nff):
                    continue
                if not policy.skips and not policy.layers_only and (nkv == 0 or nff == 0):
                    continue
                if policy.attn_mult == inf and nkv != kv and not policy.layers_only:
                    continue
                dp = p0 - lp(nkv, nff)
                if dp <= 0:
                    continue
                moves.append(((cost(c, nkv, nff) - c0) / dp, dp, il, nkv, nff))
        if not moves:
            return None
        fitting = [m for m in moves if m[1] <= need + slack_params]
        pool = fitting or [min(moves, key=lambda m: m[1])]
        _, dp, il, nkv, nff = min(pool, key=lambda m: (m[0], m[1], m[2]))
        state[il] = (nkv, nff)
        kept -= dp
    return state


def searched(
    dims: ModelDims,
    ratios: Sequence[float],
    costs: Sequence[LayerCost | None],
    grid: WidthGrid,
    *,
    qkv_bias: bool = False,
    allowed: Callable[[int, int, int], bool] | None = None,
    evaluate: Callable[[list[tuple[int, int]]], float] | None = None,
    policies: Sequence[Policy] = DEFAULT_POLICIES,
    reference: Mapping[float, Level] | None = None,
    beam: int = 1,
    chain: str = "sum",
    slack: float = 0.004,
    tolerance: float = 0.01,
    trace: SearchTrace | None = None,
) -> list[Level]:
    """Nested allocation, level by level from the largest down. ``costs[il] is None`` marks an anchor.

    For each level, starting from the previous (larger) level's widths, every candidate ``policy`` runs a greedy
    segment: repeatedly take the move (next KV group, next FFN chunk, a whole block or the whole layer) with the least
    estimated loss increase per parameter saved until the level's budget is met. ``evaluate(widths)`` measures the
    real loss of each candidate (calibration loss, or a question-set loss) and the best is kept (without
    ``evaluate`` only the first policy runs).
    ``reference`` levels (by ratio; e.g. the uniform allocation) are one more candidate wherever they are still
    nested under the current widths, so the search never measures worse than them on its own criterion.
    Measuring whole candidates matters: single-layer cost estimates ignore how removals compound across layers
    (narrowing attention in many layers hurts far more than the sum of its single-layer costs).

    ``beam`` > 1 searches nested *chains* instead of one level at a time: the ``beam`` chains with the lowest summed
    loss over the levels so far are each extended, and the chain with the lowest sum over all levels wins. A level
    that is best on its own can close doors below it (uniform widths at 0.9 leave no full-width FFN for 0.8 to
    keep); a beam lets, e.g., a layer-drop 0.9 that is slightly worse survive if its descendants are better.
    ``beam`` = 1 is the greedy level-by-level search. Cost: up to ``beam`` x the candidates measured.
    ``chain`` ranks the chains: ``"sum"`` by summed loss, which lets a small level's large losses outvote a large
    level's small ones (a chain can keep a worse 0.9 than the best one because its lower levels sum less);
    ``"worst"`` by the chain's worst *regret* (a level's loss minus the lowest loss measured at that level among
    the chains in the beam), then by summed loss: every level as close as the nesting allows to the best level
    that could be written alone. With ``beam`` = 1 both are the greedy search.

    ``allowed(il, kv, ff)`` vetoes width pairs (e.g. the static-export rules); ``slack`` (fraction of decoder
    parameters) bounds how far a greedy move may undershoot the target, ``tolerance`` how far a candidate may.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if chain not in CHAIN_OBJECTIVES:
        raise ValueError(f"chain objective must be one of {', '.join(CHAIN_OBJECTIVES)}, got {chain!r}")
    ok = allowed or (lambda il, kv, ff: True)
    total = dims.n_layer * layer_params(dims, dims.n_head_kv, dims.n_ff, qkv_bias=qkv_bias)
    pols = list(policies) if evaluate is not None else list(policies)[:1]

    def achieved(widths: tuple) -> float:
        return sum(layer_params(dims, kv, ff, qkv_bias=qkv_bias) for kv, ff in widths) / total

    def candidates(state: tuple, r: float) -> dict[tuple, list[Policy]]:
        cands: dict[tuple, list[Policy]] = {}
        for pol in pols:
            nxt = _segment(dims, list(state), r * total, costs, grid, pol, ok, qkv_bias, slack * total)
            if nxt is not None:
                cands.setdefault(tuple(nxt), []).append(pol)
        ref = (reference or {}).get(r)
        if ref is not None and evaluate is not None:  # e.g. ELMS' uniform widths, where still nested under `state`
            w = tuple((min(kv, s[0]), min(ff, s[1])) for kv, ff, s in zip(ref.head_count_kv, ref.feed_forward_length, state))
            if all(ok(il, kv, ff) for il, (kv, ff) in enumerate(w)) and achieved(w) <= r + slack + 1e-3:
                cands.setdefault(w, []).append(Policy(reference=True))
        if not cands:
            return cands
        # a candidate that overshoots the budget by more than `tolerance` (e.g. a whole layer where a few FFN chunks
        # were needed) is not a fair alternative: keep only those close to the target (or the closest, if none is)
        close = {w: pl for w, pl in cands.items() if achieved(w) >= r - tolerance}
        top = max(cands, key=achieved)
        return close or {top: cands[top]}

    # a chain: (worst regret, summed loss, widths of its last level, its levels' records)
    Chain = tuple[float, float, tuple, list[dict]]
    rank: Callable[[Chain], tuple] = (lambda c: (c[1],)) if chain == "sum" else (lambda c: (c[0], c[1]))
    chains: list[Chain] = [(0.0, 0.0, tuple([(dims.n_head_kv, dims.n_ff)] * dims.n_layer), [])]
    for r in _targets_desc(ratios):
        per_parent = [(c, candidates(c[2], r)) for c in chains]
        if not any(cands for _, cands in per_parent):
            raise ContractError(f"cannot reach ratio {r}: no policy can remove enough parameters")
        measure = evaluate is not None and len({w for _, cands in per_parent for w in cands}) > 1
        cache: dict[tuple, float] = {}  # the same widths from two parents are measured once
        scored_all = []
        for parent, cands in per_parent:
            scored = []
            for w, pl in cands.items():
                if measure and w not in cache:
                    cache[w] = evaluate(list(w))  # type: ignore[misc]
                scored.append((cache[w] if measure else float("nan"), w, pl))
            scored_all.append((parent, scored))
        best = min(cache.values()) if cache else float("nan")
        grown: dict[tuple, Chain] = {}
        for (worst, cum, _, hist), scored in scored_all:
            for loss, w, pl in scored:
                regret = loss - best if loss == loss else 0.0
                rec = {"ratio": r, "chosen": pl[0].label(), "loss": loss, "regret": regret, "widths": w,
                       "candidates": {" | ".join(p.label() for p in ps): x for x, _, ps in scored}}
                c = (max(worst, regret), cum + (loss if loss == loss else 0.0), w, hist + [rec])
                if w not in grown or rank(c) < rank(grown[w]):  # the same widths from two parents: the better chain
                    grown[w] = c
        chains = sorted(grown.values(), key=rank)[:beam]
        if measure:
            top = chains[0][3][-1]
            log.info("level %g: candidates %s; kept %s", r,
                     ", ".join(f"{k}: {v:.4f}" for k, v in sorted(top["candidates"].items(), key=lambda kv: kv[1])),
                     "; ".join(f"'{c[3][-1]['chosen']}' ({c[3][-1]['loss']:.4f}, chain sum {c[1]:.4f}, "
                               f"worst regret {c[0]:.4f})" for c in chains))
    out: list[Level] = []
    for rec in chains[0][3]:
        if trace is not None:
            trace.levels.append({k: rec[k] for k in ("ratio", "chosen", "loss", "regret", "candidates")})
        lv = Level(ratio=rec["ratio"], head_count_kv=[w[0] for w in rec["widths"]],
                   feed_forward_length=[w[1] for w in rec["widths"]])
        lv.achieved_ratio = level_ratio(dims, lv, qkv_bias=qkv_bias)
        out.append(lv)
    return out[::-1]


def _uniform_candidates(dims: ModelDims, grid: WidthGrid, k: float, *, at_most: int) -> list[int]:
    """KV counts to try for kept fraction ``k``: round(n_kv * k), at least one group; on a tie or k < 1 group,
    both neighbours (quality-feasibility.md section 3). Never more than ``at_most`` (nested levels)."""
    want = dims.n_head_kv * k
    nonzero = [v for v in grid.kv_values if 0 < v <= at_most] or [v for v in grid.kv_values if v <= at_most]
    best = min(nonzero, key=lambda v: (abs(v - want), -v))
    cands = {best}
    for v in nonzero:
        if abs(abs(v - want) - abs(best - want)) < 1e-9 or (want < 1 and v <= 1):
            cands.add(v)
    return sorted(cands)


def uniform(
    dims: ModelDims, ratios: Sequence[float], anchors: Sequence[int], grid: WidthGrid, *, qkv_bias: bool = False,
    allowed: Callable[[int, int, int], bool] | None = None,
) -> list[Level]:
    """ELMS' uniform rule: the same kept fraction ``k`` in every non-anchor layer (quality-feasibility.md section 3).

    KV groups = round(n_kv * k) (at least one; on a tie or k < 1 group both neighbours are tried), then the FFN
    width (on the grid) that brings the layer closest to ``k`` x the full layer; levels are clamped to be nested.
    """
    ok = allowed or (lambda il, kv, ff: True)
    anchors = set(anchors)
    L = dims.n_layer
    elastic = [i for i in range(L) if i not in anchors]
    full = layer_params(dims, dims.n_head_kv, dims.n_ff, qkv_bias=qkv_bias)
    out: list[Level] = []
    prev = (dims.n_head_kv, dims.n_ff)
    for r in _targets_desc(ratios):
        kv, ff = dims.n_head_kv, dims.n_ff
        if r < 1.0 - 1e-12 and elastic:
            k = max(0.0, (L * r - len(anchors)) / len(elastic))
            best = None
            for kv_c in _uniform_candidates(dims, grid, k, at_most=prev[0]):
                for ff_c in grid.ff_values:
                    if ff_c > prev[1] or not all(ok(il, kv_c, ff_c) for il in elastic):
                        continue
                    err = abs(layer_params(dims, kv_c, ff_c, qkv_bias=qkv_bias) - k * full)
                    if best is None or err < best[0] - 1e-9:
                        best = (err, kv_c, ff_c)
            if best is not None:
                _, kv, ff = best
        prev = (kv, ff)
        lv = Level(ratio=r,
                   head_count_kv=[dims.n_head_kv if i in anchors else kv for i in range(L)],
                   feed_forward_length=[dims.n_ff if i in anchors else ff for i in range(L)])
        lv.achieved_ratio = level_ratio(dims, lv, qkv_bias=qkv_bias)
        out.append(lv)
    return out[::-1]


def layerdrop(
    dims: ModelDims, ratios: Sequence[float], anchors: Sequence[int], skip_loss: Sequence[float], *, qkv_bias: bool = False
) -> list[Level]:
    """Drop whole non-anchor layers, least harmful (smallest single-skip loss increase) first, ratio closest to target."""
    anchors = set(anchors)
    order = sorted((i for i in range(dims.n_layer) if i not in anchors), key=lambda i: (skip_loss[i], i))
    out = []
    for r in sorted(set(float(x) for x in ratios)):
        best = None
        for n_drop in range(len(order) + 1):
            dropped = set(order[:n_drop])
            lv = Level(ratio=r,
                       head_count_kv=[0 if i in dropped else dims.n_head_kv for i in range(dims.n_layer)],
                       feed_forward_length=[0 if i in dropped else dims.n_ff for i in range(dims.n_layer)])
            lv.achieved_ratio = level_ratio(dims, lv, qkv_bias=qkv_bias)
            if best is None or abs(lv.achieved_ratio - r) < abs(best.achieved_ratio - r) - 1e-12:  # type: ignore[operator]
                best = lv
        out.append(best)
    # nested: a smaller level drops a superset of layers (holds since the order is fixed, but keep it explicit)
    for a, b in zip(out, out[1:]):
        for i in range(dims.n_layer):
            if a.head_count_kv[i] > b.head_count_kv[i]:
                b.head_count_kv[i] = a.head_count_kv[i]
                b.feed_forward_length[i] = a.feed_forward_length[i]
    return out  # type: ignore[return-value]


__all__ = ["ALLOCATIONS", "CHAIN_OBJECTIVES", "DEFAULT_POLICIES", "TASK_POLICIES", "WidthGrid", "LayerCost",
           "SearchTrace", "searched", "uniform", "layerdrop"]
