"""Word-level prompt compression (elms_gguf.compress) and the TLM scorer (elms_gguf.tlm, elms_gguf.tlm_train)."""
from __future__ import annotations

import numpy as np
import pytest

from elms_gguf import compress as C
from elms_gguf.compress import CompressionError, PromptCompressor

CONTEXT = ("You are a science tutor. Answer each question.\n\n"
           "Question: What do plants need to make food?\nAnswer: sunlight\n\n"
           "Question: Which planet is closest to the Sun?\nAnswer: Mercury")
QUESTION = "Question: What gas do animals breathe out?\nAnswer:"


class LengthScorer:
    """Longer words score higher; counts its calls."""

    name = "length"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, words):
        self.calls += 1
        return np.array([len(w) + 0.01 * i for i, (_, w) in enumerate(words)], dtype=float)


def is_subsequence(small, big):
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def test_split_render_roundtrip():
    words = C.split_words(CONTEXT)
    assert C.join_words(words) == CONTEXT
    assert C.render(words, [True] * len(words)) == CONTEXT
    keep = [i % 3 == 0 for i in range(len(words))]
    out = C.render(words, keep)
    assert out.split() == [w for (_, w), k in zip(words, keep) if k]
    # a dropped run that held a paragraph break keeps it
    assert "\n\n" in C.render(words, [w in ("tutor.", "Question:") for _, w in words])


def test_select_budget_and_order():
    scores = np.array([5.0, 1.0, 4.0, 3.0, 2.0])
    keep = C.select(scores, [1, 1, 1, 1, 1], 3)
    assert keep.tolist() == [True, False, True, True, False]
    keep = C.select(scores, [2, 1, 1, 1, 1], 3)  # word 0 (cost 2) fits, then only one more
    assert keep.tolist() == [True, False, True, False, False]
    keep = C.select(scores, [1] * 5, 1, force=[False, True, False, False, False])
    assert keep.tolist() == [False, True, False, False, False]
    with pytest.raises(CompressionError):
        C.select(scores, [1, 1], 1)


def test_compress_prompt_llmlingua_shape():
    sc = LengthScorer()
    pc = PromptCompressor(sc)  # counts words
    r = pc.compress_prompt(CONTEXT, question=QUESTION, rate=0.5)
    for k in ("compressed_prompt", "origin_tokens", "compressed_tokens", "ratio", "rate", "saving"):
        assert k in r
    assert r["compressed_prompt"].endswith("\n\n" + QUESTION)  # the question is never compressed
    ctx = r["compressed_context"]
    assert is_subsequence(ctx.split(), CONTEXT.split())  # kept words in their original order
    n_ctx = len(CONTEXT.split())
    assert r["context_tokens"] == n_ctx and r["compressed_context_tokens"] == round(0.5 * n_ctx)
    assert r["origin_tokens"] == n_ctx + len(QUESTION.split()) and r["ratio"].endswith("x")
    # the longest words win
    longest = sorted(CONTEXT.split(), key=len)[-1]
    assert longest in ctx.split()
    # target_tokens (and LLMLingua's target_token) pin the budget
    r2 = pc.compress_prompt([CONTEXT], instruction="INSTR", question=QUESTION, target_token=5)
    assert r2["compressed_context_tokens"] == 5 and r2["compressed_prompt"].startswith("INSTR\n\n")
    assert sc.calls == 1 and r2["cache_hit"]  # the same context: scored once
    # nothing to do
    r3 = pc.compress_prompt(CONTEXT, question=QUESTION, rate=1.0)
    assert r3["compressed_context"] == CONTEXT and r3["scorer_ms"] == 0.0
    # force_tokens
    r4 = pc.compress_prompt(CONTEXT, rate=0.2, force_tokens=["Mercury"])
    assert "Mercury" in r4["compressed_context"]


def test_compressed_context_fits_the_budget_with_whitespace_merging_tokenizer():
    """Word costs count each word with its own whitespace; a kept word after a dropped paragraph break renders with
    the break, which this tokenizer (like BPE: newlines are tokens, a space merges into the word) makes longer.
    The compressed context still never exceeds the budget, and fills most of it."""
    import re

    def tokenize(s: str) -> list[str]:
        return re.findall(r"\n| ?[A-Za-z]+| ?[^A-Za-z\s]| ", s)

    pc = PromptCompressor(LengthScorer(), tokenizer=tokenize)
    text = CONTEXT * 3
    n = len(tokenize(text))
    for rate in (0.2, 0.3, 0.5, 0.7, 0.9):
        r = pc.compress_prompt(text, rate=rate)
        budget = round(rate * n)
        assert r["context_tokens"] == n
        assert r["compressed_context_tokens"] == len(tokenize(r["compressed_context"])) <= budget, rate
        assert r["compressed_context_tokens"] >= 0.75 * budget, rate
        assert is_subsequence(r["compressed_context"].split(), text.split())
    # the overshoot is real without the fit: the first selection alone renders over budget for some rate
    words = C.split_words(text)
    costs = [len(tokenize(ws + w)) for ws, w in words]
    scores = LengthScorer().score(words)
    over = [len(tokenize(C.render(words, C.select(scores, costs, round(r * n))))) - round(r * n)
            for r in (0.2, 0.3, 0.5, 0.7, 0.9)]
    assert max(over) > 0


