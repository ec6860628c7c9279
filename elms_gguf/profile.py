"""Latency profile of an elastic GGUF on this device, and latency SLOs.

``elms-profile MODEL.gguf`` measures, in process with the patched llama.cpp (:class:`~elms_gguf.runtime.ElasticLlama`),
the time to first token (TTFT) over several prompt lengths and the time per output token (TPOT) of every level,
in interleaved rounds (every round times every level and length once, so all of them see the same background
load), takes medians, fits

    TTFT(level, n) = a_l + b_l * n + c_l * n^2      (ms; non-negative least squares)
    TPOT(level)    = median of the per-token decode times (ms)

and saves a JSON file keyed by the model's fingerprint (:func:`model_fingerprint`: size, sha256 of the first and
last MiB, ``elms.model_id``), the thread count and the CPU model. Optionally it also times a prompt scorer
(the TLM of :mod:`elms_gguf.tlm`, or the target model's own self-information) as a function of the number of
target-model tokens it scores.

:class:`SLO` is a latency objective: milliseconds (``SLO(ttft_ms=800, tpot_ms=60)``) or, as in the ELMS paper,
fractions of the dense model's latency on this device (``SLO.relative(0.6, 0.8)``), resolved against a profile
for a given prompt length (:meth:`SLO.resolve`).

    elms-profile models/smollm2-135m-elastic-q4_0.gguf -t 2 --lengths 32,128,256,512 --runs 3
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
DEFAULT_LENGTHS = (32, 128, 256, 512)
_MIB = 1 << 20

# filler text for timing prompts: speed does not depend on the content, only on the token count
_FILLER = (
    "The committee met on Tuesday to review the budget for the coming year. Several members asked how the new "
    "library would be paid for, and the treasurer explained that a grant from the county would cover most of the "
    "building costs while a small increase in fees would pay for staff. After a long discussion the plan was "
    "approved, and the chair thanked everyone for their patience. "
)


class ProfileError(ValueError):
    """A latency profile is missing, malformed, or belongs to another model."""


class SLOError(ValueError):
    """A latency SLO is malformed (not a number, not positive) or cannot be resolved."""


# --------------------------------------------------------------------------------------------------
# identity of the model and the device


def model_fingerprint(path: str | os.PathLike[str]) -> dict[str, object]:
    """A cheap identity of a GGUF file: size, sha256 of its first and last MiB, and ``elms.model_id``.

    ``checksum`` combines the three; two files with the same checksum are treated as the same model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProfileError(f"model file not found: {path}")
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > 2 * _MIB:
            f.seek(size - _MIB)
            h.update(f.read(_MIB))
    head = h.hexdigest()
    model_id = _model_id(path)
    checksum = hashlib.sha256(f"{size}:{head}:{model_id}".encode()).hexdigest()[:32]
    return {"checksum": checksum, "size": size, "sha256_head_tail": head, "model_id": model_id,
            "name": os.path.basename(path)}


def _model_id(path: str) -> str:
    try:
        import gguf

        r = gguf.GGUFReader(path)
        f = r.fields.get("elms.model_id")
        return str(f.contents()) if f is not None else ""
    except Exception as e:  # not a GGUF gguf-py can read: the size and hash still identify the file
        log.debug("no elms.model_id in %s: %s", path, e)
        return ""


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_info(n_threads: int, n_threads_batch: int | None = None) -> dict[str, object]:
    """CPU model and thread counts (``n_threads`` decodes, ``n_threads_batch`` runs the prefill)."""
    return {"cpu": cpu_model(), "machine": platform.machine(), "n_cpus": os.cpu_count() or 0,
            "n_threads": int(n_threads), "n_threads_batch": int(n_threads_batch or n_threads)}


def thread_key(n_threads: int, n_threads_batch: int | None = None) -> str:
    tb = int(n_threads_batch or n_threads)
    return f"t{int(n_threads)}" + ("" if tb == int(n_threads) else f"-tb{tb}")


# --------------------------------------------------------------------------------------------------
# curves


