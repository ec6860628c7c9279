"""Word-level prompt compression (LLMLingua-shaped API) with pluggable word scorers.

The compressible part of a prompt (instruction, in-context examples: ``context``) is split into whitespace-separated
words; a scorer gives every word an importance score; the highest-scoring words are kept **in their original
order** until the token budget is reached; the ``question`` (or the last user turn) and the ``instruction`` are
never touched. Line structure survives: when words between two kept words are dropped, the widest whitespace
(the one with the most newlines) among them is kept.

Scorers (:class:`Scorer`: ``name`` and ``score(words) -> np.ndarray``, higher = keep):

* :class:`SelfInfoScorer` -- the TLM-free baseline (LLMLingua-1 / Selective-Context style): the target model's
  own self-information of each word given its left context, ``-log p(word | left)`` summed over the word's tokens,
  computed through llama.cpp with all logits of a window in one decode;
* :class:`elms_gguf.tlm.TLMScorer` -- the tiny encoder (truncated all-MiniLM-L6-v2 + keep/drop head) run by
  llama.cpp, trained to predict the target model's self-information labels.

    >>> pc = PromptCompressor(TLMScorer("tlm.gguf"), tokenizer=llm)             # doctest: +SKIP
    >>> pc.compress_prompt(examples, question="Q: ... A:", rate=0.5)             # doctest: +SKIP
    {'compressed_prompt': ..., 'origin_tokens': 812, 'compressed_tokens': 431, 'ratio': '1.9x', ...}
"""
from __future__ import annotations

import collections
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

Word = tuple[str, str]  # (leading whitespace, word)
_WORD_RE = re.compile(r"(\s*)(\S+)")


class CompressionError(ValueError):
    """Bad compression request (rate outside (0, 1], negative budget, nothing to compress ...)."""


def split_words(text: str) -> list[Word]:
    """``text`` as (leading whitespace, word) pairs; ``"".join(w + s for w, s in ...)`` + trailing space == text."""
    return [(m.group(1), m.group(2)) for m in _WORD_RE.finditer(text)]


def join_words(words: Sequence[Word]) -> str:
    return "".join(ws + w for ws, w in words)


class Scorer(Protocol):
    name: str

    def score(self, words: Sequence[Word]) -> np.ndarray:
        """One importance score per word (higher = keep)."""


Tokenizer = Union[Callable[[str], Sequence[int]], object]


def _token_counter(tokenizer: Tokenizer | None) -> Callable[[str], int]:
    """Text -> token count: a llama_cpp.Llama (its tokenizer, no BOS), a callable text -> ids, or words (None)."""
    if tokenizer is None:
        return lambda s: len(s.split())
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "n_vocab"):
        return lambda s: len(tokenizer.tokenize(s.encode("utf-8"), add_bos=False, special=False)) if s else 0  # type: ignore[attr-defined]
    if callable(tokenizer):
        return lambda s: len(tokenizer(s)) if s else 0  # type: ignore[operator]
    raise TypeError(f"tokenizer must be a llama_cpp.Llama or a callable text -> ids, got {type(tokenizer).__name__}")


# --------------------------------------------------------------------------------------------------
# selection


def select(scores: np.ndarray, costs: Sequence[int], budget: int, *, force: Sequence[bool] | None = None) -> np.ndarray:
    """Boolean keep-mask: forced words, then words in descending score order while they fit in ``budget`` tokens.

    Ties keep the earlier word (stable order). A word that does not fit is skipped and smaller ones may still fill
    the budget.
    """
    n = len(costs)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise CompressionError(f"{scores.shape[0] if scores.ndim else 0} scores for {n} words")
    keep = np.zeros(n, dtype=bool)
    used = 0
    if force is not None:
        for i in range(n):
            if force[i]:
                keep[i] = True
                used += int(costs[i])
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    for i in order:
        if keep[i]:
            continue
        c = int(costs[i])
        if used + c <= budget:
            keep[i] = True
            used += c
    return keep


