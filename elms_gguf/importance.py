"""Elastic units, their importance scores, and the permutation that sorts them.

Units (as in ELMS / LLM-Pruner, GQA flavour):

* **attention unit** = one KV group ``g``: rows ``g*hd:(g+1)*hd`` of ``attn_k`` and ``attn_v`` (+ their bias entries),
  rows ``g*G*hd:(g+1)*G*hd`` of ``attn_q`` (its ``G = n_head / n_head_kv`` query heads, + bias entries) and the same
  columns of ``attn_output``. llama.cpp maps query head ``h`` to KV head ``h // G`` (contiguous blocks), so moving a
  whole group keeps the mapping intact; the rope permutation of GGUF q/k rows stays *inside* each head, so whole
  heads can be moved in GGUF layout.
* **FFN unit** = one neuron ``u``: row ``u`` of ``ffn_gate`` and ``ffn_up``, column ``u`` of ``ffn_down``.

Scores (higher = more important = kept longer):

* ``taylor``: first-order Taylor, sum of ``|w * dL/dw|`` over the unit's coupled weights (ELMS' choice);
* ``magnitude``: L2 norm of the unit's coupled weights (a weak baseline on SmolLM2, see quality-feasibility.md);
* ``random``: a seeded random order (baseline).

The permutation of a layer sorts its units by descending score, so every level is a prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .contract import ModelDims

IMPORTANCE_KINDS = ("taylor", "magnitude", "random")


def tname(il: int, name: str, kind: str = "weight") -> str:
    return f"blk.{il}.{name}.{kind}"


@dataclass
class LayerScores:
    attn: torch.Tensor  # [n_head_kv] float64
    ffn: torch.Tensor  # [n_ff] float64


def _group_rows(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n_groups * r, ...] -> per-group sums over all elements: [n_groups]."""
    return t.reshape(n_groups, -1).sum(dim=1)


def unit_reduce(
    values: Mapping[str, torch.Tensor], il: int, dims: ModelDims, *, reduce: str = "sum"
) -> LayerScores:
    """Sum (``reduce='sum'``) or sum of squares (``'sqsum'``) of per-weight ``values`` over each unit of layer ``il``.

    ``values`` maps tensor names to tensors shaped like the weights (e.g. ``|w * g|`` or ``w``); missing bias
    entries are skipped.
    """
    f = (lambda t: t.double()) if reduce == "sum" else (lambda t: t.double() ** 2)
    nkv, G, hd = dims.n_head_kv, dims.group, dims.head_dim
    attn = torch.zeros(nkv, dtype=torch.float64)
    for name in ("attn_q", "attn_k", "attn_v"):
        for kind in ("weight", "bias"):
            t = values.get(tname(il, name, kind))
            if t is not None:
                attn += _group_rows(f(t), nkv)
    o = values.get(tname(il, "attn_output"))
    if o is not None:  # [n_embd, n_head*hd]: column blocks of G*hd per group
        attn += f(o).reshape(o.shape[0], nkv, G * hd).sum(dim=(0, 2))
    ffn = torch.zeros(dims.n_ff, dtype=torch.float64)
    for name in ("ffn_gate", "ffn_up"):
        t = values.get(tname(il, name))
        if t is not None:
            ffn += f(t).sum(dim=1)
    d = values.get(tname(il, "ffn_down"))
    if d is not None:
        ffn += f(d).sum(dim=0)
    return LayerScores(attn=attn, ffn=ffn)


ELASTIC_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def elastic_names(weights: Mapping[str, torch.Tensor], il: int) -> list[str]:
    out = []
    for name in ELASTIC_WEIGHTS:
        for kind in ("weight", "bias"):
            n = tname(il, name, kind)
            if n in weights:
                out.append(n)
    return out


def taylor_scores(weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], dims: ModelDims) -> list[LayerScores]:
    out = []
    for il in range(dims.n_layer):
        vals = {n: (weights[n] * grads[n]).abs() for n in elastic_names(weights, il) if n in grads}
        out.append(unit_reduce(vals, il, dims))
    return out


def magnitude_scores(weights: Mapping[str, torch.Tensor], dims: ModelDims) -> list[LayerScores]:
    out = []
    for il in range(dims.n_layer):
        s = unit_reduce({n: weights[n] for n in elastic_names(weights, il)}, il, dims, reduce="sqsum")
        out.append(LayerScores(attn=s.attn.sqrt(), ffn=s.ffn.sqrt()))
    return out


def random_scores(dims: ModelDims, seed: int) -> list[LayerScores]:
    g = torch.Generator().manual_seed(seed)
    return [
        LayerScores(attn=torch.rand(dims.n_head_kv, generator=g, dtype=torch.float64),
                    ffn=torch.rand(dims.n_ff, generator=g, dtype=torch.float64))
        for _ in range(dims.n_layer)
    ]


@dataclass
class LayerPerm:
    attn: torch.Tensor  # new group i = old group attn[i]
    ffn: torch.Tensor  # new neuron i = old neuron ffn[i]

    def is_identity(self) -> bool:
        return bool((self.attn == torch.arange(len(self.attn))).all() and (self.ffn == torch.arange(len(self.ffn))).all())


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` from most to least important (stable: ties keep the original order)."""
    return torch.sort(scores, descending=True, stable=True).indices


def orders_from_scores(scores: list[LayerScores], dims: ModelDims, *, skip: set[int] = frozenset()) -> list[LayerPerm]:
    ident = LayerPerm(attn=torch.arange(dims.n_head_kv), ffn=torch.arange(dims.n_ff))
    return [ident if il in skip else LayerPerm(attn=descending_order(s.attn), ffn=descending_order(s.ffn))
            for il, s in enumerate(scores)]


def _row_index(group_order: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    return (group_order[:, None] * rows_per_group + torch.arange(rows_per_group)[None, :]).reshape(-1)


def permute_layer(weights: dict[str, torch.Tensor], il: int, dims: ModelDims, perm: LayerPerm) -> None:
    """Reorder the units of layer ``il`` in place in the dict (new tensors; the old ones are not modified)."""
    G, hd = dims.group, dims.head_dim
    q_idx = _row_index(perm.attn, G * hd)
    kv_idx = _row_index(perm.attn, hd)
    for name, idx in (("attn_q", q_idx), ("attn_k", kv_idx), ("attn_v", kv_idx)):
        for kind in ("weight", "bias"):
            n = tname(il, name, kind)
            if n in weights:
                weights[n] = weights[n].index_select(0, idx).contiguous()
    n = tname(il, "attn_output")
    if n in weights:
        weights[n] = weights[n].index_select(1, q_idx).contiguous()
    for name in ("ffn_gate", "ffn_up"):
        n = tname(il, name)
        if n in weights:
            weights[n] = weights[n].index_select(0, perm.ffn).contiguous()
    n = tname(il, "ffn_down")
    if n in weights:
        weights[n] = weights[n].index_select(1, perm.ffn).contiguous()


def apply_permutation(weights: Mapping[str, torch.Tensor], dims: ModelDims, perms: list[LayerPerm]) -> dict[str, torch.Tensor]:
    """A new weight dict with every layer's units reordered (tensors of untouched layers are shared)."""
    out = dict(weights)
    for il, p in enumerate(perms):
        if not p.is_identity():
            permute_layer(out, il, dims, p)
    return out


def permute_scores(scores: list[LayerScores], perms: list[LayerPerm]) -> list[LayerScores]:
    return [LayerScores(attn=s.attn[p.attn], ffn=s.ffn[p.ffn]) for s, p in zip(scores, perms)]
