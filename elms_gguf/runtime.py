"""Run elastic GGUFs from Python: ctypes bindings for the patched llama.cpp and :class:`ElasticLlama`.

Layers, as in llama-cpp-python:

* :func:`lib` -- the libllama that llama-cpp-python loaded, with the ELMS C API bound
  (``llama_model_n_elastic_levels``, ``llama_set_elastic_level`` ...; see ``patches/0001``);
* :class:`ElasticLlama` -- a :class:`llama_cpp.Llama` that runs one level of an elastic GGUF and switches level
  in place (a pointer change plus a KV-cache reset, never a reload). It works for dense GGUFs too.

The patched libraries come from ``tools/build_llama.sh`` (``build/llama/bin``); ``make setup`` installs
llama-cpp-python from the same sdist bound to them. ``ELMS_LLAMA_LIB_DIR`` points elsewhere if needed.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

from . import contract

log = logging.getLogger(__name__)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LIB_DIR = os.path.join(_REPO_ROOT, "build", "llama", "bin")

LORA_POLICIES = ("required", "optional", "off")


class ElasticError(RuntimeError):
    """The runtime refused a level or ratio; the message is llama.cpp's reason."""


def _point_llama_cpp_at_patched_libs() -> None:
    """Make llama-cpp-python load the patched libllama, unless its own lib/ already holds one."""
    if "LLAMA_CPP_LIB_PATH" in os.environ:
        return
    lib_dir = os.environ.get("ELMS_LLAMA_LIB_DIR", DEFAULT_LIB_DIR)
    if os.path.isfile(os.path.join(lib_dir, "libllama.so")):
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        own = os.path.join(os.path.dirname(spec.origin), "lib", "libllama.so") if spec and spec.origin else ""
        if not os.path.exists(own):
            os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir


_point_llama_cpp_at_patched_libs()

import llama_cpp  # noqa: E402  (after the library path is settled)
import llama_cpp.llama_cpp as _ll  # noqa: E402

_bound = False
_bind_lock = threading.Lock()


def lib() -> ctypes.CDLL:
    """The loaded libllama with the ELMS functions bound; a clear error if it is not the patched one."""
    global _bound
    cdll = _ll._lib
    with _bind_lock:
        if not _bound:
            try:
                f = cdll.llama_model_n_elastic_levels
            except AttributeError:
                raise ElasticError(
                    f"libllama loaded by llama-cpp-python ({getattr(cdll, '_name', '?')}) is not patched by elms-gguf "
                    "(no llama_model_n_elastic_levels): run `make setup`, or set ELMS_LLAMA_LIB_DIR"
                ) from None
            f.argtypes, f.restype = [ctypes.c_void_p], ctypes.c_int32
            f = cdll.llama_model_elastic_ratio
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_float
            f = cdll.llama_set_elastic_level
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_int32
            f = cdll.llama_set_elastic_ratio
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_float], ctypes.c_int32
            f = cdll.llama_get_elastic_level
            f.argtypes, f.restype = [ctypes.c_void_p], ctypes.c_int32
            f = cdll.llama_elastic_last_error
            f.argtypes, f.restype = [], ctypes.c_char_p
            _bound = True
    return cdll


def last_error() -> str:
    return (lib().llama_elastic_last_error() or b"").decode("utf-8", "replace")


# llama-cpp-python's Llama has no argument for use_extra_bufts; elastic levels need it off (repacked weights
# cannot be sliced), so the default model params are adjusted while an ElasticLlama loads its model.
_load_lock = threading.Lock()