def render(words: Sequence[Word], keep: Sequence[bool]) -> str:
    """The kept words in order; a dropped run is replaced by its widest whitespace (most newlines)."""
    out: list[str] = []
    gap: list[str] = []
    first = True
    for (ws, w), k in zip(words, keep):
        gap.append(ws)
        if not k:
            continue
        if first:
            sep = ws if len(gap) == 1 else ""
        elif len(gap) == 1:
            sep = ws
        else:
            sep = max(gap, key=lambda s: (s.count("\n"), s == ws))
            if not sep:
                sep = " "
        out.append(sep + w)
        gap = []
        first = False
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# the LLMLingua-shaped API


@dataclass
class _Cached:
    scores: np.ndarray
    ms: float
    costs: list[int] | None = None  # target tokens of every word (with its leading whitespace)
    pooled: np.ndarray | None = None  # the scorer's pooled hidden state (TLM), for the decision head


class PromptCompressor:
    """Compress prompts with one scorer, counting tokens with the target model's tokenizer; caches word scores.

    Args:
        scorer: a :class:`Scorer` (:class:`SelfInfoScorer`, :class:`elms_gguf.tlm.TLMScorer`, ...).
        tokenizer: a ``llama_cpp.Llama`` of the target model (or a callable text -> token ids): budgets, rates and
            counts are in its tokens. None counts words.
        cache_size: contexts whose word scores are kept (apps resend the same instruction and examples).
    """

    def __init__(self, scorer: Scorer, tokenizer: Tokenizer | None = None, *, cache_size: int = 64) -> None:
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.count = _token_counter(tokenizer)
        self.cache_size = int(cache_size)
        self._cache: "collections.OrderedDict[str, _Cached]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.last_scorer_ms = 0.0
        self.last_cache_hit = False

    # -- scores ----------------------------------------------------------------------------------------

    def _key(self, words: Sequence[Word]) -> str:
        h = hashlib.sha256(self.scorer.name.encode())
        for ws, w in words:
            h.update(ws.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
            h.update(w.encode("utf-8", "surrogatepass"))
            h.update(b"\x01")
        return h.hexdigest()

    def is_cached(self, context: str) -> bool:
        with self._lock:
            return self._key(split_words(context)) in self._cache

    def word_scores(self, words: Sequence[Word]) -> np.ndarray:
        """Scores of ``words`` (from the cache when this exact word sequence was scored before)."""
        key = self._key(words)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.last_scorer_ms, self.last_cache_hit = 0.0, True
                return hit.scores
        t0 = time.perf_counter()
        scores = np.asarray(self.scorer.score(words), dtype=np.float64)
        ms = (time.perf_counter() - t0) * 1e3
        if scores.shape != (len(words),):
            raise CompressionError(f"scorer {self.scorer.name} returned {scores.shape} scores for {len(words)} words")
        with self._lock:
            self._cache[key] = _Cached(scores, ms, pooled=getattr(self.scorer, "last_pooled", None))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self.last_scorer_ms, self.last_cache_hit = ms, False
        return scores

    def pooled(self, words: Sequence[Word]) -> np.ndarray | None:
        """The scorer's pooled hidden state of ``words`` (scoring them if not cached); None if it has none."""
        self.word_scores(words)
        with self._lock:
            hit = self._cache.get(self._key(words))
        return None if hit is None or hit.pooled is None else np.array(hit.pooled, copy=True)

    def _costs(self, words: Sequence[Word]) -> list[int]:
        """Target tokens of every word (cached with the scores)."""
        key = self._key(words)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit.costs is not None:
                return hit.costs
        costs = [self.count(ws + w) for ws, w in words]
        with self._lock:
            if key in self._cache:
                self._cache[key].costs = costs
        return costs

    def _fit(self, words: Sequence[Word], scores: np.ndarray, costs: Sequence[int], keep: np.ndarray, budget: int,
             force: Sequence[bool] | None) -> tuple[str, int]:
        """Render ``keep`` (updated in place) within ``budget`` tokens of the *rendered* text: (text, its tokens).

        Word costs are counted with each word's own leading whitespace, but a kept word after a dropped run takes
        that run's widest whitespace (a line break, say) and merges differently with its neighbours, so the
        rendered text can tokenize longer than the sum: drop the lowest-scoring unforced words until it fits.
        """
        text = render(words, keep)
        n = self.count(text)
        order = [int(i) for i in np.argsort(np.nan_to_num(scores, nan=-np.inf), kind="stable")]  # lowest first
        while n > budget:
            over, dropped = n - budget, 0
            for i in order:
                if keep[i] and not (force is not None and force[i]):
                    keep[i] = False
                    dropped += int(costs[i])
                    if dropped >= over:
                        break
            if dropped == 0:
                break  # only forced words left
            text = render(words, keep)
            n = self.count(text)
        return text, n

    # -- compression -----------------------------------------------------------------------------------

    def compress_prompt(
        self,
        context: str | Sequence[str],
        *,
        instruction: str = "",
        question: str = "",
        rate: float | None = None,
        target_tokens: int | None = None,
        target_token: int | None = None,
        force_tokens: Iterable[str] = (),
        context_separator: str = "\n\n",
        separator: str = "\n\n",
    ) -> dict[str, object]:
        """Compress ``context`` to ``rate`` of its tokens (or to ``target_tokens`` tokens); never ``question``.

        Args:
            context: the compressible text, or a list of texts (joined by ``context_separator``).
            instruction: text put first and never compressed (LLMLingua semantics; put an instruction into
                ``context`` to have it compressed, as ELMS does).
            question: text put last and never compressed.
            rate: fraction of the context's tokens to keep, in (0, 1].
            target_tokens: context tokens to keep (``target_token``, LLMLingua's name, is accepted too).
            force_tokens: words containing any of these strings are always kept.

        Returns the LLMLingua dict: ``compressed_prompt`` (instruction, compressed context and question joined by
        ``separator``), ``origin_tokens`` / ``compressed_tokens`` (whole prompt), ``ratio`` (``"2.0x"``),
        ``rate`` (``"50.0%"``), ``saving`` (``"120 tokens"``), plus ``compressed_context``, ``context_tokens``,
        ``compressed_context_tokens``, ``kept_words`` / ``words``, ``scorer``, ``scorer_ms``, ``cache_hit``.
        """
        if target_token is not None:
            if target_tokens is not None:
                raise CompressionError("give target_tokens or target_token, not both")
            target_tokens = target_token
        if not isinstance(context, str):
            context = context_separator.join(str(c) for c in context)
        if (rate is None) == (target_tokens is None):
            raise CompressionError("give exactly one of rate= or target_tokens=")
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 < float(rate) <= 1.0):
                raise CompressionError(f"rate must be in (0, 1], got {rate!r}")
        else:
            if isinstance(target_tokens, bool) or not isinstance(target_tokens, (int, np.integer)) or target_tokens < 0:
                raise CompressionError(f"target_tokens must be a non-negative integer, got {target_tokens!r}")
        words = split_words(context)
        ctx_tokens = self.count(context)
        budget = int(round(float(rate) * ctx_tokens)) if rate is not None else int(target_tokens)  # type: ignore[arg-type]
        scorer_ms, hit = 0.0, False
        kept = len(words)
        if not words or budget >= ctx_tokens:
            compressed_ctx, ctx_out = context, ctx_tokens
        else:
            scores = self.word_scores(words)
            scorer_ms, hit = self.last_scorer_ms, self.last_cache_hit
            costs = self._costs(words)
            forced = tuple(force_tokens)
            force = [any(t in w for t in forced) for _, w in words] if forced else None
            keep = select(scores, costs, budget, force=force)
            compressed_ctx, ctx_out = self._fit(words, scores, costs, keep, budget, force)
            kept = int(keep.sum())
        parts_in = [p for p in (instruction, context, question) if p]
        parts_out = [p for p in (instruction, compressed_ctx, question) if p]
        prompt_in, prompt_out = separator.join(parts_in), separator.join(parts_out)
        origin, compressed = self.count(prompt_in), self.count(prompt_out)
        return {
            "compressed_prompt": prompt_out,
            "origin_tokens": origin,
            "compressed_tokens": compressed,
            "ratio": f"{origin / max(compressed, 1):.1f}x",
            "rate": f"{100.0 * compressed / max(origin, 1):.1f}%",
            "saving": f"{origin - compressed} tokens",
            "compressed_context": compressed_ctx,
            "context_tokens": ctx_tokens,
            "compressed_context_tokens": ctx_out,
            "words": len(words),
            "kept_words": kept,
            "scorer": self.scorer.name,
            "scorer_ms": scorer_ms,
            "cache_hit": hit,
        }