@pytest.mark.parametrize("kw", [dict(rate=0.0), dict(rate=1.5), dict(rate="half"), dict(target_tokens=-1),
                                dict(), dict(rate=0.5, target_tokens=3)])
def test_compress_prompt_refuses_bad_budgets(kw):
    with pytest.raises(CompressionError):
        PromptCompressor(LengthScorer()).compress_prompt(CONTEXT, **kw)


def test_cache_is_bounded():
    sc = LengthScorer()
    pc = PromptCompressor(sc, cache_size=2)
    for t in ("a b c d", "e f g h", "i j k l", "a b c d"):
        pc.compress_prompt(t, rate=0.5)
    assert sc.calls == 4  # "a b c d" was evicted


def test_selfinfo_scorer_matches_logits_all(tiny_elastic_llama):
    from runtime_helpers import require_runtime

    require_runtime()
    from elms_gguf.runtime import ElasticLlama

    llm = ElasticLlama(str(tiny_elastic_llama.path), n_ctx=128, n_batch=64, n_threads=1, n_threads_batch=1,
                       verbose=False)
    ref_llm = ElasticLlama(str(tiny_elastic_llama.path), n_ctx=128, n_batch=128, n_threads=1, n_threads_batch=1,
                           verbose=False, logits_all=True)
    words = C.split_words(CONTEXT)
    sc = C.SelfInfoScorer(llm, window=32)
    ids, owner = C.word_token_ids(sc._tokenize, words)
    n = 31  # the first window: BOS + 31 tokens
    ref_llm.reset()
    ref_llm.eval([1] + ids[:n])
    lg = np.asarray(ref_llm.scores[:n], dtype=np.float64)
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    ref = lse - lg[np.arange(n), ids[:n]]
    got = sc.token_surprisal(ids)
    assert np.allclose(got[:n], ref, atol=1e-4)
    s = sc.score(words)
    assert s.shape == (len(words),) and np.isfinite(s).all()
    assert np.isclose(s.sum(), got.sum())
    # level switching for the scoring is undone; the KV cache is left empty
    sc0 = C.SelfInfoScorer(llm, level=0, window=32)
    assert sc0.name == "selfinfo@L0"
    llm.set_level(1)
    s0 = sc0.score(words)
    assert llm.level == 1 and llm.n_tokens == 0 and not np.allclose(s0, s)


# -- TLM -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tlm_gguf_matches_pytorch(tlm_pair):
    import torch

    from elms_gguf import tlm as T
    from elms_gguf import tlm_train as TT

    m, path = tlm_pair
    head = T.read_head(path)
    assert head["n_layer"] == 1 and head["labels"] == "test" and head["target_model_id"] == "tiny"
    sc = T.TLMScorer(path, n_threads=1)
    tok = TT.hf_tokenizer()
    text = CONTEXT + "\nCafé résumé, naïve co-operation: 3.14 (approx.)! " + QUESTION
    words = C.split_words(text)
    per_word_hf = TT.word_ids(tok, words)
    per_word_ll = [sc.tokenize_word(w) for _, w in words]
    assert per_word_hf == per_word_ll  # llama.cpp's WPM tokenizer == HF's, word by word
    ids = [TT.CLS_ID] + sum(per_word_hf, []) + [TT.SEP_ID]
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0].numpy()
    got = sc.token_logits(ids)
    assert np.abs(ref - got).max() < 0.02 * max(1.0, np.abs(ref).max())  # f16 weights
    # word scores: mean token logit, same ranking
    owner = [i for i, t in enumerate(per_word_hf) for _ in t]
    ref_w = T.pool_words(ref[1:-1], owner, len(words))
    got_w = sc.score(words)
    assert np.abs(ref_w - got_w).max() < 0.02 * max(1.0, np.abs(ref_w).max())
    assert np.corrcoef(np.argsort(np.argsort(ref_w)), np.argsort(np.argsort(got_w)))[0, 1] > 0.99
    # long inputs are cut into 512-token windows of whole words
    long_words = words * 12
    s = sc.score(long_words)
    assert s.shape == (len(long_words),) and np.isfinite(s).all()