def fit_quadratic(samples: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Non-negative least-squares fit of ``y = a + b*n + c*n^2`` over ``(n, y)`` samples.

    Every subset of the three terms is fitted by ordinary least squares and the best fit with all coefficients
    >= 0 wins (so the curve is non-decreasing in n for n >= 0). Fewer than 3 distinct lengths drop the terms
    that cannot be identified.
    """
    pts = [(float(n), float(y)) for n, y in samples if math.isfinite(float(y))]
    if not pts:
        raise ProfileError("no samples to fit")
    n = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    cols = [np.ones_like(n), n, n * n]
    n_distinct = len(set(n.tolist()))
    best: tuple[float, tuple[float, float, float]] | None = None
    for k in (1, 2, 3):
        for subset in itertools.combinations(range(3), k):
            if len(subset) > n_distinct:
                continue
            A = np.stack([cols[i] for i in subset], axis=1)
            coef, *_ = np.linalg.lstsq(A, y, rcond=None)
            if np.any(coef < 0):
                continue
            full = [0.0, 0.0, 0.0]
            for i, c in zip(subset, coef):
                full[i] = float(c)
            res = float(np.sum((A @ coef - y) ** 2))
            if best is None or res < best[0] - 1e-12 * max(1.0, res):
                best = (res, (full[0], full[1], full[2]))
    if best is None:  # every fit had a negative term: a constant (the mean) is always non-negative for y >= 0
        return (max(0.0, float(np.mean(y))), 0.0, 0.0)
    return best[1]


@dataclass
class Curve:
    """``ms(n) = a + b*n + c*n^2`` with the samples it was fitted on (``[n, median ms]``)."""

    coef: tuple[float, float, float]
    samples: list[list[float]] = field(default_factory=list)

    def __call__(self, n: float) -> float:
        a, b, c = self.coef
        n = max(0.0, float(n))
        return a + b * n + c * n * n

    def max_n(self, budget_ms: float) -> float:
        """The largest n >= 0 with ``self(n) <= budget_ms`` (0 if even n = 0 exceeds it, inf if flat)."""
        a, b, c = self.coef
        if budget_ms < a:
            return 0.0
        rem = budget_ms - a
        if c > 0:
            return (-b + math.sqrt(b * b + 4 * c * rem)) / (2 * c)
        if b > 0:
            return rem / b
        return math.inf

    @classmethod
    def fit(cls, samples: Iterable[Sequence[float]]) -> "Curve":
        s = [[float(n), float(y)] for n, y in samples]
        return cls(coef=fit_quadratic([(n, y) for n, y in s]), samples=s)

    def to_json(self) -> dict[str, object]:
        return {"coef": list(self.coef), "samples": self.samples}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> "Curve":
        coef = [float(x) for x in d["coef"]]  # type: ignore[union-attr]
        if len(coef) != 3 or any(not math.isfinite(c) or c < 0 for c in coef):
            raise ProfileError(f"bad curve coefficients {coef}")
        return cls(coef=(coef[0], coef[1], coef[2]), samples=[list(map(float, s)) for s in d.get("samples", [])])  # type: ignore[union-attr]


@dataclass
class LevelProfile:
    """Measured latency of one level (-1 = dense)."""

    level: int
    ratio: float
    ttft: Curve
    tpot_ms: float
    tpot_samples: list[float] = field(default_factory=list)
    # median interval at each position after the prompt: the first tokens after a prefill are slower (the decode
    # graph is rebuilt, caches are cold), so a short generation's TPOT is above the steady-state ``tpot_ms``
    tpot_by_position: list[float] = field(default_factory=list)

    def ttft_ms(self, n_tokens: float) -> float:
        return self.ttft(n_tokens)

    def tpot_over(self, n_intervals: int | None) -> float:
        """Mean time per output token over the first ``n_intervals`` intervals of a generation (the TPOT a
        request of ``n_intervals + 1`` tokens measures); past the profiled positions the steady value holds."""
        pos = self.tpot_by_position
        if not n_intervals or not pos:
            return self.tpot_ms
        n = int(n_intervals)
        k = min(n, len(pos))
        return (sum(pos[:k]) + (n - k) * self.tpot_ms) / n

    def to_json(self) -> dict[str, object]:
        return {"level": self.level, "ratio": self.ratio, "ttft": self.ttft.to_json(), "tpot_ms": self.tpot_ms,
                "tpot_samples": self.tpot_samples, "tpot_by_position": self.tpot_by_position}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> "LevelProfile":
        tpot = float(d["tpot_ms"])  # type: ignore[arg-type]
        if not (math.isfinite(tpot) and tpot > 0):
            raise ProfileError(f"level {d.get('level')}: bad tpot_ms {tpot}")
        return cls(level=int(d["level"]), ratio=float(d["ratio"]), ttft=Curve.from_json(d["ttft"]),  # type: ignore[arg-type]
                   tpot_ms=tpot, tpot_samples=[float(x) for x in d.get("tpot_samples", [])],  # type: ignore[union-attr]
                   tpot_by_position=[float(x) for x in d.get("tpot_by_position", [])])  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# the profile


@dataclass
class LatencyProfile:
    """TTFT and TPOT models of every level of one model on one device (see the module docstring)."""

    model: dict[str, object]
    device: dict[str, object]
    levels: dict[int, LevelProfile]
    scorers: dict[str, Curve] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)
    version: int = PROFILE_VERSION

    # -- queries --------------------------------------------------------------------------------------

    @property
    def checksum(self) -> str:
        return str(self.model.get("checksum", ""))

    @property
    def n_threads(self) -> int:
        return int(self.device.get("n_threads", 0))  # type: ignore[arg-type]

    @property
    def n_threads_batch(self) -> int:
        return int(self.device.get("n_threads_batch", self.n_threads))  # type: ignore[arg-type]

    def level_order(self) -> list[int]:
        """Level indices from the smallest to the dense model (-1 last)."""
        return sorted(self.levels, key=lambda lv: (self.levels[lv].ratio, lv == -1))

    @property
    def dense(self) -> LevelProfile:
        if -1 in self.levels:
            return self.levels[-1]
        return self.levels[self.level_order()[-1]]

    def _level(self, level: int) -> LevelProfile:
        try:
            return self.levels[int(level)]
        except KeyError:
            raise ProfileError(f"level {level} is not in the profile (levels {sorted(self.levels)})") from None

    def ttft_ms(self, level: int, n_tokens: float) -> float:
        """Predicted prefill + first-token time of ``level`` for a prompt of ``n_tokens`` tokens."""
        return self._level(level).ttft_ms(n_tokens)

    def tpot_ms(self, level: int, n_intervals: int | None = None) -> float:
        """Predicted time per output token of ``level``: steady state, or the mean over the first ``n_intervals``
        intervals of a generation (``max_tokens - 1`` for a request)."""
        return self._level(level).tpot_over(n_intervals)

    def scorer_ms(self, scorer: str | None, n_tokens: float) -> float:
        """Predicted time of prompt scorer ``scorer`` over ``n_tokens`` target tokens (0 for None / no tokens)."""
        if scorer is None or n_tokens <= 0:
            return 0.0
        if scorer not in self.scorers:
            raise ProfileError(f"scorer {scorer!r} was not profiled (profiled: {sorted(self.scorers) or 'none'}); "
                               "run elms-profile with --tlm / --selfinfo")
        return self.scorers[scorer](n_tokens)

    # -- identity ---------------------------------------------------------------------------------------

    def check_model(self, model_path: str | os.PathLike[str] | None = None, *,
                    fingerprint: Mapping[str, object] | None = None, n_threads: int | None = None,
                    n_threads_batch: int | None = None) -> None:
        """Refuse (:class:`ProfileError`) a profile measured on another model; warn on another device/threads."""
        fp = fingerprint if fingerprint is not None else model_fingerprint(model_path)  # type: ignore[arg-type]
        if fp["checksum"] != self.checksum:
            raise ProfileError(
                f"latency profile is for another model: profile {self.model.get('name')!r} "
                f"(checksum {self.checksum}, model_id {self.model.get('model_id')!r}, {self.model.get('size')} bytes), "
                f"model {fp.get('name')!r} (checksum {fp['checksum']}, model_id {fp.get('model_id')!r}, "
                f"{fp.get('size')} bytes); run `elms-profile {model_path or fp.get('name')}`")
        cpu = cpu_model()
        if self.device.get("cpu") != cpu:
            log.warning("latency profile was measured on %r, this CPU is %r: predictions may be off",
                        self.device.get("cpu"), cpu)
        for what, have, want in (("threads", n_threads, self.n_threads),
                                 ("batch threads", n_threads_batch, self.n_threads_batch)):
            if have is not None and want and int(have) != want:
                log.warning("latency profile was measured with %d %s, this instance uses %d: predictions may be off",
                            want, what, have)

    # -- I/O --------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        return {
            "format": "elms-latency-profile", "version": self.version, "model": self.model, "device": self.device,
            "levels": [self.levels[k].to_json() for k in self.level_order()],
            "scorers": {k: v.to_json() for k, v in self.scorers.items()}, "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, object], *, source: str = "profile") -> "LatencyProfile":
        if not isinstance(d, Mapping) or d.get("format") != "elms-latency-profile":
            raise ProfileError(f"{source}: not an elms latency profile (no \"format\": \"elms-latency-profile\")")
        if int(d.get("version", 0)) != PROFILE_VERSION:  # type: ignore[arg-type]
            raise ProfileError(f"{source}: profile version {d.get('version')}, this elms-gguf reads {PROFILE_VERSION}")
        try:
            levels = {lp.level: lp for lp in (LevelProfile.from_json(x) for x in d["levels"])}  # type: ignore[union-attr]
            scorers = {str(k): Curve.from_json(v) for k, v in dict(d.get("scorers", {})).items()}  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{source}: malformed profile: {e}") from None
        if not levels:
            raise ProfileError(f"{source}: profile has no levels")
        return cls(model=dict(d["model"]), device=dict(d["device"]), levels=levels, scorers=scorers,  # type: ignore[arg-type]
                   meta=dict(d.get("meta", {})))  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike[str]) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model_path: str | os.PathLike[str] | None = None) -> "LatencyProfile":
        """Read a profile; with ``model_path`` also refuse it if it was measured on another model."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ProfileError(f"latency profile not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: not JSON ({e})") from None
        prof = cls.from_json(d, source=path)
        if model_path is not None:
            prof.check_model(model_path)
        return prof

    def summary(self) -> str:
        lines = [f"model {self.model.get('name')} (checksum {self.checksum}), {self.device.get('cpu')}, "
                 f"{self.n_threads} thread(s), {self.n_threads_batch} batch thread(s)"]
        lengths = sorted({int(s[0]) for lp in self.levels.values() for s in lp.ttft.samples}) or list(DEFAULT_LENGTHS)
        lines.append("level  ratio  " + "  ".join(f"TTFT@{n:<5d}" for n in lengths) + "  TPOT ms   fit a + b*n + c*n^2")
        for k in reversed(self.level_order()):
            lp = self.levels[k]
            a, b, c = lp.ttft.coef
            lines.append(f"{k:5d}  {lp.ratio:5.2f}  " + "  ".join(f"{lp.ttft_ms(n):10.1f}" for n in lengths)
                         + f"  {lp.tpot_ms:7.2f}   {a:.2f} + {b:.4f}n + {c:.2e}n^2")
        for name, cv in self.scorers.items():
            lines.append(f"scorer {name}: " + ", ".join(f"{cv(n):.1f} ms @{n}" for n in lengths))
        return "\n".join(lines)


def profile_dir() -> str:
    return os.environ.get("ELMS_PROFILE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "elms-gguf", "profiles")


def default_profile_path(model_path: str | os.PathLike[str], n_threads: int, n_threads_batch: int | None = None, *,
                         fingerprint: Mapping[str, object] | None = None) -> str:
    """``<profile_dir>/<model checksum>-<cpu hash>-t<threads>[-tb<batch threads>].json``: the key of a profile."""
    fp = fingerprint or model_fingerprint(model_path)
    cpu = hashlib.sha256(cpu_model().encode()).hexdigest()[:8]
    return os.path.join(profile_dir(), f"{str(fp['checksum'])[:16]}-{cpu}-{thread_key(n_threads, n_threads_batch)}.json")


def find_profile(model_path: str | os.PathLike[str], n_threads: int,
                 n_threads_batch: int | None = None) -> LatencyProfile | None:
    """The saved profile of this model, CPU and thread counts, if any."""
    p = default_profile_path(model_path, n_threads, n_threads_batch)
    return LatencyProfile.load(p, model_path=model_path) if os.path.exists(p) else None


# --------------------------------------------------------------------------------------------------
# SLOs


def _positive(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (Real, np.floating, np.integer)):
        raise SLOError(f"{what} must be a number, got {value!r}")
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v) or v <= 0:
        raise SLOError(f"{what} must be a positive finite number, got {value!r}")
    return v


@dataclass(frozen=True)
class SLO:
    """A latency objective: TTFT and TPOT in milliseconds, or as fractions of the dense model's latency.

    >>> SLO(ttft_ms=800, tpot_ms=60)            # absolute; None = unconstrained
    >>> SLO.relative(0.6, 0.8)                  # 60 % of the dense TTFT (for this prompt), 80 % of its TPOT

    A relative SLO is resolved against a :class:`LatencyProfile` for a given prompt length (:meth:`resolve`).
    """

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    kind: str = "ms"  # "ms" or "relative"

    def __post_init__(self) -> None:
        if self.kind not in ("ms", "relative"):
            raise SLOError(f"SLO kind must be 'ms' or 'relative', got {self.kind!r}")
        if self.kind == "relative":
            t, p, unit = "ttft", "tpot", "fraction of dense"
        else:
            t, p, unit = "ttft_ms", "tpot_ms", "ms"
        object.__setattr__(self, "ttft_ms", _positive(self.ttft_ms, f"TTFT SLO {t} ({unit})"))
        object.__setattr__(self, "tpot_ms", _positive(self.tpot_ms, f"TPOT SLO {p} ({unit})"))

    @classmethod
    def relative(cls, ttft: float | None, tpot: float | None) -> "SLO":
        """Fractions of the dense model's TTFT (at the request's full prompt length) and TPOT on this device."""
        return cls(ttft, tpot, kind="relative")

    @classmethod
    def coerce(cls, value: object) -> "SLO":
        """An SLO from an SLO, a ``(ttft_ms, tpot_ms)`` pair or a dict with exactly the keys ``ttft_ms`` and
        ``tpot_ms`` (or ``ttft``, ``tpot`` and ``"relative": True``); a limit of None is no limit. Unknown and
        missing keys are refused (:class:`SLOError`, a ValueError), as are values that are not positive numbers."""
        if isinstance(value, SLO):
            return value
        if isinstance(value, Mapping):
            relative = value.get("relative", False)
            if not isinstance(relative, bool):
                raise SLOError(f"SLO key 'relative' must be True or False, got {relative!r}")
            keys = ("ttft", "tpot") if relative else ("ttft_ms", "tpot_ms")
            shape = ("an SLO dict has 'ttft_ms' and 'tpot_ms' (milliseconds; None = no limit), or 'ttft', 'tpot' "
                     "(fractions of the dense model) and 'relative': True")
            unknown = [k for k in value if k not in keys and k != "relative"]
            if unknown:
                raise SLOError(f"unknown SLO key(s) {', '.join(map(repr, unknown))}: {shape}")
            missing = [k for k in keys if k not in value]
            if missing:
                raise SLOError(f"SLO dict is missing key(s) {', '.join(map(repr, missing))}: {shape}")
            return cls.relative(value["ttft"], value["tpot"]) if relative else cls(value["ttft_ms"], value["tpot_ms"])
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(value[0], value[1])
        raise SLOError(f"not an SLO: {value!r} (use SLO(ttft_ms, tpot_ms), SLO.relative(ttft, tpot), a "
                       f"(ttft_ms, tpot_ms) pair or a dict with keys ttft_ms and tpot_ms)")

    @property
    def is_relative(self) -> bool:
        return self.kind == "relative"

    def resolve(self, profile: LatencyProfile | None, n_tokens: float,
                n_intervals: int | None = None) -> tuple[float, float]:
        """The SLO in milliseconds for a prompt of ``n_tokens`` (uncompressed) tokens and a generation of
        ``n_intervals + 1`` tokens (relative TPOT: of the dense model's over as many tokens); ``inf`` =
        unconstrained."""
        ttft = math.inf if self.ttft_ms is None else self.ttft_ms
        tpot = math.inf if self.tpot_ms is None else self.tpot_ms
        if self.is_relative:
            if profile is None:
                raise SLOError("a relative SLO needs a latency profile (run elms-profile MODEL.gguf)")
            d = profile.dense
            ttft = ttft * d.ttft_ms(n_tokens)
            tpot = tpot * d.tpot_over(n_intervals)
        return ttft, tpot

    def __str__(self) -> str:
        f = (lambda v: "-" if v is None else f"{v:g}")
        return (f"SLO(ttft={f(self.ttft_ms)}x, tpot={f(self.tpot_ms)}x dense)" if self.is_relative
                else f"SLO(ttft={f(self.ttft_ms)} ms, tpot={f(self.tpot_ms)} ms)")


# --------------------------------------------------------------------------------------------------
# measuring


def filler_tokens(llm: object, n: int) -> list[int]:
    """``n`` token ids of ordinary text (BOS first when the model adds one)."""
    toks: list[int] = llm.tokenize((_FILLER * (1 + n // 40)).encode(), add_bos=True)  # type: ignore[attr-defined]
    while len(toks) < n:
        toks += toks[1:]
    return toks[:n]


def _clear(llm: object) -> None:
    import llama_cpp

    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)  # type: ignore[attr-defined]
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)
    llm.reset()  # type: ignore[attr-defined]


class TokenClock:
    """A llama-cpp-python logits processor that timestamps every sampled token (and can ban one token, e.g. EOS,
    so that a timed generation runs its full length). ``stamps[0]`` is when the prompt's logits were ready."""

    def __init__(self, ban: int | None = None) -> None:
        self.stamps: list[float] = []
        self.ban = ban if ban is not None and ban >= 0 else None
        self.n_prompt: int | None = None  # tokens before the first sampled one (the prompt as evaluated)

    def __call__(self, input_ids: Sequence[int], scores: np.ndarray) -> np.ndarray:
        self.stamps.append(time.perf_counter())
        if self.n_prompt is None:
            self.n_prompt = len(input_ids)
        if self.ban is not None and self.ban < len(scores):
            scores[self.ban] = -np.inf
        return scores

    def ttft_ms(self, t0: float) -> float | None:
        return (self.stamps[0] - t0) * 1e3 if self.stamps else None

    def tpot_ms(self) -> float | None:
        """Mean time between consecutive sampled tokens (None with fewer than 2 tokens)."""
        if len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) * 1e3 / (len(self.stamps) - 1)

    def intervals_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def _completion(llm: object, tokens: Sequence[int], n: int, clock: TokenClock) -> None:
    import llama_cpp

    llama_cpp.Llama.create_completion(llm, list(tokens), max_tokens=n, temperature=0.0,  # type: ignore[arg-type]
                                      logits_processor=llama_cpp.LogitsProcessorList([clock]))


def time_ttft(llm: object, tokens: Sequence[int]) -> float:
    """Milliseconds from a ``create_completion`` call on an empty cache to the first token's logits (prefill of
    ``tokens`` plus llama-cpp-python's own overhead: what a served request sees)."""
    _clear(llm)
    clock = TokenClock()
    t0 = time.perf_counter()
    _completion(llm, tokens, 1, clock)
    return float(clock.ttft_ms(t0))  # type: ignore[arg-type]


def time_tpot(llm: object, tokens: Sequence[int], n_decode: int) -> list[float]:
    """Per-token milliseconds of ``n_decode`` greedy tokens generated after ``tokens`` (EOS banned)."""
    _clear(llm)
    clock = TokenClock(ban=int(llm.token_eos()))  # type: ignore[attr-defined]
    _completion(llm, tokens, n_decode + 1, clock)
    return clock.intervals_ms()


def measure(
    model_path: str | os.PathLike[str],
    *,
    n_threads: int | None = None,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    runs: int = 3,
    n_decode: int = 16,
    decode_context: int = 64,
    levels: Sequence[int] | None = None,
    llm: object | None = None,
    scorers: Mapping[str, Callable[[int], float]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyProfile:
    """Measure a :class:`LatencyProfile` of ``model_path`` on this machine (see the module docstring).

    Args:
        n_threads: llama.cpp threads (default: llama-cpp-python's default, half the CPUs).
        lengths: prompt lengths (tokens) at which TTFT is timed.
        runs: interleaved rounds; every (level, length) is timed once per round and the median is kept.
        n_decode: decode steps per round for TPOT, after a ``decode_context``-token prompt.
        levels: level indices to profile (-1 = dense); default every level and the dense model.
        llm: an already loaded :class:`ElasticLlama` of ``model_path`` to time (its threads are used).
        scorers: name -> function(n_tokens) returning the milliseconds a prompt scorer took over ``n_tokens``
            target tokens; timed at every length in the same rounds.
    """
    from .runtime import ElasticLlama

    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise ProfileError(f"prompt lengths must be positive, got {lengths}")
    if runs < 1 or n_decode < 1:
        raise ProfileError("runs and n_decode must be >= 1")
    say = progress or (lambda s: log.info("%s", s))
    fp = model_fingerprint(model_path)
    own = llm is None
    if llm is None:
        n_ctx = max(max(lengths), decode_context + n_decode) + 8
        kw: dict[str, object] = dict(n_ctx=n_ctx, n_batch=512, n_ubatch=512, verbose=False)
        if n_threads is not None:
            kw["n_threads"] = kw["n_threads_batch"] = int(n_threads)
        llm = ElasticLlama(os.fspath(model_path), **kw)
    n_ctx_have = llm.n_ctx()  # type: ignore[attr-defined]
    if max(lengths) > n_ctx_have or decode_context + n_decode > n_ctx_have:
        raise ProfileError(f"prompt length {max(lengths)} (or decode context) exceeds the context size {n_ctx_have}")
    all_levels = {li.index: li.ratio for li in llm.levels}  # type: ignore[attr-defined]
    sel = list(all_levels) if levels is None else [int(x) for x in levels]
    for lv in sel:
        if lv not in all_levels:
            raise ProfileError(f"level {lv} does not exist in {model_path} (levels {sorted(all_levels)})")
    before = llm.level  # type: ignore[attr-defined]
    tok = {n: filler_tokens(llm, n) for n in lengths}
    dec_prompt = filler_tokens(llm, decode_context)
    ttft: dict[tuple[int, int], list[float]] = {(lv, n): [] for lv in sel for n in lengths}
    tpot: dict[int, list[float]] = {lv: [] for lv in sel}
    sc: dict[tuple[str, int], list[float]] = {(name, n): [] for name in (scorers or {}) for n in lengths}
    t_start = time.time()
    try:
        for lv in sel:  # warm-up: page in the weights, build the graphs of both batch shapes
            llm.set_level(lv)  # type: ignore[attr-defined]
            time_ttft(llm, tok[lengths[0]])
            time_tpot(llm, dec_prompt[:8], 2)
        for name, fn in (scorers or {}).items():
            fn(lengths[0])
        for r in range(runs):
            for lv in sel:
                llm.set_level(lv)  # type: ignore[attr-defined]
                for n in lengths:
                    ttft[(lv, n)].append(time_ttft(llm, tok[n]))
                tpot[lv].extend(time_tpot(llm, dec_prompt, n_decode))
            for name, fn in (scorers or {}).items():
                for n in lengths:
                    sc[(name, n)].append(float(fn(n)))
            say(f"round {r + 1}/{runs}: " + ", ".join(
                f"L{lv} {statistics.median(ttft[(lv, lengths[-1])]):.0f} ms@{lengths[-1]}" for lv in sel))
    finally:
        if not own:
            llm.set_level(before)  # type: ignore[attr-defined]
    lvl_profiles = {}
    for lv in sel:
        curve = Curve.fit([(n, statistics.median(ttft[(lv, n)])) for n in lengths])
        by_pos = [statistics.median(tpot[lv][i::n_decode]) for i in range(n_decode)]  # runs x n_decode, in order
        lvl_profiles[lv] = LevelProfile(level=lv, ratio=float(all_levels[lv]), ttft=curve,
                                        tpot_ms=float(statistics.median(tpot[lv])),
                                        tpot_samples=[round(x, 4) for x in tpot[lv]],
                                        tpot_by_position=[round(x, 4) for x in by_pos])
    scorer_curves = {name: Curve.fit([(n, statistics.median(sc[(name, n)])) for n in lengths])
                     for name in (scorers or {})}
    import importlib.metadata as md

    try:
        version = md.version("elms-gguf")
    except md.PackageNotFoundError:
        version = "dev"
    prof = LatencyProfile(
        model={**fp, "path": os.path.abspath(os.fspath(model_path))},
        device=device_info(int(llm.n_threads), int(llm.n_threads_batch)),  # type: ignore[attr-defined]
        levels=lvl_profiles,
        scorers=scorer_curves,
        meta={"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - t_start, 1),
              "lengths": lengths, "runs": runs, "n_decode": n_decode, "decode_context": decode_context,
              "n_batch": int(llm.n_batch), "elms_gguf": version,  # type: ignore[attr-defined]
              "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "raw_ttft_ms": {f"{lv}@{n}": [round(x, 3) for x in v] for (lv, n), v in ttft.items()}},
    )
    if own:
        llm.close() if hasattr(llm, "close") else None  # type: ignore[attr-defined]
    return prof


# --------------------------------------------------------------------------------------------------
# calibration: from median predictions to a quantile


@dataclass
class LatencyCalibration:
    """How served requests' measured latencies compare with the profile's predictions, and the margins to plan
    with so that a ``quantile`` of requests meets its SLO.

    A profile predicts *medians* of a tight, quiet loop. A served request also pays tokenization, the level switch
    and Python around the prefill, and shares the CPU with whatever else runs: its measured/predicted ratio spreads
    around 1 (on the 2-vCPU dev VM, p90 1.2-1.4). Planning against ``predicted x q-quantile(ratio)`` (the margins)
    makes about ``q`` of the requests meet their SLO, if future requests spread like recent ones.

    Until ``min_observed`` requests have been observed, the margin is the larger of the quantile of the profile's
    own repeated samples over its fitted values (:meth:`from_profile`) and that of the requests observed so far
    (with few requests, their slowest): served requests pay costs the profile's loop does not see (on Qwen2.5-0.5B
    1.1-1.3x), and pooled with a prior of ~100 samples near 1 the first requests would not move the margin. After
    that only the last ``window`` requests count. A margin is never below ``floor`` (default 1: a run of fast
    requests does not let the planner undercut the profile).
    """

    quantile: float = 0.95
    window: int = 200
    min_observed: int = 20
    floor: float = 1.0
    prior_ttft: list[float] = field(default_factory=list)
    prior_tpot: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (0.0 < float(self.quantile) < 1.0):
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile!r}")
        if self.window < 1 or self.min_observed < 0:
            raise ValueError("window must be >= 1 and min_observed >= 0")

    @classmethod
    def from_profile(cls, profile: "LatencyProfile", *, quantile: float = 0.95, **kwargs: object) -> "LatencyCalibration":
        """The prior: every raw TTFT sample over its curve's value, every TPOT sample over its position's median."""
        raw = profile.meta.get("raw_ttft_ms", {}) if isinstance(profile.meta, dict) else {}
        prior_ttft = []
        for key, samples in (raw or {}).items():  # type: ignore[union-attr]
            lv, _, n = str(key).partition("@")
            if int(lv) in profile.levels:
                pred = profile.ttft_ms(int(lv), float(n))
                prior_ttft += [float(x) / pred for x in samples if pred > 0]  # type: ignore[union-attr]
        prior_tpot = []
        for lp in profile.levels.values():
            pos = lp.tpot_by_position
            if pos and lp.tpot_samples:
                prior_tpot += [x / pos[i % len(pos)] for i, x in enumerate(lp.tpot_samples) if pos[i % len(pos)] > 0]
        return cls(quantile=quantile, prior_ttft=prior_ttft, prior_tpot=prior_tpot, **kwargs)  # type: ignore[arg-type]

    def observe(self, *, predicted_ttft_ms: float | None, measured_ttft_ms: float | None,
                predicted_tpot_ms: float | None = None, measured_tpot_ms: float | None = None) -> None:
        """Record one served request (values that are missing or not positive are skipped)."""
        for pred, meas, buf in ((predicted_ttft_ms, measured_ttft_ms, self.ttft),
                                (predicted_tpot_ms, measured_tpot_ms, self.tpot)):
            if pred and meas and pred > 0 and meas > 0 and math.isfinite(pred) and math.isfinite(meas):
                buf.append(float(meas) / float(pred))
                del buf[: max(0, len(buf) - self.window)]

    def _margin(self, observed: list[float], prior: list[float]) -> float:
        if len(observed) >= self.min_observed:
            pools = [observed]
        else:  # the larger of the two: a few served requests must not be diluted by a large prior
            pools = [p for p in (prior, observed) if p]
        qs = [float(np.quantile(p, self.quantile, method="higher")) for p in pools]
        return max([self.floor] + qs)

    def margins(self) -> tuple[float, float]:
        """(TTFT, TPOT) multipliers for the predictions the planner tests against the SLO."""
        return self._margin(self.ttft, self.prior_ttft), self._margin(self.tpot, self.prior_tpot)

    def summary(self) -> dict[str, object]:
        mt, mp = self.margins()
        return {"quantile": self.quantile, "margin_ttft": round(mt, 4), "margin_tpot": round(mp, 4),
                "observed": len(self.ttft), "prior": len(self.prior_ttft)}


# --------------------------------------------------------------------------------------------------
# CLI


def _parse_ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="elms-profile",
        description="Measure the TTFT/TPOT latency profile of every level of an elastic GGUF on this device "
                    "(patched llama.cpp, in process) and save it as JSON for SLO-driven serving.")
    ap.add_argument("model", help="the (elastic) GGUF to profile; a plain GGUF gives a dense-only profile")
    ap.add_argument("-t", "--threads", type=int, default=None,
                    help="llama.cpp threads (default: llama-cpp-python's default, half the CPUs); "
                         "serve with the same count")
    ap.add_argument("--lengths", type=_parse_ints, default=list(DEFAULT_LENGTHS),
                    help="prompt lengths in tokens (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds; medians are kept (default 3)")
    ap.add_argument("--decode", type=int, default=16, help="decode steps per round for TPOT (default 16)")
    ap.add_argument("--levels", type=_parse_ints, default=None,
                    help="level indices to profile, -1 = dense (default: all)")
    ap.add_argument("--tlm", default=None, help="also time this TLM GGUF (elms_gguf.tlm) as a prompt scorer")
    ap.add_argument("--selfinfo", action="store_true",
                    help="also time the target model's own self-information scorer (the TLM-free baseline)")
    ap.add_argument("-o", "--output", default=None,
                    help="output JSON (default: <profile dir>/<model checksum>-<cpu>-t<threads>.json; "
                         "ELMS_PROFILE_DIR sets the directory)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        from .runtime import ElasticLlama

        if not os.path.isfile(args.model):
            raise ProfileError(f"model file not found: {args.model}")
        lengths = sorted(set(args.lengths))
        kw: dict[str, object] = dict(n_ctx=max(max(lengths), 64 + args.decode) + 8, n_batch=512, n_ubatch=512,
                                     verbose=False)
        if args.threads is not None:
            kw["n_threads"] = kw["n_threads_batch"] = args.threads
        llm = ElasticLlama(args.model, **kw)
        scorers: dict[str, Callable[[int], float]] = {}
        if args.tlm or args.selfinfo:
            from . import compress

            text_words = compress.split_words(_FILLER * (1 + max(lengths) // 20))
            if args.tlm:
                from .tlm import TLMScorer

                tlm = TLMScorer(args.tlm, n_threads=int(llm.n_threads))
                scorers[tlm.name] = compress.scorer_timer(tlm, llm, text_words)
            if args.selfinfo:
                si = compress.SelfInfoScorer(llm, level=compress.smallest_level(llm))
                scorers[si.name] = compress.scorer_timer(si, llm, text_words)
        prof = measure(args.model, lengths=lengths, runs=args.runs, n_decode=args.decode, levels=args.levels,
                       llm=llm, scorers=scorers)
        out = args.output or default_profile_path(args.model, prof.n_threads, prof.n_threads_batch,
                                                  fingerprint=prof.model)
        prof.save(out)
    except (ProfileError, FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("elms-profile: %s", e)
        return 1
    print(prof.summary())
    print(f"saved {out}")
    return 0


__all__ = [
    "SLO", "SLOError", "ProfileError", "LatencyProfile", "LevelProfile", "LatencyCalibration", "Curve", "fit_quadratic",
    "model_fingerprint", "cpu_model", "device_info", "thread_key", "default_profile_path", "find_profile", "profile_dir",
    "measure", "time_ttft", "time_tpot", "filler_tokens", "TokenClock", "main", "PROFILE_VERSION",
]

if __name__ == "__main__":
    sys.exit(main())