def compress_prompt(context: str | Sequence[str], *, scorer: Scorer, tokenizer: Tokenizer | None = None,
                    **kwargs: object) -> dict[str, object]:
    """One-shot :meth:`PromptCompressor.compress_prompt` (no score cache across calls)."""
    return PromptCompressor(scorer, tokenizer).compress_prompt(context, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# the TLM-free baseline scorer


def word_token_ids(tokenize: Callable[[str], Sequence[int]], words: Sequence[Word], *,
                   strip: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of every word tokenized on its own (with its leading whitespace unless ``strip``) and the word
    index of every token. Concatenated, they are a tokenization of the text whose word boundaries are exact."""
    ids: list[int] = []
    owner: list[int] = []
    for i, (ws, w) in enumerate(words):
        t = list(tokenize(w if strip else ws + w))
        ids += t
        owner += [i] * len(t)
    return ids, owner


def _log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log_softmax(logits)[i, targets[i]]`` row by row, in float64 for the normaliser."""
    m = logits.max(axis=1, keepdims=True)
    z = np.log(np.exp((logits - m).astype(np.float64)).sum(axis=1)) + m[:, 0]
    return logits[np.arange(len(targets)), targets].astype(np.float64) - z


class SelfInfoScorer:
    """The target model's self-information of each word given its left context (the TLM-free baseline).

    ``score(words)[i] = -sum_t log p(t | tokens before t)`` over word i's tokens, computed in windows of up to
    ``window`` tokens (each starting with BOS), all logits of a window in one llama.cpp decode. ``llm`` is any
    ``llama_cpp.Llama`` (an :class:`~elms_gguf.runtime.ElasticLlama` is switched to ``level`` for the scoring and
    back); its KV cache is cleared before and after.
    """

    def __init__(self, llm: object, *, level: int | None = None, window: int | None = None) -> None:
        self.llm = llm
        self.level = level
        n_batch = int(getattr(llm, "n_batch", 512))
        n_ctx = int(llm.n_ctx())  # type: ignore[attr-defined]
        self.window = int(window or min(n_batch, n_ctx, 512))
        if self.window < 8 or self.window > min(n_batch, n_ctx):
            raise ValueError(f"window {self.window} must be in [8, min(n_batch, n_ctx) = {min(n_batch, n_ctx)}]")
        self.name = "selfinfo" if level is None else f"selfinfo@L{level}"

    def _tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)  # type: ignore[attr-defined]

    def token_surprisal(self, ids: Sequence[int]) -> np.ndarray:
        """``-log p(ids[i] | BOS, window-local left context)`` of every token, in nats. Holds an
        :class:`~elms_gguf.runtime.ElasticLlama` for the whole scoring (level switch, decodes, switch back)."""
        exclusive = getattr(self.llm, "exclusive", None)
        if exclusive is not None:
            with exclusive():
                return self._token_surprisal(ids)
        return self._token_surprisal(ids)

    def _token_surprisal(self, ids: Sequence[int]) -> np.ndarray:
        import llama_cpp

        llm = self.llm
        bos = int(llama_cpp.llama_vocab_bos(llama_cpp.llama_model_get_vocab(llm._model.model)))  # type: ignore[attr-defined]
        n_vocab = int(llm.n_vocab())  # type: ignore[attr-defined]
        out = np.zeros(len(ids), dtype=np.float64)
        step = self.window - 1
        before = getattr(llm, "level", None)
        switch = self.level is not None and hasattr(llm, "set_level")
        try:
            if switch:
                llm.set_level(self.level)  # type: ignore[attr-defined]
            for s in range(0, len(ids), step):
                chunk = list(ids[s:s + step])
                seq = ([bos] if bos >= 0 else []) + chunk
                off = len(seq) - len(chunk)
                _clear_kv(llm)
                llm._batch.set_batch(seq, n_past=0, logits_all=True)  # type: ignore[attr-defined]
                llm._ctx.decode(llm._batch)  # type: ignore[attr-defined]
                ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)  # type: ignore[attr-defined]
                logits = np.ctypeslib.as_array(ptr, shape=(len(seq), n_vocab))
                if off == 0:  # no BOS: the first token has no context; give it the mean surprisal later
                    lp = _log_softmax_pick(logits[:-1], np.asarray(chunk[1:]))
                    out[s + 1:s + len(chunk)] = -lp
                    out[s] = np.nan
                else:
                    lp = _log_softmax_pick(logits[off - 1:-1], np.asarray(chunk))
                    out[s:s + len(chunk)] = -lp
        finally:
            _clear_kv(llm)
            if switch:
                llm.set_level(before)  # type: ignore[attr-defined]
        if np.isnan(out).any():
            out[np.isnan(out)] = np.nanmean(out) if np.isfinite(out).any() else 0.0
        return out

    def score(self, words: Sequence[Word]) -> np.ndarray:
        ids, owner = word_token_ids(self._tokenize, words)
        if not ids:
            return np.zeros(len(words))
        tok = self.token_surprisal(ids)
        return np.bincount(np.asarray(owner), weights=tok, minlength=len(words)).astype(np.float64)


