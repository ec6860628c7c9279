"""Calibration-loss measurements on the PyTorch reference (:mod:`elms_gguf.model`).

* :class:`Runner` runs the reference's own layer functions (:func:`model.attention`, :func:`model.feed_forward`,
  :func:`model.rms_norm`) at any per-layer widths. With ``fast=True`` the weight matrices are held in bfloat16 and
  the matmuls run under CPU autocast (AMX/AVX512-BF16 where present: ~3x faster here) while the residual stream,
  norms and losses stay float32; loss differences against float32 are ~0.002 nats, far below the sampling noise
  of a calibration batch. ``fast=False`` is bit-for-bit :func:`model.forward`.
* :class:`LossProbe` caches the dense model's residual stream at every layer input for a fixed token batch, so a
  configuration that equals the dense model up to layer ``l`` runs from ``l`` on (single-layer / single-block
  probes cost about half a forward pass on average).
* :func:`loss_and_grads` runs forward + backward for first-order Taylor importance.
* :func:`block_energy` gives, per layer, the share of the attention / FFN block output energy that a prefix of
  units leaves out (the shape of the cost curves used by the searched allocation).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, Sequence

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

    def layer(self, x: torch.Tensor, il: int, kv: int, ff: int) -> torch.Tensor:
        c, w = self.config, self.w
        if kv > 0:
            x = x + M.attention(c, w, M.rms_norm(x, w[f"blk.{il}.attn_norm.weight"], c.rms_eps), il, kv).float()
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