@contextlib.contextmanager
def _elastic_load_env(lora_policy: str, errors: list[str]) -> Iterator[None]:
    """Load without repacking, with the adapter policy, recording llama.cpp's error lines into ``errors``."""
    from llama_cpp import _logger

    with _load_lock:
        orig_defaults = _ll.llama_model_default_params
        orig_env = os.environ.get("LLAMA_ELMS_LORA")

        def defaults_without_repack() -> "_ll.llama_model_params":
            p = orig_defaults()
            p.use_extra_bufts = False
            return p

        @_ll.llama_log_callback
        def record(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR in this ggml (llama-cpp-python's _logger maps it as DEBUG)
                errors.append(text.decode("utf-8", "replace").strip())
            _logger.llama_log_callback(level, text, user_data)

        _ll.llama_model_default_params = defaults_without_repack  # type: ignore[assignment]
        os.environ["LLAMA_ELMS_LORA"] = lora_policy
        _ll.llama_log_set(record, ctypes.c_void_p(0))
        try:
            yield
        finally:
            _ll.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
            _ll.llama_model_default_params = orig_defaults  # type: ignore[assignment]
            if orig_env is None:
                os.environ.pop("LLAMA_ELMS_LORA", None)
            else:
                os.environ["LLAMA_ELMS_LORA"] = orig_env


@dataclass(frozen=True)
class LevelInfo:
    index: int          # -1 = dense
    ratio: float


@functools.lru_cache(maxsize=None)
def _warn_if_openmp_sleeps() -> None:
    """Once per process: llama.cpp's CPU backend waits on an OpenMP barrier at every graph node, and under
    ``OMP_WAIT_POLICY=PASSIVE`` each wait is a sleep, which halves decode speed (see :mod:`elms_gguf.cli`)."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        log.warning("OMP_WAIT_POLICY=PASSIVE: llama.cpp's CPU threads sleep at every graph barrier, so decoding "
                    "runs about half as fast; unset it for serving, profiling and benchmarks")


class ElasticLlama(llama_cpp.Llama):
    """A :class:`llama_cpp.Llama` that runs one level of an elastic (ELMS) GGUF.

    >>> llm = ElasticLlama("smollm2-elastic.gguf", ratio=0.6, n_ctx=2048)   # doctest: +SKIP
    >>> llm.levels                                                          # doctest: +SKIP
    [LevelInfo(index=0, ratio=0.5), ..., LevelInfo(index=-1, ratio=1.0)]
    >>> llm.set_ratio(0.8)        # pointer change + KV-cache reset          # doctest: +SKIP

    Args (keyword-only, on top of every :class:`llama_cpp.Llama` argument):
        ratio: run the level whose ratio is nearest (1.0 = the dense model).
        level: run this level index (-1 = dense); give ``ratio`` or ``level``, not both.
        elms_lora: per-level LoRA adapters named by the model: ``"required"`` (a missing, corrupt or foreign
            adapter is an error), ``"optional"`` (warning, level runs without it) or ``"off"``.

    The model is always loaded without weight repacking (repacked weights cannot be sliced), so a dense
    model loaded through this class may run slower than through plain ``Llama`` on CPUs that repack its type.
    """

    def __init__(
        self,
        model_path: str,
        *,
        ratio: Optional[float] = None,
        level: Optional[int] = None,
        elms_lora: str = "required",
        **kwargs: object,
    ) -> None:
        if ratio is not None and level is not None:
            raise ValueError("give ratio= or level=, not both")
        if ratio is not None:
            ratio = contract.check_ratio(ratio)
        if elms_lora not in LORA_POLICIES:
            raise ValueError(f"elms_lora must be one of {LORA_POLICIES}, got {elms_lora!r}")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"model file not found: {model_path}")
        lib()  # fail early and clearly on an unpatched libllama
        _warn_if_openmp_sleeps()
        errors: list[str] = []
        with _elastic_load_env(elms_lora, errors):
            try:
                super().__init__(model_path, **kwargs)  # type: ignore[arg-type]
            except ValueError as e:
                reason = "; ".join(errors) or str(e)
                raise ElasticError(f"cannot load {model_path}: {reason}") from e
        if ratio is not None:
            self.set_ratio(ratio)
        elif level is not None:
            self.set_level(level)

    # -- queries ------------------------------------------------------------------------------------------

    @property
    def n_levels(self) -> int:
        return int(lib().llama_model_n_elastic_levels(self._model.model))

    @property
    def levels(self) -> list[LevelInfo]:
        """Every level of the model, smallest first, then the dense model (index -1, ratio 1.0)."""
        cdll = lib()
        out = [LevelInfo(i, float(cdll.llama_model_elastic_ratio(self._model.model, i))) for i in range(self.n_levels)]
        return out + [LevelInfo(-1, 1.0)]

    @property
    def level(self) -> int:
        """The level the context runs (-1: dense)."""
        return int(lib().llama_get_elastic_level(self._ctx.ctx))

    @property
    def ratio(self) -> float:
        lvl = self.level
        return 1.0 if lvl < 0 else float(lib().llama_model_elastic_ratio(self._model.model, lvl))

    # -- switching ----------------------------------------------------------------------------------------

    def set_level(self, level: int) -> None:
        """Run level ``level`` (-1 = dense). Clears the KV cache: it holds another sub-model's K/V."""
        if level == self.level:
            return
        if self.n_levels == 0 and level != -1:
            raise ElasticError(f"{self.model_path} is not an elastic model (no elms.* keys): only level -1 (dense) exists")
        if lib().llama_set_elastic_level(self._ctx.ctx, int(level)) != 0:
            raise ElasticError(last_error())
        self._clear_cache()

    def set_ratio(self, ratio: float) -> int:
        """Run the level nearest to ``ratio`` in (0, 1]; returns its index (-1 = dense). Clears the KV cache."""
        ratio = contract.check_ratio(ratio)
        if self.n_levels == 0:
            if ratio != 1.0:
                raise ElasticError(f"{self.model_path} is not an elastic model (no elms.* keys): only ratio 1.0 exists")
            return -1
        before = self.level
        lvl = int(lib().llama_set_elastic_ratio(self._ctx.ctx, ctypes.c_float(ratio)))
        if lvl < -1:
            raise ElasticError(last_error())
        if lvl != before:
            self._clear_cache()
        return lvl

    def _clear_cache(self) -> None:
        # forget every cell (data=False: no need to zero the buffers, empty cells are masked and overwritten)
        mem = _ll.llama_get_memory(self._ctx.ctx)
        if mem is not None:
            _ll.llama_memory_clear(mem, False)
        self.reset()  # llama-cpp-python reuses cached prefixes otherwise


__all__ = ["ElasticLlama", "ElasticError", "LevelInfo", "lib", "last_error", "DEFAULT_LIB_DIR"]