def smallest_level(llm: object) -> int:
    """The smallest level of an :class:`~elms_gguf.runtime.ElasticLlama` (-1 for a dense model): where the
    self-information baseline scores by default (a small LM scoring for a large one, as in LLMLingua)."""
    return int(min(llm.levels, key=lambda li: (li.ratio, li.index == -1)).index)  # type: ignore[attr-defined]


def _clear_kv(llm: object) -> None:
    import llama_cpp

    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)  # type: ignore[attr-defined]
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)
    llm.reset()  # type: ignore[attr-defined]  (llama-cpp-python's prefix reuse must not see this state)


def scorer_timer(scorer: Scorer, llm: object, words: Sequence[Word]) -> Callable[[int], float]:
    """A function n -> milliseconds that ``scorer`` takes over the first words of ``words`` worth ``n`` target
    tokens (counted with ``llm``'s tokenizer); used by :func:`elms_gguf.profile.measure`."""
    count = _token_counter(llm)
    cum = np.cumsum([count(ws + w) for ws, w in words])

    def run(n: int) -> float:
        k = int(np.searchsorted(cum, n)) + 1
        sub = list(words[:k])
        t0 = time.perf_counter()
        scorer.score(sub)
        return (time.perf_counter() - t0) * 1e3

    if cum.size == 0:
        raise CompressionError("no words to time the scorer on")
    return run


__all__ = [
    "PromptCompressor", "compress_prompt", "CompressionError", "Scorer", "SelfInfoScorer", "split_words",
    "join_words", "select", "render", "word_token_ids", "scorer_timer", "smallest_level",
]
