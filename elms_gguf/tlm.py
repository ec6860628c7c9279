"""The TLM (tiny language model) prompt scorer, run by llama.cpp: a truncated all-MiniLM-L6-v2 encoder plus a
per-token keep/drop head.

The TLM is one GGUF: a standard llama.cpp ``bert`` model (written by llama.cpp's own ``convert_hf_to_gguf.py``,
f16) plus the head as extra keys that llama.cpp ignores:

=================================  ==========  =========================================================
key                                type        meaning
=================================  ==========  =========================================================
``elms.tlm.version``               uint32      1
``elms.tlm.score_head.weight``     float32[d]  keep logit of a token = h . weight + bias (h: last hidden state)
``elms.tlm.score_head.bias``       float32     (d = ``bert.embedding_length``)
``elms.tlm.word_pooling``          string      how token logits become a word score: ``mean``
``elms.tlm.labels``                string      what the head was trained to predict (informational)
``elms.tlm.target_model_id``       string      the target model whose self-information made the labels
``elms.tlm.target_checksum``       string      its :func:`elms_gguf.profile.model_fingerprint` checksum
``elms.tlm.decision.*``            (several)   optional: the decision head (:mod:`elms_gguf.decision`)
=================================  ==========  =========================================================

:class:`TLMScorer` runs the encoder with ``llama_cpp.Llama(path, embedding=True, pooling_type=NONE)`` on windows
of at most 512 WordPiece tokens (``[CLS] words [SEP]``, whole words per window), applies the head in numpy and
averages the token logits of each word. Every word is tokenized on its own, so word boundaries are exact (BERT's
basic tokenizer splits on whitespace and punctuation first, so this is the same tokenization as the whole text).
Training and export: :mod:`elms_gguf.tlm_train` (``elms-train-tlm``).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

TLM_VERSION = 1
KEY_VERSION = "elms.tlm.version"
KEY_HEAD_W = "elms.tlm.score_head.weight"
KEY_HEAD_B = "elms.tlm.score_head.bias"
KEY_POOLING = "elms.tlm.word_pooling"
KEY_LABELS = "elms.tlm.labels"
KEY_TARGET_ID = "elms.tlm.target_model_id"
KEY_TARGET_CHECKSUM = "elms.tlm.target_checksum"

MAX_POSITIONS = 512


class TLMError(ValueError):
    """Not a TLM GGUF, or a malformed one."""


def read_head(path: str | os.PathLike[str]) -> dict[str, object]:
    """The head and ``elms.tlm.*`` metadata of a TLM GGUF (no tensors are read)."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TLMError(f"TLM file not found: {path}")
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:
        raise TLMError(f"{path}: not a GGUF ({e})") from None
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("elms.tlm.") or k in (
        "general.architecture", "bert.embedding_length", "bert.block_count")}
    if KEY_HEAD_W not in f:
        raise TLMError(f"{path}: not an elms TLM (no {KEY_HEAD_W}); build one with elms-train-tlm")
    if int(f.get(KEY_VERSION, 0)) != TLM_VERSION:
        raise TLMError(f"{path}: {KEY_VERSION} = {f.get(KEY_VERSION)}, this elms-gguf reads {TLM_VERSION}")
    arch = f.get("general.architecture")
    if arch != "bert":
        raise TLMError(f"{path}: architecture {arch!r}, a TLM is a 'bert' GGUF")
    w = np.asarray(f[KEY_HEAD_W], dtype=np.float32)
    d = int(f.get("bert.embedding_length", w.size))
    if w.shape != (d,):
        raise TLMError(f"{path}: {KEY_HEAD_W} has {w.size} values, expected bert.embedding_length = {d}")
    pooling = str(f.get(KEY_POOLING, "mean"))
    if pooling not in ("mean", "max"):
        raise TLMError(f"{path}: unknown {KEY_POOLING} {pooling!r}")
    return {"weight": w, "bias": float(f.get(KEY_HEAD_B, 0.0)), "pooling": pooling,
            "labels": str(f.get(KEY_LABELS, "")), "target_model_id": str(f.get(KEY_TARGET_ID, "")),
            "target_checksum": str(f.get(KEY_TARGET_CHECKSUM, "")), "n_layer": int(f.get("bert.block_count", 0)),
            "n_embd": d}


