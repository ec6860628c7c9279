"""SLO-driven serving: :class:`ElasticLlama` with a latency profile and a prompt scorer picks, per request, the
level and the prompt compression that meet a TTFT/TPOT objective (the ELMS orchestration).

    >>> from elms_gguf.serve import ElasticLlama, SLO                                       # doctest: +SKIP
    >>> llm = ElasticLlama("smollm2-elastic.gguf", tlm="tlm-minilm-l1.gguf", profile="auto",
    ...                    n_threads=1, n_threads_batch=1, n_ctx=2048)
    >>> out = llm.create_completion(prompt="Question: ...\\nAnswer:", context=instruction_and_examples,
    ...                             slo=SLO.relative(0.6, 0.8), max_tokens=32)
    >>> out["choices"][0]["text"], out["elms"]["level"], out["elms"]["prompt_ratio"]

Per request: count the tokens of the fixed part (``prompt``; in chat, the last user turn and the template) and of
the compressible part (``context``; in chat, every other message), resolve the SLO (relative SLOs against the
dense model at the full prompt length), :func:`~elms_gguf.orchestrate.decide` (level, prompt ratio), compress the
context with the scorer if needed (word scores are cached per context: apps resend the same instruction and
examples, and a cached context costs no scorer time in the decision either), switch level (a pointer change),
prefill from an empty KV cache and generate. The response is llama-cpp-python's OpenAI-shaped dict plus an
``elms`` block: level, prompt ratio, predicted and measured TTFT/TPOT, scorer (TLM) time, SLO met or not. With
``stream=True`` the chunks come as llama-cpp-python streams them (the decision and compression are made at the
call, the level is switched when the stream is first read), and the chunk carrying ``finish_reason`` also carries
the ``elms`` block; its measured TTFT counts from the call, so read the stream at once.

This class is the runtime's :class:`elms_gguf.runtime.ElasticLlama` plus keyword-only ``tlm=``, ``profile=``,
``scorer=``; without ``slo=``/``context=`` every valid call behaves exactly like the runtime class.

Arguments are checked at the call, with errors naming the argument: ``best_effort`` must be a bool; ``slo`` must be
what :meth:`SLO.coerce` accepts (a dict with unknown or missing keys, or a limit that is not a positive number, is an
:class:`~elms_gguf.profile.SLOError`, a ValueError); ``max_tokens`` must be an int or None, and with ``slo=`` (or
``decision=``) a positive int or None -- None keeps llama-cpp-python's meaning (generate until EOS or the context is
full; the plan then uses the profile's steady-state TPOT), while 0 and negative values, which llama-cpp-python also
reads as "until the context is full", are refused there, being almost always a mistake; chat ``messages`` must be
OpenAI-shaped (a non-empty list of dicts, ``role`` in :data:`CHAT_ROLES`, ``content`` a string or a list of content
parts; None only in an assistant message with ``tool_calls``).

An instance may be shared between threads: each request (decision, compression, level switch and generation) holds
the model from start to end, a stream until it is read to its end or closed (see the runtime class).
"""
from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import compress as C
from . import orchestrate as O
from . import profile as P
from .profile import SLO, LatencyProfile, ProfileError, TokenClock
from .runtime import ElasticLlama as _RuntimeElasticLlama
from .runtime import holds_context, llama_cpp

#: TLM files ``demo_slo`` looks for next to the model, in this order (elms-train-tlm's default is 1 layer)
DEFAULT_TLM_NAMES = ("tlm-minilm-l1.gguf", "tlm-minilm-l2.gguf")

log = logging.getLogger(__name__)

__all__ = ["ElasticLlama", "SLO", "demo_slo", "CHAT_ROLES"]

#: the message roles a chat request may carry (OpenAI's chat format, as llama-cpp-python types it)
CHAT_ROLES = ("system", "user", "assistant", "tool", "function")


def _n_intervals(max_tokens: object) -> int | None:
    """Token intervals a request's TPOT is measured over (``max_tokens - 1``); None when unbounded or < 2 tokens."""
    return int(max_tokens) - 1 if isinstance(max_tokens, int) and max_tokens > 1 else None  # type: ignore[operator]