@pytest.mark.slow
def test_tlm_compression_keeps_question_and_order(tlm_pair):
    from elms_gguf import tlm as T

    _, path = tlm_pair
    pc = PromptCompressor(T.TLMScorer(path, n_threads=1))
    r = pc.compress_prompt(CONTEXT, question=QUESTION, rate=0.4)
    assert r["compressed_prompt"].endswith(QUESTION) and r["scorer"].startswith("tlm:")
    assert is_subsequence(r["compressed_context"].split(), CONTEXT.split())
    assert r["compressed_context_tokens"] <= round(0.4 * r["context_tokens"])


def test_tlm_refuses_non_tlm_gguf(tiny_llama, tmp_path):
    from elms_gguf import tlm as T

    with pytest.raises(T.TLMError, match="not an elms TLM"):
        T.read_head(tiny_llama.path)
    with pytest.raises(T.TLMError, match="not found"):
        T.read_head(tmp_path / "none.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(T.TLMError, match="not a GGUF"):
        T.read_head(bad)


def test_tlm_windows_and_pooling():
    from elms_gguf import tlm as T

    assert T.windows([3, 3, 3], 6) == [(0, 2), (2, 3)]
    assert T.windows([10, 1], 6) == [(0, 1), (1, 2)]  # an over-long word gets its own window
    out = T.pool_words(np.array([1.0, 3.0, 5.0]), [0, 0, 2], 3)
    assert out.tolist() == [2.0, 3.5, 5.0]  # word 1 had no tokens: the mean of the others


# -- TLM training (elms_gguf.tlm_train.train): a tiny random BERT, so it runs anywhere -----------------------


def _tiny_encoder(seed: int = 0, *, d: int = 32, n_layers: int = 2, vocab: int = 128):
    """An all-MiniLM-shaped encoder (HF tensor names) with random weights: 2 layers of width 32, 4 heads."""
    import torch

    from elms_gguf import tlm_train as TT

    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2):
        return torch.randn(*shape, generator=g) * scale

    t = {"embeddings.word_embeddings.weight": r(vocab, d), "embeddings.position_embeddings.weight": r(64, d),
         "embeddings.token_type_embeddings.weight": r(2, d),
         "embeddings.LayerNorm.weight": 1 + r(d, scale=0.05), "embeddings.LayerNorm.bias": r(d, scale=0.05)}
    for il in range(n_layers):
        p = f"encoder.layer.{il}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t[p + n + ".weight"], t[p + n + ".bias"] = r(d, d), r(d, scale=0.05)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = r(4 * d, d), r(4 * d, scale=0.05)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = r(d, 4 * d), r(d, scale=0.05)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + n + ".weight"], t[p + n + ".bias"] = 1 + r(d, scale=0.05), r(d, scale=0.05)
    cfg = {"num_hidden_layers": n_layers, "hidden_size": d, "num_attention_heads": 4, "layer_norm_eps": 1e-12}
    torch.manual_seed(seed)  # the head's initialisation
    return TT.Encoder(cfg, t, n_layers)


def _tiny_windows(n: int, seed: int = 0):
    """Windows of 4-12 words of 1-3 tokens; a word is 'keep' when its first token id is even (learnable)."""
    from elms_gguf import tlm_train as TT

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids, owner, labels = [], [], []
        for w in range(int(rng.integers(4, 13))):
            toks = rng.integers(3, 100, size=int(rng.integers(1, 4))).tolist()
            ids += toks
            owner += [w] * len(toks)
            labels.append(1.0 - toks[0] % 2)
        lab = np.array(labels, dtype=np.float32)
        out.append(TT.Window([TT.CLS_ID] + ids + [TT.SEP_ID], owner, lab + rng.random(len(lab)), lab))
    return out


def test_tlm_word_logits_are_the_mean_of_each_words_token_logits():
    import torch

    from elms_gguf import tlm_train as TT

    m = _tiny_encoder()
    wins = _tiny_windows(3, seed=1)
    got, labels = TT.word_logits(m, wins)
    ref, ref_labels = [], []
    with torch.no_grad():
        for w in wins:  # one window at a time, no padding: the mask must make the batched call identical
            tok = m(torch.tensor([w.ids]))[0, 1:-1].numpy()
            ref += [tok[[j for j, o in enumerate(w.owner) if o == k]].mean() for k in range(len(w.labels))]
            ref_labels += w.labels.tolist()
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == ref_labels


