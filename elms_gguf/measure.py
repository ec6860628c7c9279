"""Calibration-loss measurements on the PyTorch reference (:mod:`elms_gguf.model`).

* :class:`Runner` runs the reference's own layer functions (:func:`model.attention`, :func:`model.feed_forward`,
  :func:`model.rms_norm`) at any per-layer widths. With ``fast=True`` the weight matrices are held in bfloat16 and
  the matmuls run under CPU autocast (AMX/AVX512-BF16 where present: ~3x faster here) while the residual stream,
  norms and losses stay float32; loss differences against float32 are ~0.002 nats, far below the sampling noise
  of a calibration batch. ``fast=False`` is bit-for-bit :func:`model.forward`.
* :class:`LossProbe` caches the dense model's residual stream at every layer input for a fixed token batch, so a
  configuration that equals the dense model up to layer ``l`` runs from ``l`` on (single-layer / single-block
  probes cost about half a forward pass on average).
* :class:`ChoiceProbe` / :class:`TaskProbe` score multiple-choice questions and gold answers the way ``elms-eval``
  does (log-likelihood of each continuation), for choosing allocations by what the task benchmarks reward.
* :func:`loss_and_grads` runs forward + backward for first-order Taylor importance.
* :func:`block_energy` gives, per layer, the share of the attention / FFN block output energy that a prefix of
  units leaves out (the shape of the cost curves used by the searched allocation).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from . import model as M


def ce_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of ``tokens`` [B, T] (T-1 predictions per row)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                           reduction="sum")


class Runner:
    """The reference decoder, layer by layer, on one set of weights."""

    def __init__(self, config: M.ModelConfig, weights: Mapping[str, torch.Tensor], *, fast: bool = True,
                 micro_tokens: int = 1024):
        self.config, self.fast, self.micro_tokens = config, fast, max(1, micro_tokens)
        if fast:
            self.w = {k: (v.to(torch.bfloat16) if v.dim() == 2 else v.float()) for k, v in weights.items()}
        else:
            self.w = {k: v.float() for k, v in weights.items()}
        self.tokens_run = 0  # (token x layer) work done, for reports

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Row chunks of about ``micro_tokens`` tokens (bounds the [rows, T, n_vocab] logits in memory)."""
        return tokens.long().split(max(1, self.micro_tokens // max(1, tokens.shape[1])))

    def ctx(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.fast else contextlib.nullcontext()

    def embed(self, tok: torch.Tensor) -> torch.Tensor:
        return self.w["token_embd.weight"][tok].float()

    def layer(self, x: torch.Tensor, il: int, kv: int, ff: int, *, pos: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        c, w = self.config, self.w
        if kv > 0:
            h = M.rms_norm(x, w[f"blk.{il}.attn_norm.weight"], c.rms_eps)
            x = x + M.attention(c, w, h, il, kv, pos=pos, mask=mask).float()
        if ff > 0:
            x = x + M.feed_forward(w, M.rms_norm(x, w[f"blk.{il}.ffn_norm.weight"], c.rms_eps), il, ff).float()
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.w
        x = M.rms_norm(x, w["output_norm.weight"], c.rms_eps)
        logits = x @ (w["output.weight"] if "output.weight" in w else w["token_embd.weight"]).T
        if "output.bias" in w:
            logits = logits + w["output.bias"]
        return logits

    @torch.no_grad()
    def loss(self, tokens: torch.Tensor, widths: Sequence[tuple[int, int]] | None = None) -> float:
        """Mean next-token cross-entropy of ``tokens`` [B, T] at ``widths`` (None = dense)."""
        widths = M.check_widths(self.config, widths)
        total, count = 0.0, 0
        with self.ctx():
            for tok in self.split(tokens):
                x = self.embed(tok)
                for il, (kv, ff) in enumerate(widths):
                    x = self.layer(x, il, kv, ff)
                total += float(ce_sum(self.head(x), tok))
                count += tok.shape[0] * (tok.shape[1] - 1)
                self.tokens_run += tok.numel() * len(widths)
        return total / max(count, 1)


class LossProbe:
    """Mean cross-entropy of one token batch at arbitrary widths, with the dense residual stream cached per layer."""

    def __init__(self, runner: Runner, tokens: torch.Tensor):
        self.r = runner
        self.tokens = tokens.long()
        self.full = runner.config.full_widths()
        self.calls = 0
        self._memo: dict[tuple, float] = {}
        self._cache: list[list[torch.Tensor]] = []
        total, count = 0.0, 0
        with torch.no_grad(), runner.ctx():
            for tok in runner.split(self.tokens):
                x = runner.embed(tok)
                states = []
                for il, (kv, ff) in enumerate(self.full):
                    states.append(x)
                    x = runner.layer(x, il, kv, ff)
                self._cache.append(states)
                total += float(ce_sum(runner.head(x), tok))
                count += tok.shape[0] * (tok.shape[1] - 1)
        self.count = count
        self.dense_loss = total / count

    def state(self, il: int) -> torch.Tensor:
        """The dense residual stream at the input of layer ``il``, all rows."""
        return torch.cat([s[il] for s in self._cache])

    @torch.no_grad()
    def loss(self, widths: Sequence[tuple[int, int]] | None = None) -> float:
        if widths is None:
            return self.dense_loss
        widths = M.check_widths(self.r.config, widths)
        key = (id(self.r), tuple(widths))
        if key in self._memo:
            return self._memo[key]
        n = len(widths)
        start = next((il for il in range(n) if tuple(widths[il]) != tuple(self.full[il])), n)
        if start == n:
            return self.dense_loss
        total = 0.0
        with self.r.ctx():
            for bi, tok in enumerate(self.r.split(self.tokens)):
                x = self._cache[bi][start]
                for il in range(start, n):
                    x = self.r.layer(x, il, *widths[il])
                total += float(ce_sum(self.r.head(x), tok))
                self.r.tokens_run += tok.numel() * (n - start)
        self.calls += 1
        self._memo[key] = total / self.count
        return self._memo[key]


class _Batch(NamedTuple):
    """Rows of a :class:`ChoiceProbe`, right-padded; ``pos`` / ``mask`` only where a row packs several choices."""

    tokens: torch.Tensor  # [B, T]
    pos: torch.Tensor | None  # [B, T] positions (None: 0..T-1)
    mask: torch.Tensor | None  # [B, T, T], True = may attend (None: causal)
    meta: list[tuple[int, int, int, list[int], list[int]]]  # (row, item, choice, predicting positions, continuation)


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question as token ids: a (context, continuation) pair per choice (the contexts are
    usually equal; Winogrande's differ), the gold choice, and each continuation's length in characters (for
    per-character normalisation, as ``acc_per_char`` does)."""

    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    gold: int
    chars: tuple[int, ...]
    per_char: bool = True


class ChoiceProbe:
    """How well a configuration answers a fixed set of questions, scored as ``elms-eval`` scores them.

    A choice's score is the summed log-probability of its continuation tokens after its context (divided by its
    length in characters where ``per_char``). For multiple-choice items the probe's loss is the mean cross-entropy
    of the gold choice under a softmax over the choices' scores (each rescaled by the item's mean continuation
    length, so per-character scores live on the scale of a log-likelihood): smoother than accuracy, and it measures
    the discrimination multiple-choice benchmarks reward. For items with a single pair (a gold answer, e.g. SQuAD's
    span after its passage) the loss is the answer tokens' mean negative log-likelihood. A probe holds one kind or
    the other.

    Cost: the choices of an item that share a context are packed into one row -- the context once, then each
    continuation, positioned right after the context and attending to the context and to itself only -- so the
    context is computed once, not once per choice (ARC / CSQA / HellaSwag rows are mostly context: ~1.7x fewer
    tokens on ``elms-convert --select tasks``' sets). And the dense residual stream is kept at the first layer a
    configuration changes (up to ``cached_layers`` such layers), so configurations that leave the first layers
    full width (anchors) run from there on. ``pack=False`` runs each choice as its own row (for timing the two).
    """

    def __init__(self, runner: Runner, items: Sequence[ChoiceItem], *, max_tokens: int = 2048,
                 cached_layers: int = 4, pack: bool = True):
        self.r, self.items = runner, list(items)
        if not self.items:
            raise ValueError("ChoiceProbe needs at least one item")
        kinds = {len(it.pairs) == 1 for it in self.items}
        if len(kinds) != 1:
            raise ValueError("ChoiceProbe items must be all multiple-choice or all single answers")
        self.answers = kinds.pop()
        # a row: the context, then each continuation but its last token; per choice, the row positions whose
        # logits predict its continuation tokens (the context's last position predicts the first)
        rows: list[tuple[list[int], list[int], list[int], list[tuple[int, int, list[int], list[int]]]]] = []
        self.n_unpacked = 0
        for ii, it in enumerate(self.items):
            if not 0 <= it.gold < len(it.pairs) or len(it.chars) != len(it.pairs):
                raise ValueError(f"choice item {ii}: gold {it.gold} / {len(it.chars)} lengths for {len(it.pairs)} choices")
            by_ctx: dict[tuple, list[int]] = {}
            for ci, (ctx, cont) in enumerate(it.pairs):
                if not ctx or not cont:
                    raise ValueError(f"choice item {ii}, choice {ci}: empty context or continuation")
                by_ctx.setdefault(tuple(ctx) if pack else (tuple(ctx), ci), []).append(ci)
                self.n_unpacked += len(ctx) + len(cont) - 1
            for cis in by_ctx.values():
                ctx = it.pairs[cis[0]][0]
                tok, pos, seg, preds = list(ctx), list(range(len(ctx))), [0] * len(ctx), []
                for j, ci in enumerate(cis, start=1):
                    cont = list(it.pairs[ci][1])
                    preds.append((ii, ci, [len(ctx) - 1] + list(range(len(tok), len(tok) + len(cont) - 1)), cont))
                    tok += cont[:-1]
                    pos += range(len(ctx), len(ctx) + len(cont) - 1)
                    seg += [j] * (len(cont) - 1)
                rows.append((tok, pos, seg, preds))
        rows.sort(key=lambda row: len(row[0]))
        # length-sorted batches of about max_tokens, right-padded (pads are never attended to)
        self.batches: list[_Batch] = []
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and (j - i + 1) * len(rows[j][0]) <= max_tokens:
                j += 1
            group = rows[i:j]
            B, T = len(group), len(group[-1][0])
            tok = torch.zeros((B, T), dtype=torch.long)
            packed = any(len(preds) > 1 for *_, preds in group)
            pos = torch.arange(T).repeat(B, 1) if packed else None
            mask = torch.ones(T, T, dtype=torch.bool).tril().repeat(B, 1, 1) if packed else None
            meta = []
            for b, (t, p, sg, preds) in enumerate(group):
                n = len(t)
                tok[b, :n] = torch.tensor(t)
                if packed:
                    sgt = torch.tensor(sg)
                    pos[b, :n] = torch.tensor(p)  # type: ignore[index]
                    mask[b, :n, :n] &= (sgt[None, :] == 0) | (sgt[None, :] == sgt[:, None])  # type: ignore[index]
                meta += [(b, ii, ci, at, cont) for ii, ci, at, cont in preds]
            self.batches.append(_Batch(tok, pos, mask, meta))
            i = j
        self.n_tokens = sum(len(row[0]) for row in rows)
        self.cached_layers = cached_layers
        self._states: dict[int, list[torch.Tensor]] = {}  # dense residual stream at a layer's input, per batch
        self._memo: dict[tuple, tuple[float, float]] = {}
        self._scores: dict[tuple, list[torch.Tensor]] = {}

    def _dense_states(self, start: int) -> list[torch.Tensor]:
        """The dense residual stream at the input of layer ``start``, per batch (from the deepest cached layer at
        or before it; kept for later calls, at most ``cached_layers`` layers, the least recently used dropped)."""
        if start in self._states:
            self._states[start] = self._states.pop(start)  # most recently used last
            return self._states[start]
        below = max((il for il in self._states if il < start), default=None)
        full = self.r.config.full_widths()
        out = []
        with self.r.ctx():
            for bi, (tok, pos, mask, _) in enumerate(self.batches):
                x = self.r.embed(tok) if below is None else self._states[below][bi]
                for il in range(0 if below is None else below, start):
                    x = self.r.layer(x, il, *full[il], pos=pos, mask=mask)
                self.r.tokens_run += tok.numel() * (start - (below or 0))
                out.append(x)
        if self.cached_layers > 0 and start > 0:
            self._states[start] = out
            while len(self._states) > self.cached_layers:
                self._states.pop(next(iter(self._states)))
        return out

    @torch.no_grad()
    def logliks(self, widths: Sequence[tuple[int, int]] | None = None) -> list[list[float]]:
        """Summed continuation log-probability of every choice of every item at ``widths``."""
        widths = M.check_widths(self.r.config, widths)
        full = self.r.config.full_widths()
        start = next((il for il in range(len(widths)) if widths[il] != full[il]), len(widths))
        states = self._dense_states(start)
        out = [[0.0] * len(it.pairs) for it in self.items]
        with self.r.ctx():
            for (tok, pos, mask, meta), x in zip(self.batches, states):
                for il in range(start, len(widths)):
                    x = self.r.layer(x, il, *widths[il], pos=pos, mask=mask)
                self.r.tokens_run += tok.numel() * (len(widths) - start)
                rows = torch.tensor([a for *_, at, _ in meta for a in at])
                batch = torch.tensor([b for b, *_, cont in meta for _ in cont])
                lp = self.r.head(x[batch, rows]).float().log_softmax(-1)  # the head only where a token is predicted
                got = lp[torch.arange(len(rows)), torch.tensor([t for *_, cont in meta for t in cont])]
                k = 0
                for _, ii, ci, _, cont in meta:
                    out[ii][ci] = float(got[k:k + len(cont)].sum())
                    k += len(cont)
        return out

    def choice_scores(self, widths: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Per item, the choices' scores as accuracy ranks them (float64; per-character scores rescaled by the item's
        mean continuation length, so they live on the scale of a log-likelihood)."""
        key = tuple(M.check_widths(self.r.config, widths))
        if key not in self._scores:
            out = []
            for it, ll in zip(self.items, self.logliks(list(key))):
                s = torch.tensor(ll, dtype=torch.float64)
                if it.per_char:
                    ch = torch.tensor([max(1, c) for c in it.chars], dtype=torch.float64)
                    s = s / ch * ch.mean()
                out.append(s)
            self._scores[key] = out
        return self._scores[key]

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform guess (mean of 1 / choices)."""
        return sum(1.0 / len(it.pairs) for it in self.items) / len(self.items)

    def z_above_chance(self, widths: Sequence[tuple[int, int]] | None = None) -> float:
        """How many binomial standard errors the accuracy at ``widths`` lies above :attr:`chance`."""
        chance = self.chance
        return (self.score(widths)[1] - chance) / math.sqrt(chance * (1 - chance) / len(self.items))

    def score(self, widths: Sequence[tuple[int, int]] | None = None) -> tuple[float, float]:
        """(loss, accuracy) at ``widths`': lower loss is better; accuracy is NaN for single-answer items."""
        key = tuple(M.check_widths(self.r.config, widths))
        if key not in self._memo:
            if self.answers:
                lls = self.logliks(list(key))
                n_tok = sum(len(it.pairs[0][1]) for it in self.items)
                self._memo[key] = (-sum(ll[0] for ll in lls) / n_tok, float("nan"))
            else:
                nll, hits = 0.0, 0
                for it, s in zip(self.items, self.choice_scores(list(key))):
                    nll -= float(s.log_softmax(0)[it.gold])
                    hits += int(int(s.argmax()) == it.gold)
                self._memo[key] = (nll / len(self.items), hits / len(self.items))
        return self._memo[key]

    def loss(self, widths: Sequence[tuple[int, int]] | None = None) -> float:
        return self.score(widths)[0]

    def soft_accuracy(self, widths: Sequence[tuple[int, int]] | None = None, *, temperature: float = 1.0) -> float:
        """Mean probability of the gold choice under a softmax over the choices' scores / ``temperature``: accuracy
        made smooth. Unlike the cross-entropy it is bounded per question, so a few confidently wrong answers do not
        dominate it, and flattening the scores moves it towards :attr:`chance` (down for a model above chance)."""
        if self.answers:
            raise ValueError("soft accuracy needs multiple-choice items")
        return sum(float((s / temperature).softmax(0)[it.gold])
                   for it, s in zip(self.items, self.choice_scores(widths))) / len(self.items)

    def fit_temperature(self, widths: Sequence[tuple[int, int]] | None = None) -> float:
        """The temperature that minimises the gold choices' cross-entropy at ``widths`` (default: dense), i.e. that
        calibrates the softmax over choice scores (log-spaced grid, 1/64 to 1024)."""
        if self.answers:
            raise ValueError("a temperature needs multiple-choice items")
        scores = self.choice_scores(widths)

        def ce(t: float) -> float:
            return -sum(float((s / t).log_softmax(0)[it.gold]) for it, s in zip(self.items, scores))

        grid = [2.0 ** (k / 8) for k in range(-48, 81)]
        return min(grid, key=ce)


class TaskProbe:
    """Several :class:`ChoiceProbe` sets combined into one selection loss (1.0 = dense, lower is better).

    * A multiple-choice set counts only if the dense model answers it clearly above chance (accuracy at least
      ``min_z`` binomial standard errors above :attr:`ChoiceProbe.chance`): on a set the model guesses, a pruned
      model "improves" by guessing less confidently, which is noise for the selection (on SmolLM2-135M, Winogrande
      and SocialIQA scored pruned levels *better* than dense by the choices' cross-entropy).
    * A kept set's loss is ``1 + (dense - level) / (dense - chance)`` on the soft accuracy
      (:meth:`ChoiceProbe.soft_accuracy` at the temperature that calibrates the dense model): 1 at dense, 2 at
      chance, i.e. 2 minus the share of the dense model's margin over chance the level keeps -- the quantity the
      quality goals are stated in.
    * A gold-answer set's loss is the answer tokens' mean NLL relative to dense.

    The selection loss is the mean over the kept sets; :attr:`dropped` names the others and why.
    """

    def __init__(self, runner: Runner, sets: Mapping[str, Sequence[ChoiceItem]], *, max_tokens: int = 2048,
                 min_z: float = 2.0, pack: bool = True):
        if not sets:
            raise ValueError("TaskProbe needs at least one set")
        self.probes: dict[str, ChoiceProbe] = {}
        self.dense: dict[str, float] = {}
        self.temperature: dict[str, float] = {}
        self.dropped: dict[str, str] = {}
        for name, items in sets.items():
            p = ChoiceProbe(runner, items, max_tokens=max_tokens, pack=pack)
            if p.answers:
                d = p.loss(None)
                if not d > 0:
                    raise ValueError(f"probe set {name!r}: dense loss {d} is not positive")
            else:
                acc, chance, z = p.score(None)[1], p.chance, p.z_above_chance(None)
                if z < min_z:
                    self.dropped[name] = (f"dense accuracy {acc:.3f} is not clearly above chance {chance:.3f} "
                                          f"(z {z:.2f} < {min_z:g}) on {len(p.items)} questions")
                    continue
                self.temperature[name] = p.fit_temperature(None)
                d = p.soft_accuracy(None, temperature=self.temperature[name])
                if d <= chance + 1e-3:  # calibrated soft accuracy at chance: no margin to keep
                    self.dropped[name] = f"dense soft accuracy {d:.3f} is not above chance {chance:.3f}"
                    continue
            self.probes[name], self.dense[name] = p, d
        if not self.probes:
            raise ValueError("no question set is usable: " + "; ".join(f"{k}: {v}" for k, v in self.dropped.items()))
        self.n_tokens = sum(p.n_tokens for p in self.probes.values())

    def detail(self, widths: Sequence[tuple[int, int]] | None = None) -> dict[str, float]:
        """Each kept set's loss at ``widths`` (1.0 = dense)."""
        out = {}
        for name, p in self.probes.items():
            if p.answers:
                out[name] = p.loss(widths) / self.dense[name]
            else:
                soft = p.soft_accuracy(widths, temperature=self.temperature[name])
                out[name] = 1.0 + (self.dense[name] - soft) / (self.dense[name] - p.chance)
        return out

    def loss(self, widths: Sequence[tuple[int, int]] | None = None) -> float:
        d = self.detail(widths)
        return sum(d.values()) / len(d)


def loss_and_grads(config: M.ModelConfig, weights: Mapping[str, torch.Tensor], tokens: torch.Tensor,
                   names: Sequence[str], *, micro_tokens: int = 512, fast: bool = True,
                   progress: Callable[[int], object] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Dense mean cross-entropy of ``tokens`` and its gradient w.r.t. the tensors ``names`` (float32)."""
    params = {n: weights[n].detach().float().requires_grad_(True) for n in names}  # shares storage, no copy
    w = {k: v.float() for k, v in weights.items()}
    w.update(params)
    n_total = tokens.shape[0] * (tokens.shape[1] - 1)
    total = 0.0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if fast else contextlib.nullcontext()
    for tok in tokens.long().split(max(1, micro_tokens // max(1, tokens.shape[1]))):
        with ctx:
            logits = M.forward(config, w, tok)
            loss = ce_sum(logits, tok) / n_total
        loss.backward()
        total += float(loss.detach())
        del logits, loss
        if progress is not None:
            progress(tok.shape[0])
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    return total, grads


@torch.no_grad()
def block_energy(runner: Runner, probe: LossProbe, il: int, kv_values: Sequence[int], ff_values: Sequence[int]
                 ) -> tuple[dict[int, float], dict[int, float]]:
    """Share of layer ``il``'s attention / FFN output energy (sum of squares over the probe's tokens) that is
    *dropped* when keeping the first ``kv`` KV groups / ``ff`` neurons (input fixed to the dense stream).

    Units are independent given the block input (a KV group's heads only read their own K/V; a neuron only
    its own gate/up rows), so the dropped output is exactly the removed units' summed contributions.
    """
    c, w = runner.config, runner.w
    p = f"blk.{il}."
    G, hd = c.group, c.head_dim
    q_cols = c.n_head * hd
    x = probe.state(il)
    with runner.ctx():  # block inputs as the runner computes them ...
        xa = M.rms_norm(x, w[p + "attn_norm.weight"], c.rms_eps)
        # attention output before attn_output: model.attention with an identity output projection
        eye = {**w, p + "attn_output.weight": torch.eye(q_cols, dtype=w[p + "attn_output.weight"].dtype)}
        eye.pop(p + "attn_output.bias", None)
        o = M.attention(c, eye, xa, il, c.n_head_kv).float()  # [B, T, n_head*hd]
    # ... energies in float32 (bf16 sums of squares are far too coarse)
    Wo = w[p + "attn_output.weight"].float()
    y_full = o @ Wo.T
    e = _suffix_energy(o, Wo, [kv * G * hd for kv in kv_values], float((y_full ** 2).sum()) or 1.0)
    attn = {kv: e[kv * G * hd] for kv in kv_values}
    xm = x + y_full + (w[p + "attn_output.bias"].float() if p + "attn_output.bias" in w else 0.0)
    with runner.ctx():
        xf = M.rms_norm(xm, w[p + "ffn_norm.weight"], c.rms_eps)
        h = (F.silu(M.linear(xf, w, p + "ffn_gate.weight")) * M.linear(xf, w, p + "ffn_up.weight")).float()
    Wd = w[p + "ffn_down.weight"].float()
    ffn = _suffix_energy(h, Wd, list(ff_values), float(((h @ Wd.T) ** 2).sum()) or 1.0)
    return attn, ffn


def _suffix_energy(h: torch.Tensor, W: torch.Tensor, cuts: Sequence[int], e_full: float) -> dict[int, float]:
    """{cut: energy of sum_{u >= cut} h[..., u] W[:, u]} / e_full, by running suffix sums over the cut points."""
    n = W.shape[1]
    points = sorted(set(int(x) for x in cuts) | {n}, reverse=True)
    out = {n: 0.0}
    acc = None
    hi = n
    for cut in points[1:]:
        part = h[..., cut:hi] @ W[:, cut:hi].T
        acc = part if acc is None else acc + part
        out[cut] = float((acc ** 2).sum()) / e_full
        hi = cut
    return out


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