def _check_best_effort(value: object, *, per_request: bool = False) -> bool | None:
    """``best_effort`` as given: a bool (or None per request: the instance's choice); anything else a TypeError."""
    if isinstance(value, bool) or (per_request and value is None):
        return value  # type: ignore[return-value]
    allowed = "True, False or None (the instance's setting)" if per_request else "True or False"
    raise TypeError(f"best_effort must be {allowed}, got {value!r} ({type(value).__name__})")


def _check_max_tokens(kwargs: dict[str, Any], *, slo: bool) -> None:
    """Check ``kwargs['max_tokens']`` (if given) and store it as an int: an int or None; with an SLO a positive int
    or None (None: until EOS or the context is full, as llama-cpp-python; 0 and negative mean the same there but
    are refused here, see the module docstring)."""
    if "max_tokens" not in kwargs or kwargs["max_tokens"] is None:
        return
    value = kwargs["max_tokens"]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"max_tokens must be an int or None, got {value!r} ({type(value).__name__})")
    if slo and value <= 0:
        raise ValueError(f"max_tokens must be a positive int with slo= or decision=, got {value} (llama-cpp-python "
                         f"reads <= 0 as 'until the context is full'; pass None to mean that)")
    kwargs["max_tokens"] = int(value)


def _check_messages(messages: object) -> None:
    """Refuse chat messages that are not OpenAI-shaped, naming the message and the field (see the module docstring)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                        f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat request needs at least one message")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', got {m!r}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}['role'] must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None:
            if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
                continue  # OpenAI: an assistant turn that only calls tools has no content
            state = "missing" if "content" not in m else "None"
            raise ValueError(f"{where}['content'] is {state}: it must be a string or a list of content parts")
        if isinstance(content, str):
            continue
        if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
            raise ValueError(f"{where}['content'] must be a string or a list of content parts, got "
                             f"{type(content).__name__}")
        for j, part in enumerate(content):
            pw = f"{where}['content'][{j}]"
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise ValueError(f"{pw} must be a content part, a dict with a 'type' (e.g. "
                                 f"{{'type': 'text', 'text': ...}}), got {part!r}")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{pw}['text'] must be a string, got {part.get('text')!r}")


def _n_threads_kwargs(kwargs: Mapping[str, Any]) -> None:
    if "n_threads" in kwargs and "n_threads_batch" not in kwargs:
        # llama-cpp-python prefills with all CPUs unless told otherwise; a profile's thread counts must hold
        kwargs["n_threads_batch"] = kwargs["n_threads"]  # type: ignore[index]


class ElasticLlama(_RuntimeElasticLlama):
    """:class:`elms_gguf.runtime.ElasticLlama` that serves requests under a latency SLO.

    Args (keyword-only, on top of the runtime class's):
        tlm: a TLM GGUF path (``elms-train-tlm``) or a :class:`~elms_gguf.tlm.TLMScorer`: the prompt scorer.
        scorer: ``"tlm"`` (default when ``tlm`` is given), ``"selfinfo"`` (the TLM-free baseline: the model's own
            self-information at its smallest level), ``None`` (never compress) or any
            :class:`~elms_gguf.compress.Scorer`.
        profile: a :class:`~elms_gguf.profile.LatencyProfile`, a JSON path, ``"auto"`` (the saved profile of this
            model, CPU and thread counts, if any; default) or None. A profile of another model is refused.
        min_prompt_ratio: never keep less than this fraction of the compressible tokens (default 0.2).
        best_effort: when no (level, ratio) meets the SLO, serve the least-bad one (True) or raise
            :class:`~elms_gguf.orchestrate.SLOInfeasible` (False, default); per request too. A bool.
        headroom: plan against ``(1 - headroom)`` x the SLO, a fixed margin for latency noise (default 0).
        slo_quantile: plan so that about this share of requests meets its SLO (default 0.95): predictions are
            multiplied by that quantile of measured/predicted latency (:class:`~elms_gguf.profile.LatencyCalibration`:
            the profile's own spread at first, then the last requests served). None plans on the profile's medians.
        score_cache: contexts whose word scores are cached (default 64).
        decision_head: ``"auto"`` (default: the TLM's decision head when it has one, :mod:`elms_gguf.decision`,
            guarded by the profile), ``"rule"`` (always the profile rule, :func:`elms_gguf.orchestrate.decide`)
            or ``"head"`` (require a TLM with a decision head).
    """

    def __init__(
        self,
        model_path: str,
        *,
        tlm: object | None = None,
        scorer: object | str | None = "auto",
        profile: LatencyProfile | str | os.PathLike[str] | None = "auto",
        min_prompt_ratio: float = O.DEFAULT_MIN_PROMPT_RATIO,
        best_effort: bool = False,
        headroom: float = 0.0,
        slo_quantile: float | None = 0.95,
        score_cache: int = 64,
        decision_head: str = "auto",
        **kwargs: Any,
    ) -> None:
        _n_threads_kwargs(kwargs)
        super().__init__(model_path, **kwargs)
        try:
            _check_best_effort(best_effort)
            if not (0.0 <= float(headroom) < 1.0):
                raise ValueError(f"headroom must be in [0, 1), got {headroom}")
            if slo_quantile is not None and not (0.0 < float(slo_quantile) < 1.0):
                raise ValueError(f"slo_quantile must be in (0, 1) or None, got {slo_quantile!r}")
            O.ratio_grid(float(min_prompt_ratio))  # validates
        except (TypeError, ValueError):
            self.close()
            raise
        self.min_prompt_ratio = float(min_prompt_ratio)
        self.best_effort = best_effort
        self.headroom = float(headroom)
        self.slo_quantile = None if slo_quantile is None else float(slo_quantile)
        self.calibration: P.LatencyCalibration | None = None
        self._fingerprint = P.model_fingerprint(model_path)
        self.profile = self._load_profile(profile)
        self.tlm = None
        if tlm is not None:
            from .tlm import TLMScorer

            self.tlm = tlm if isinstance(tlm, TLMScorer) else TLMScorer(os.fspath(tlm), n_threads=self.n_threads)  # type: ignore[arg-type]
        if scorer == "auto":
            scorer = "tlm" if self.tlm is not None else None
        if scorer == "tlm":
            if self.tlm is None:
                raise ValueError("scorer='tlm' needs tlm= (a TLM GGUF from elms-train-tlm)")
            scorer_obj: object | None = self.tlm
        elif scorer == "selfinfo":
            scorer_obj = C.SelfInfoScorer(self, level=C.smallest_level(self))
        elif scorer is None or hasattr(scorer, "score"):
            scorer_obj = scorer
        else:
            raise ValueError(f"scorer must be 'tlm', 'selfinfo', None or a Scorer, got {scorer!r}")
        self.scorer = scorer_obj
        self.compressor = C.PromptCompressor(scorer_obj, tokenizer=self, cache_size=score_cache) if scorer_obj else None  # type: ignore[arg-type]
        if self.profile is not None and self.scorer is not None and self.scorer.name not in self.profile.scorers:  # type: ignore[attr-defined]
            self.profile_scorer()
        if decision_head not in ("auto", "rule", "head"):
            raise ValueError(f"decision_head must be 'auto', 'rule' or 'head', got {decision_head!r}")
        head = getattr(self.scorer, "decision_head", None) if self.scorer is self.tlm else None
        mine = str(self._fingerprint.get("model_id") or "")
        if head is not None and head.target_model_id and mine and head.target_model_id != mine:
            msg = (f"the TLM's decision head was trained for model '{head.target_model_id}', not for {model_path} "
                   f"('{mine}')")
            if decision_head == "head":
                raise ValueError(msg)
            log.warning("%s: deciding with the profile rule instead", msg)
            head = None
        if decision_head == "head" and head is None:
            raise ValueError("decision_head='head' needs tlm= with a decision head (elms-train-decision) as the scorer")
        self.decision_head = head if decision_head != "rule" else None

    # -- profile ------------------------------------------------------------------------------------------

    @property
    def profile(self) -> LatencyProfile | None:
        return self._profile

    @profile.setter
    def profile(self, value: LatencyProfile | None) -> None:
        """A new profile restarts the calibration from that profile's own spread."""
        self._profile = value
        self.calibration = (P.LatencyCalibration.from_profile(value, quantile=self.slo_quantile)
                            if value is not None and self.slo_quantile is not None else None)

    def _margin(self) -> tuple[float, float]:
        return self.calibration.margins() if self.calibration is not None else (1.0, 1.0)

    def _observe(self, d: O.Decision, ttft_ms: float | None, tpot_ms: float | None) -> None:
        """Feed one served request's measured latencies to the calibration (whatever decided it)."""
        if self.calibration is not None:
            self.calibration.observe(predicted_ttft_ms=d.predicted_ttft_ms, measured_ttft_ms=ttft_ms,
                                     predicted_tpot_ms=d.predicted_tpot_ms, measured_tpot_ms=tpot_ms)

    def _load_profile(self, profile: object) -> LatencyProfile | None:
        if profile is None:
            return None
        if isinstance(profile, str) and profile == "auto":
            path = P.default_profile_path(self.model_path, self.n_threads, self.n_threads_batch,
                                          fingerprint=self._fingerprint)
            if not os.path.exists(path):
                log.info("no saved latency profile for %s with %d/%d threads (%s): SLO requests need one "
                         "(elms-profile, or llm.measure_profile())", self.model_path, self.n_threads,
                         self.n_threads_batch, path)
                return None
            profile = path
        if isinstance(profile, (str, os.PathLike)):
            profile = LatencyProfile.load(profile)
        if not isinstance(profile, LatencyProfile):
            raise ProfileError(f"profile must be a LatencyProfile, a JSON path, 'auto' or None, got {profile!r}")
        profile.check_model(fingerprint=self._fingerprint, n_threads=self.n_threads,
                            n_threads_batch=self.n_threads_batch)
        return profile

    @holds_context
    def measure_profile(self, *, save: bool = True, **kwargs: Any) -> LatencyProfile:
        """Measure this model's profile on this instance (:func:`elms_gguf.profile.measure`), use it, save it
        under the default key. Also times the scorer."""
        scorers = {}
        if self.scorer is not None:
            words = C.split_words(P._FILLER * (1 + max(kwargs.get("lengths", P.DEFAULT_LENGTHS)) // 20))
            scorers[self.scorer.name] = C.scorer_timer(self.scorer, self, words)  # type: ignore[attr-defined]
        prof = P.measure(self.model_path, llm=self, scorers=scorers, **kwargs)
        if save:
            prof.save(P.default_profile_path(self.model_path, self.n_threads, self.n_threads_batch,
                                             fingerprint=self._fingerprint))
        self.profile = prof
        return prof

    @holds_context
    def profile_scorer(self, lengths: Sequence[int] | None = None, runs: int = 1) -> None:
        """Time the scorer at the profile's prompt lengths and add its curve to the (in-memory) profile."""
        assert self.profile is not None and self.scorer is not None
        lengths = lengths or [int(n) for n in self.profile.meta.get("lengths", P.DEFAULT_LENGTHS)]  # type: ignore[union-attr]
        words = C.split_words(P._FILLER * (1 + max(lengths) // 20))
        fn = C.scorer_timer(self.scorer, self, words)  # type: ignore[arg-type]
        fn(lengths[0])  # warm-up
        samples = [(n, float(np.median([fn(n) for _ in range(runs)]))) for n in lengths]
        self.profile.scorers[self.scorer.name] = P.Curve.fit(samples)  # type: ignore[attr-defined]
        log.info("timed scorer %s: %s", self.scorer.name, ", ".join(f"{ms:.1f} ms@{n}" for n, ms in samples))  # type: ignore[attr-defined]

    @holds_context
    def warmup(self, n_tokens: int = 32) -> None:
        """A short prefill at every level, then back to the current one: pages the weights in and builds the
        graphs, so the first real request of each level is not slower than the profile predicts."""
        before = self.level
        toks = P.filler_tokens(self, n_tokens)
        for li in self.levels:
            self.set_level(li.index)
            P.time_ttft(self, toks)
        self.set_level(before)
        self._clear_cache()

    # -- planning -----------------------------------------------------------------------------------------

    def count_tokens(self, text: str, *, add_bos: bool = False, special: bool = False) -> int:
        return len(self.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)) if text or add_bos else 0

    def _scorer_ms(self, contexts: Sequence[str]) -> Any:
        if self.compressor is None:
            return None
        if all(self.compressor.is_cached(c) for c in contexts if c):
            return lambda n: 0.0
        name = self.scorer.name  # type: ignore[union-attr]
        return lambda n: self.profile.scorer_ms(name, n)  # type: ignore[union-attr]

    @holds_context
    def plan(self, slo: object, *, n_fixed: int, n_compressible: int, contexts: Sequence[str] = (),
             best_effort: bool | None = None, min_prompt_ratio: float | None = None,
             n_decode: int | None = None) -> O.Decision:
        """The (level, prompt ratio) decision for a request of these token counts (see :func:`orchestrate.decide`)."""
        if self.profile is None:
            raise ProfileError(f"no latency profile for {self.model_path}: run `elms-profile {self.model_path} "
                               f"-t {self.n_threads}` or llm.measure_profile(), or pass profile=")
        levels = [li.index for li in self.levels if li.index in self.profile.levels]
        ctx = next((c for c in contexts if c), None)
        if self.decision_head is not None and n_compressible and ctx is not None and self.compressor is not None:
            from . import decision as D

            t0 = time.perf_counter()
            cached = self.compressor.is_cached(ctx)
            pooled = self.compressor.pooled(C.split_words(ctx))
            overhead = 0.0 if cached else (time.perf_counter() - t0) * 1e3  # the TLM pass is spent either way
            if pooled is not None:
                return D.guarded_decision(
                    self.decision_head, self.profile, slo, n_fixed=n_fixed, n_compressible=n_compressible,
                    pooled=pooled, levels=levels, scorer_ms=self._scorer_ms(contexts),
                    min_prompt_ratio=self.min_prompt_ratio if min_prompt_ratio is None else min_prompt_ratio,
                    best_effort=self.best_effort if best_effort is None else best_effort, headroom=self.headroom,
                    overhead_ms=overhead, n_decode=n_decode, margin=self._margin())
        return O.decide(self.profile, slo, n_fixed=n_fixed, n_compressible=n_compressible,
                        scorer_ms=self._scorer_ms(contexts) if n_compressible else None,
                        min_prompt_ratio=self.min_prompt_ratio if min_prompt_ratio is None else min_prompt_ratio,
                        levels=levels, best_effort=self.best_effort if best_effort is None else best_effort,
                        headroom=self.headroom, n_decode=n_decode, margin=self._margin())

    def _compress(self, text: str, rho: float) -> tuple[str, float, bool]:
        """(compressed text, scorer ms, cache hit) keeping ``rho`` of ``text``'s tokens."""
        if rho >= 1.0 or not text.strip() or self.compressor is None:
            return text, 0.0, False
        n = self.count_tokens(text)
        r = self.compressor.compress_prompt(text, target_tokens=int(round(rho * n)))
        return str(r["compressed_context"]), float(r["scorer_ms"]), bool(r["cache_hit"])  # type: ignore[arg-type]

    def _prepare(self, d: O.Decision) -> None:
        self.set_level(d.level)
        self._clear_cache()  # a full prefill: what the profile predicts (and no other request's KV)

    def _elms_block(self, d: O.Decision, t0: float, clock: TokenClock, *, n_prompt: int, n_original: int,
                    scorer_ms: float, cache_hit: bool, n_c_before: int, n_c_after: int) -> dict[str, Any]:
        ttft = clock.ttft_ms(t0)
        tpot = clock.tpot_ms()
        slo_t = None if math.isinf(d.slo_ttft_ms) else d.slo_ttft_ms
        slo_p = None if math.isinf(d.slo_tpot_ms) else d.slo_tpot_ms
        self._observe(d, ttft, tpot)
        return {
            "level": d.level, "level_ratio": d.level_ratio,
            "prompt_ratio": (n_c_after / n_c_before) if n_c_before else 1.0, "planned_prompt_ratio": d.prompt_ratio,
            "prompt_tokens_original": n_original, "prompt_tokens": n_prompt,
            "predicted_ttft_ms": d.predicted_ttft_ms, "predicted_tpot_ms": d.predicted_tpot_ms,
            "predicted_scorer_ms": d.predicted_scorer_ms,
            "measured_ttft_ms": ttft, "measured_tpot_ms": tpot,
            "tlm_ms": scorer_ms, "scorer": getattr(self.scorer, "name", None), "score_cache_hit": cache_hit,
            "slo_ttft_ms": slo_t, "slo_tpot_ms": slo_p,
            "ttft_met": None if ttft is None or slo_t is None else bool(ttft <= slo_t),
            "tpot_met": None if tpot is None or slo_p is None else bool(tpot <= slo_p),
            "feasible": d.feasible, "reason": d.reason, "margins": [d.margin_ttft, d.margin_tpot],
        }

    def _respond(self, d: O.Decision, complete: Callable[[], Any], block: Callable[..., dict[str, Any]], *,
                 clock: TokenClock, stream: bool, n_prompt: Callable[[], int]) -> Any:
        """Switch to the decided level, run ``complete()`` and add the ``elms`` block (``block(n_prompt=...)``): to
        the response, or, streaming, to the chunk that finishes the choice (the level is switched when the stream
        is first read)."""
        if not stream:
            self._prepare(d)
            out = complete()
            out["elms"] = block(n_prompt=int(out["usage"]["prompt_tokens"]))
            return out

        def chunks() -> Iterator[dict[str, Any]]:
            self._prepare(d)
            for chunk in complete():
                if (chunk.get("choices") or [{}])[0].get("finish_reason") is not None:
                    chunk = {**chunk, "elms": block(n_prompt=clock.n_prompt or n_prompt())}
                yield chunk

        return chunks()

    @staticmethod
    def _with_clock(kwargs: dict[str, Any], clock: TokenClock) -> None:
        lp = kwargs.get("logits_processor")
        lst = llama_cpp.LogitsProcessorList(list(lp) if lp is not None else [])
        lst.append(clock)
        kwargs["logits_processor"] = lst

    # -- completion ---------------------------------------------------------------------------------------

    @holds_context
    def create_completion(self, prompt: Any, *args: Any, context: str | Sequence[str] | None = None,
                          slo: object | None = None, best_effort: bool | None = None,
                          decision: O.Decision | None = None, context_separator: str = "\n\n", **kwargs: Any) -> Any:
        """llama-cpp-python's ``create_completion``; with ``slo=`` (and optionally ``context=``) an SLO request.

        Args:
            prompt: the text never compressed (the question).
            context: the compressible text (instruction, examples), or a list of texts joined by
                ``context_separator``; it goes before ``prompt``, separated by ``context_separator`` unless it
                already ends with whitespace.
            slo: an :class:`SLO` (or ``(ttft_ms, tpot_ms)``): choose level and prompt ratio to meet it. Without
                it, ``context`` is simply prepended and the current level runs.
            best_effort: override the instance's choice for infeasible SLOs (True, False or None).
            decision: run this (level, prompt ratio) instead of deciding (e.g. from :meth:`plan`, or a baseline
                policy); ``slo`` is then only reported against.
            max_tokens: with ``slo=``/``decision=`` a positive int, or None (until EOS or the context is full).

        Returns the usual dict plus ``"elms"`` (see the module docstring). The whole request holds the model.
        """
        _check_best_effort(best_effort, per_request=True)
        if decision is not None and not isinstance(decision, O.Decision):
            raise TypeError(f"decision must be an orchestrate.Decision (from plan()) or None, got {decision!r}")
        slo = None if slo is None else SLO.coerce(slo)
        _check_max_tokens(kwargs, slo=slo is not None or decision is not None)
        if context is None and slo is None and decision is None:
            return super().create_completion(prompt, *args, **kwargs)
        if args:
            raise TypeError("pass create_completion options by keyword with context=/slo=")
        if not isinstance(prompt, str):
            raise TypeError("an SLO request needs a text prompt (token lists cannot be compressed)")
        if context is not None and not isinstance(context, str):
            context = context_separator.join(str(c) for c in context)
        ctx = context or ""
        join = (lambda c, p: c + p if (not c or c[-1].isspace()) else c + context_separator + p)
        if slo is None and decision is None:  # just the concatenation at the current level
            return super().create_completion(join(ctx, prompt), **kwargs)
        t0 = time.perf_counter()
        n_full = self.count_tokens(join(ctx, prompt), add_bos=True)
        n_c = self.count_tokens(ctx)
        if decision is not None:
            d = decision
        else:
            d = self.plan(slo, n_fixed=max(0, n_full - n_c), n_compressible=n_c, contexts=[ctx],
                          best_effort=best_effort, n_decode=_n_intervals(kwargs.get("max_tokens", 16)))
        ctx2, sc_ms, hit = self._compress(ctx, d.prompt_ratio) if d.compress else (ctx, 0.0, False)
        text = join(ctx2, prompt)
        clock = TokenClock()
        self._with_clock(kwargs, clock)
        complete = super().create_completion
        block = functools.partial(self._elms_block, d, t0, clock, n_original=n_full, scorer_ms=sc_ms, cache_hit=hit,
                                  n_c_before=n_c, n_c_after=self.count_tokens(ctx2))
        return self._respond(d, lambda: complete(text, **kwargs), block, clock=clock, stream=bool(kwargs.get("stream")),
                             n_prompt=lambda: self.count_tokens(text, add_bos=True))

    # -- chat ---------------------------------------------------------------------------------------------

    def _format_chat(self, messages: Sequence[Mapping[str, Any]]) -> str | None:
        tmpl = self.metadata.get("tokenizer.chat_template")
        if not tmpl:
            return None
        try:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = self._model.token_get_text(self.token_eos()) if self.token_eos() >= 0 else ""
            bos = self._model.token_get_text(self.token_bos()) if self.token_bos() >= 0 else ""
            f = Jinja2ChatFormatter(template=tmpl, eos_token=eos, bos_token=bos)
            return f(messages=list(messages)).prompt
        except Exception as e:  # the exact count is an estimate's refinement only
            log.debug("cannot render the chat template: %s", e)
            return None

    @holds_context
    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], *args: Any, slo: object | None = None,
                               best_effort: bool | None = None, compress_roles: Iterable[str] = ("system", "user", "assistant"),
                               **kwargs: Any) -> Any:
        """llama-cpp-python's ``create_chat_completion``; with ``slo=`` an SLO request.

        The last user turn is never compressed, nor are messages whose role is not in ``compress_roles``; every
        other message's content (system instruction, few-shot turns) is compressible and is compressed at the
        same ratio. Roles and message structure are kept. ``messages`` must be OpenAI-shaped, ``max_tokens`` with
        ``slo=`` a positive int or None (see the module docstring). The whole request holds the model.
        """
        _check_messages(messages)
        _check_best_effort(best_effort, per_request=True)
        slo = None if slo is None else SLO.coerce(slo)
        _check_max_tokens(kwargs, slo=slo is not None)
        if slo is None:
            return super().create_chat_completion(messages, *args, **kwargs)
        if args:
            raise TypeError("pass create_chat_completion options by keyword with slo=")
        msgs = [dict(m) for m in messages]
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
        roles = set(compress_roles)
        comp = [i for i, m in enumerate(msgs) if i != last_user and m.get("role") in roles
                and isinstance(m.get("content"), str) and m["content"].strip()]
        t0 = time.perf_counter()
        n_cs = {i: self.count_tokens(msgs[i]["content"]) for i in comp}
        n_c = sum(n_cs.values())
        rendered = self._format_chat(msgs)
        if rendered is not None:
            n_full = self.count_tokens(rendered, special=True) + 1  # (+ BOS, when the model adds one)
        else:  # no template in the file: contents + a few tokens per message
            n_full = sum(self.count_tokens(str(m.get("content") or "")) + 4 for m in msgs) + 3
        d = self.plan(slo, n_fixed=max(0, n_full - n_c), n_compressible=n_c,
                      contexts=[msgs[i]["content"] for i in comp], best_effort=best_effort,
                      n_decode=_n_intervals(kwargs.get("max_tokens")))
        sc_ms, hit, n_after = 0.0, bool(comp), 0
        for i in comp:
            if d.compress:
                msgs[i]["content"], ms, h = self._compress(msgs[i]["content"], d.prompt_ratio)
                sc_ms += ms
                hit = hit and h
            n_after += self.count_tokens(msgs[i]["content"])
        clock = TokenClock()
        self._with_clock(kwargs, clock)
        complete = super().create_chat_completion
        block = functools.partial(self._elms_block, d, t0, clock, n_original=n_full, scorer_ms=sc_ms,
                                  cache_hit=hit and d.compress, n_c_before=n_c, n_c_after=n_after)
        return self._respond(d, lambda: complete(msgs, **kwargs), block, clock=clock, stream=bool(kwargs.get("stream")),
                             n_prompt=lambda: 0)


# --------------------------------------------------------------------------------------------------
# demo


def demo_slo(model_path: str, *, tlm: str | None = None, profile: object = "auto", n_threads: int = 1,
             slos: Sequence[tuple[float, float]] = ((1.0, 1.0), (0.6, 0.8), (0.3, 0.6)), max_tokens: int = 16,
             task: str = "arc_easy", print_fn=print) -> list[dict[str, Any]]:
    """Answer one app request (an ARC-Easy question after the instruction and 5 examples) under three relative
    SLOs; print the chosen level, prompt ratio and predicted vs measured TTFT/TPOT. Measures a quick profile
    first if none is saved. Returns the ``elms`` blocks."""
    from .tasks import app_prompts

    if tlm is None:
        here = os.path.dirname(os.path.abspath(model_path))
        tlm = next((c for c in (os.path.join(here, n) for n in DEFAULT_TLM_NAMES) if os.path.exists(c)), None)
    llm = ElasticLlama(model_path, tlm=tlm, scorer="tlm" if tlm else "selfinfo", profile=profile,
                       n_threads=n_threads, n_threads_batch=n_threads, n_ctx=2048, verbose=False, best_effort=True)
    if llm.profile is None:
        print_fn(f"no saved latency profile: measuring a quick one ({n_threads} thread(s)) ...")
        llm.measure_profile(lengths=(64, 256, 512), runs=1, n_decode=8)
    else:
        llm.warmup()
    app = app_prompts(task, n_items=1)
    item = app.items[0]
    print_fn(f"model {os.path.basename(model_path)}, scorer {llm.scorer.name if llm.scorer else 'none'}")  # type: ignore[union-attr]
    print_fn(f"question: {item.question}  (gold: {item.choices[item.answer]})")
    out = []
    print_fn(f"{'SLO (ttft, tpot)':>17}  {'level':>5} {'ratio':>5}  {'prompt':>6}  {'tokens':>11}  "
             f"{'TTFT pred/meas ms':>18}  {'TPOT pred/meas ms':>18}  {'TLM ms':>6}  met  answer")
    for tt, tp in slos:
        r = llm.create_completion(prompt=app.question(item), context=app.context, slo=SLO.relative(tt, tp),
                                  max_tokens=max_tokens, temperature=0.0, stop=["\n"])
        e = r["elms"]
        met = "yes" if e["ttft_met"] and e["tpot_met"] in (True, None) else "no"
        f0 = (lambda v, spec: "-" if v is None else format(v, spec))
        print_fn(f"{f'({tt:g}, {tp:g})':>17}  {e['level']:>5} {e['level_ratio']:5.2f}  {e['prompt_ratio']:6.2f}  "
                 f"{e['prompt_tokens']:>5}/{e['prompt_tokens_original']:<5}  "
                 f"{e['predicted_ttft_ms']:8.0f}/{f0(e['measured_ttft_ms'], '<9.0f')}  "
                 f"{e['predicted_tpot_ms']:8.1f}/{f0(e['measured_tpot_ms'], '<9.1f')}  "
                 f"{e['tlm_ms']:6.0f}  {met:>3}  {r['choices'][0]['text'].strip()[:40]!r}")
        out.append(e)
    return out