def test_tlm_training_lowers_the_loss_keeps_embeddings_frozen_and_returns_on_the_cpu():
    import torch

    from elms_gguf import tlm_train as TT

    m = _tiny_encoder()
    emb = m.p("embeddings.word_embeddings.weight").detach().clone()
    layer = m.p("encoder.layer.0.attention.self.query.weight").detach().clone()
    losses = TT.train(m, _tiny_windows(48), epochs=6, batch=8, lr=3e-3, head_lr=1e-2, device="cpu")
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.equal(m.p("embeddings.word_embeddings.weight"), emb)  # frozen
    assert not torch.equal(m.p("encoder.layer.0.attention.self.query.weight"), layer)  # trained
    assert {p.device.type for p in m.parameters()} == {"cpu"} and not m.training


def test_trainer_devices_are_checked():
    import torch

    from elms_gguf import model as M
    from elms_gguf import tlm_train as TT
    from elms_gguf.train_lora import TrainError, pick_device

    assert M.torch_device("cpu").type == "cpu"
    assert M.torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        M.torch_device("tpu")
    with pytest.raises(ValueError, match="'meta'"):
        M.torch_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            M.torch_device("cuda")
        with pytest.raises(TrainError, match="--device: .*no CUDA device"):
            pick_device("cuda:0")
        with pytest.raises(ValueError, match="no CUDA device"):
            TT.train(_tiny_encoder(), _tiny_windows(2), epochs=1, device="cuda")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (the GPU machine)")
def test_tlm_training_on_cuda_matches_training_on_the_cpu():
    """Same seed, same windows: the GPU run follows the CPU run (float32; SDPA and reductions differ in order)."""
    import torch

    from elms_gguf import tlm_train as TT

    wins, held = _tiny_windows(48), _tiny_windows(8, seed=7)
    runs = {}
    for dev in ("cpu", "cuda"):
        m = _tiny_encoder()
        losses = TT.train(m, wins, epochs=4, batch=8, lr=3e-3, head_lr=1e-2, device=dev)
        with torch.no_grad():
            runs[dev] = (losses, TT.word_logits(m, held)[0].numpy())
    np.testing.assert_allclose(runs["cuda"][0], runs["cpu"][0], rtol=1e-3)
    scale = np.abs(runs["cpu"][1]).max()
    assert np.abs(runs["cuda"][1] - runs["cpu"][1]).max() <= 1e-3 * scale


def test_train_tlm_evaluate_scores_held_out_windows_with_an_existing_tlm(tlm_pair, tiny_llama, tmp_path):
    """``elms-train-tlm --evaluate``: an existing TLM GGUF (run by llama.cpp) scored against a labels cache, on the
    same held-out split training would use; checked against the PyTorch TLM's own metrics on those windows."""
    import json
    import random

    import torch

    from elms_gguf import tlm_train as TT

    m, path = tlm_pair
    tok = TT.hf_tokenizer()
    wins = []
    for k in range(10):
        words = C.split_words(f"{CONTEXT} Example {k}: {QUESTION}")
        per_word = TT.word_ids(tok, words)
        ids = [TT.CLS_ID] + sum(per_word, []) + [TT.SEP_ID]
        owner = [i for i, t in enumerate(per_word) for _ in t]
        w = TT.Window(ids, owner, np.zeros(len(words)), np.zeros(len(words), dtype=np.float32))
        with torch.no_grad():
            own = TT.word_logits(m, [w])[0].numpy().astype(np.float64)
        # "self-information" that agrees with the TLM only partly, so the metrics are far from 0.5 and from 1
        si = own + np.random.default_rng(k).normal(0.0, own.std(), len(words))
        lab = np.zeros(len(words), dtype=np.float32)
        lab[np.argsort(-si, kind="stable")[: len(words) // 2]] = 1.0
        wins.append(TT.Window(ids, owner, si, lab))
    cache, rep = tmp_path / "wins.npz", tmp_path / "eval.json"
    TT.save_windows(str(cache), wins)
    assert TT.main(["--target", str(tiny_llama.path), "--labels-cache", str(cache), "--evaluate", str(path),
                    "--heldout", "0.5", "--report", str(rep)]) == 0
    ev = json.loads(rep.read_text())
    idx = list(range(len(wins)))
    random.Random(0).shuffle(idx)  # the split elms-train-tlm makes with --seed 0
    ref = TT.evaluate(m, [wins[i] for i in idx[:5]])
    assert ev["heldout"]["windows"] == 5 and ev["tlm_labels"] == "test"
    assert 0.6 < ref["auc"] < 0.99
    for key in ("auc", "spearman", "selfinfo_kept@0.5"):
        assert ev["heldout"][key] == pytest.approx(ref[key], abs=0.03), key
    assert abs(ev["heldout_random"]["auc"] - 0.5) < abs(ref["auc"] - 0.5)
    with pytest.raises(SystemExit):  # neither -o nor --evaluate
        TT.main(["--labels-cache", str(cache)])
