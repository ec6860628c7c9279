"""A small byte-level BPE tokenizer built from a GGUF's ``tokenizer.ggml.*`` keys.

Only what calibration needs: plain text in, token ids out, matching llama.cpp's ``llama_tokenize`` with
``parse_special = false`` for the GPT-2 style BPE vocabularies of the supported models (SmolLM2: pre-tokenizer
``smollm``; Qwen2/2.5: ``qwen2``; also ``gpt2`` and ``llama3``-style). No dependency beyond the standard library:
the regexes' ``\\p{L}`` / ``\\p{N}`` classes are built from :mod:`unicodedata`.

Other vocabularies (SentencePiece ``llama``, WordPiece, ...) raise :class:`TokenizerError`; pass pre-tokenized
calibration data instead (see :mod:`elms_gguf.calib`).
"""
from __future__ import annotations

import functools
import re
import sys
import unicodedata
from typing import Mapping, Sequence


class TokenizerError(ValueError):
    """The model's tokenizer cannot be reproduced here."""


@functools.lru_cache(maxsize=None)
def _unicode_class(prefix: str) -> str:
    """A regex character-class body with every code point whose general category starts with ``prefix``."""
    ranges: list[tuple[int, int]] = []
    start = prev = -2
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if cp != prev + 1:
                if start >= 0:
                    ranges.append((start, prev))
                start = cp
            prev = cp
    if start >= 0:
        ranges.append((start, prev))

    def esc(cp: int) -> str:
        return f"\\U{cp:08x}"

    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


def _translate(pattern: str) -> str:
    """llama.cpp regex (with \\p{L}, \\p{N}) -> Python ``re`` pattern."""
    L, N = _unicode_class("L"), _unicode_class("N")
    # inside a class: [^\s\p{L}\p{N}] -> splice the bodies; outside: wrap in brackets
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and pattern.startswith(("\\p{L}", "\\p{N}"), i):
            body = L if pattern[i + 3] == "L" else N
            out.append(body if in_class else f"[{body}]")
            i += 5
            continue
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regexes llama.cpp applies in turn (src/llama-vocab.cpp, llm_tokenizer_bpe)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt2": (_GPT2,),
    "gpt-2": (_GPT2,),
    "olmo": (_GPT2,),
    "mpt": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "megrez": (_QWEN2,),
}


@functools.lru_cache(maxsize=None)
def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class BPETokenizer:
    """Byte-level BPE as llama.cpp runs it for ``tokenizer.ggml.model == "gpt2"``."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], pre: str = "default", *,
                 bos_id: int | None = None, add_bos: bool = False, eos_id: int | None = None):
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(
                f"pre-tokenizer {pre!r} is not implemented here (known: {', '.join(sorted(PRE_TOKENIZERS))}); "
                "pass pre-tokenized calibration data instead")
        self.pre = pre
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks: dict[tuple[str, str], int] = {}
        for i, m in enumerate(merges):
            a, _, b = m.partition(" ")
            self.ranks[(a, b)] = i
        self.regexes = [re.compile(_translate(p)) for p in PRE_TOKENIZERS[pre]]
        self.bos_id, self.add_bos, self.eos_id = bos_id, add_bos, eos_id
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object], *, source: str = "model") -> "BPETokenizer":
        model = str(fields.get("tokenizer.ggml.model", ""))
        if model != "gpt2":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model = {model!r}; only byte-level BPE ('gpt2') is implemented here, "
                "pass pre-tokenized calibration data instead")
        if "tokenizer.ggml.tokens" not in fields or "tokenizer.ggml.merges" not in fields:
            raise TokenizerError(f"{source}: no tokenizer.ggml.tokens / merges in the model")
        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return cls(
            fields["tokenizer.ggml.tokens"],  # type: ignore[arg-type]
            fields["tokenizer.ggml.merges"],  # type: ignore[arg-type]
            str(fields.get("tokenizer.ggml.pre", "default")),
            bos_id=None if bos is None else int(bos),  # type: ignore[arg-type]
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            eos_id=None if eos is None else int(eos),  # type: ignore[arg-type]
        )

    def _split(self, text: str) -> list[str]:
        pieces = [text]
        for rx in self.regexes:
            nxt: list[str] = []
            for piece in pieces:
                pos = 0
                for m in rx.finditer(piece):
                    if m.start() > pos:
                        nxt.append(piece[pos : m.start()])
                    if m.end() > m.start():
                        nxt.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    nxt.append(piece[pos:])
            pieces = nxt
        return pieces

    def _bpe(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        enc = _byte_encoder()
        symbols = [enc[b] for b in word.encode("utf-8")]
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_i = None, -1
            for i in range(len(symbols) - 1):
                r = ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            symbols[best_i : best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
        ids: list[int] = []
        for s in symbols:
            tid = self.vocab.get(s)
            if tid is not None:
                ids.append(tid)
            else:  # byte fallback, as llama.cpp does
                ids.extend(self.vocab[ch] for ch in s if ch in self.vocab)
        self._cache[word] = ids
        return ids

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        for word in self._split(text):
            ids.extend(self._bpe(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        dec = {c: b for b, c in _byte_encoder().items()}
        data = bytearray()
        for i in ids:
            for ch in self.tokens[int(i)]:
                if ch in dec:
                    data.append(dec[ch])
                else:
                    data.extend(ch.encode("utf-8"))
        return data.decode("utf-8", errors="replace")