def copy_with_keys(src: str | os.PathLike[str], dst: str | os.PathLike[str], extra: Sequence[tuple], *,
                   drop_prefix: str | None = None) -> None:
    """Copy the GGUF ``src`` to ``dst``: every key (but ``GGUF.*``, empty arrays and, if given, keys under
    ``drop_prefix``) and every tensor byte for byte, then the ``extra`` keys ``(key, value, type, sub_type)``.
    Writes ``dst`` directly: callers that need atomicity pass a temporary path."""
    import gguf

    VT = gguf.GGUFValueType
    r = gguf.GGUFReader(os.fspath(src))
    w = gguf.GGUFWriter(os.fspath(dst), arch=str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or (drop_prefix and name.startswith(drop_prefix)):
            continue
        main, val = f.types[0], f.contents()
        if main == VT.ARRAY and len(val) == 0:
            continue
        w.add_key_value(name, val, main, sub_type=f.types[-1] if main == VT.ARRAY else None)
    for key, value, main, sub in extra:
        w.add_key_value(key, value, main, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def pool_words(token_logits: np.ndarray, owner: Sequence[int], n_words: int, how: str = "mean") -> np.ndarray:
    """Word scores from token logits (``owner[i]`` = word of token i); words without tokens get the mean."""
    owner = np.asarray(owner, dtype=np.int64)
    out = np.full(n_words, np.nan)
    if owner.size:
        if how == "mean":
            s = np.bincount(owner, weights=token_logits, minlength=n_words)
            c = np.bincount(owner, minlength=n_words)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.where(c > 0, s / np.maximum(c, 1), np.nan)
        else:
            out = np.full(n_words, -np.inf)
            np.maximum.at(out, owner, token_logits)
            out[np.isneginf(out)] = np.nan
    if np.isnan(out).any():
        out[np.isnan(out)] = np.nanmean(out) if np.isfinite(out).any() else 0.0
    return out


def windows(owner_counts: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
    """Split words (with ``owner_counts[i]`` tokens each) into [start, end) word ranges of <= max_tokens tokens;
    a word longer than the window gets a window of its own (and is truncated by the caller)."""
    out, start, used = [], 0, 0
    for i, c in enumerate(owner_counts):
        if used + c > max_tokens and i > start:
            out.append((start, i))
            start, used = i, 0
        used += c
    if start < len(owner_counts):
        out.append((start, len(owner_counts)))
    return out


class TLMScorer:
    """Score words with a TLM GGUF through llama.cpp (see the module docstring).

    Args:
        path: the TLM GGUF (``elms-train-tlm`` output).
        n_threads: llama.cpp threads (prefill and decode); default llama-cpp-python's.
    """

    def __init__(self, path: str | os.PathLike[str], *, n_threads: int | None = None, verbose: bool = False) -> None:
        from .runtime import llama_cpp  # the patched libllama, loaded once for the whole process

        self.path = os.fspath(path)
        self.head = read_head(self.path)
        self.weight: np.ndarray = self.head["weight"]  # type: ignore[assignment]
        self.bias: float = self.head["bias"]  # type: ignore[assignment]
        kw: dict[str, object] = dict(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                                     n_ctx=MAX_POSITIONS, n_batch=MAX_POSITIONS, n_ubatch=MAX_POSITIONS,
                                     verbose=verbose)
        if n_threads is not None:
            kw["n_threads"] = kw["n_threads_batch"] = int(n_threads)
        self.llm = llama_cpp.Llama(self.path, **kw)
        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.cls_id = int(llama_cpp.llama_vocab_bos(vocab))
        self.sep_id = int(llama_cpp.llama_vocab_sep(vocab))
        if self.sep_id < 0:
            self.sep_id = int(llama_cpp.llama_vocab_eos(vocab))
        self.n_embd = int(self.llm.n_embd())
        if self.n_embd != self.weight.size:
            raise TLMError(f"{self.path}: head has {self.weight.size} inputs, the encoder {self.n_embd} outputs")
        from .profile import model_fingerprint

        self.checksum = str(model_fingerprint(self.path)["checksum"])
        self.name = f"tlm:{self.checksum[:12]}"
        self.last_pooled: np.ndarray = np.zeros(self.n_embd)
        from .decision import read_head as read_decision_head

        self.decision_head = read_decision_head(self.path)  # None when the TLM has none

    def tokenize_word(self, word: str) -> list[int]:
        return self.llm.tokenize(word.encode("utf-8"), add_bos=False, special=False)

    def hidden(self, ids: Sequence[int]) -> np.ndarray:
        """Last hidden states [n, n_embd] of one sequence of token ids (specials included by the caller)."""
        from .runtime import llama_cpp

        n = len(ids)
        if not 0 < n <= MAX_POSITIONS:
            raise TLMError(f"a TLM window holds 1..{MAX_POSITIONS} tokens, got {n}")
        llm = self.llm
        llm._ctx.kv_cache_clear()
        llm._batch.reset()
        llm._batch.add_sequence(list(ids), 0, True)
        llm._ctx.decode(llm._batch)
        llm._batch.reset()
        ptr = llama_cpp.llama_get_embeddings(llm._ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_embd)).copy()

    def token_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Keep logits of every token of one window (``[CLS] ... [SEP]`` included)."""
        return self.hidden(ids) @ self.weight + self.bias

    def encode_words(self, words: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Per-word token ids and the word windows (each fits ``[CLS] ... [SEP]`` in 512 positions)."""
        per_word = [self.tokenize_word(w) for _, w in words]
        return per_word, windows([len(t) for t in per_word], MAX_POSITIONS - 2)

    def score(self, words: Sequence[tuple[str, str]]) -> np.ndarray:
        """Keep score of every word (mean token logit; higher = keep). Also leaves the mean hidden state over the
        words' tokens in ``last_pooled`` (the input of the decision head, :mod:`elms_gguf.decision`)."""
        per_word, wins = self.encode_words(words)
        out = np.zeros(len(words))
        pooled_sum, pooled_n = np.zeros(self.n_embd), 0
        for s, e in wins:
            ids: list[int] = []
            owner: list[int] = []
            for i in range(s, e):
                t = per_word[i][: MAX_POSITIONS - 2 - len(ids)]
                ids += t
                owner += [i - s] * len(t)
            if not ids:
                out[s:e] = 0.0
                continue
            h = self.hidden([self.cls_id] + ids + [self.sep_id])[1:-1]
            pooled_sum += h.sum(0)
            pooled_n += len(h)
            logits = h @ self.weight + self.bias
            out[s:e] = pool_words(logits, owner, e - s, str(self.head["pooling"]))
        self.last_pooled = pooled_sum / max(1, pooled_n)
        return out


    def close(self) -> None:
        self.llm.close()


__all__ = ["TLMScorer", "TLMError", "read_head", "copy_with_keys", "pool_words", "windows", "TLM_VERSION", "KEY_VERSION",
           "KEY_HEAD_W", "KEY_HEAD_B", "KEY_POOLING", "KEY_LABELS", "KEY_TARGET_ID", "KEY_TARGET_CHECKSUM"]
