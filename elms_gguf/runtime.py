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

import collections.abc
import contextlib
import ctypes
import functools
import logging
import numbers
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

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


# llama-cpp-python's Llama has no argument for use_extra_bufts (weight repacking), so the default model params are
# adjusted while an ElasticLlama loads its model with repack=False.
_load_lock = threading.Lock()


@contextlib.contextmanager
def _elastic_load_env(lora_policy: str, errors: list[str], repack: bool = True,
                      messages: list[str] | None = None) -> Iterator[None]:
    """Load with the adapter policy and weight repacking on or off, recording llama.cpp's error lines into
    ``errors`` and its info, warning and error text into ``messages``."""
    from llama_cpp import _logger

    with _load_lock:
        orig_defaults = _ll.llama_model_default_params
        orig_env = os.environ.get("LLAMA_ELMS_LORA")

        def defaults_with_repack() -> "_ll.llama_model_params":
            p = orig_defaults()
            p.use_extra_bufts = repack
            return p

        @_ll.llama_log_callback
        def record(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR in this ggml (llama-cpp-python's _logger maps it as DEBUG)
                errors.append(text.decode("utf-8", "replace").strip())
            if messages is not None and level >= 2:  # INFO, WARN, ERROR, CONT
                messages.append(text.decode("utf-8", "replace"))
            _logger.llama_log_callback(level, text, user_data)

        _ll.llama_model_default_params = defaults_with_repack  # type: ignore[assignment]
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


# -- one request at a time on a llama context ---------------------------------------------------------------


class _ContextLock:
    """Who may use one llama context now: one thread at a time, re-entrantly (a request's nested calls:
    completion -> generate -> eval, set_level -> reset ...), or one open stream.

    A stream (what a held call returns when it returns an iterator) keeps holding the context from the call until
    it is exhausted, closed or dropped, whichever thread reads, closes or drops it; other threads' calls wait for
    it. The thread that last opened or read the stream gets a RuntimeError if it starts another call before that
    (waiting for itself would never end). Streams opened by an outermost call that raises are closed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())  # RLock: a stream dropped mid-update closes itself
        self._thread: int | None = None  # the thread running on the context
        self._depth = 0  # its nested holds
        self._streams: "weakref.WeakSet[_HeldStream]" = weakref.WeakSet()  # open streams
        self._stream_reader: int | None = None  # the thread that last opened or read one of them

    def acquire(self, *, stream_step: bool = False) -> bool:
        """Hold the context (a step of an open stream with ``stream_step``); True when this is the outermost hold."""
        me = threading.get_ident()
        with self._cond:
            while True:
                if self._thread == me:
                    break
                if self._thread is None:
                    if stream_step or not self._streams:
                        break
                    if self._stream_reader == me:
                        raise RuntimeError(
                            "a stream of this model is still open (stream=True or generate()): read it to the end "
                            "or close() it before the next call")
                self._cond.wait()
            self._thread = me
            self._depth += 1
            if stream_step:
                self._stream_reader = me
            return self._depth == 1 and not stream_step

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._thread = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the context for a block (the thread's outermost block closes the streams it leaves open on error)."""
        outermost = self.acquire()
        try:
            yield
        except BaseException:
            if outermost:
                for stream in list(self._streams):
                    stream.close()
            raise
        finally:
            self.release()

    def opened(self, stream: "_HeldStream") -> None:
        with self._cond:
            self._streams.add(stream)
            self._stream_reader = threading.get_ident()

    def closed(self, stream: "_HeldStream") -> None:
        with self._cond:
            self._streams.discard(stream)
            if not self._streams:
                self._stream_reader = None
            self._cond.notify_all()


class _HeldStream(collections.abc.Generator):  # type: ignore[type-arg]
    """An iterator (a llama-cpp-python stream or ``generate()``) that holds its model's context from the call that
    returned it until it is exhausted, closed or dropped. ``send`` reaches a generator's ``send``."""

    def __init__(self, lock: _ContextLock, it: Iterator[Any]) -> None:
        self._lock = lock
        self._it = it
        self._open = True
        lock.opened(self)

    def _finish(self) -> None:
        if self._open:
            self._open = False
            self._lock.closed(self)

    def _step(self, fn: Callable[[], Any]) -> Any:
        if not self._open:
            raise StopIteration
        self._lock.acquire(stream_step=True)
        try:
            return fn()
        except BaseException:  # StopIteration, or an error that ended the generator
            self._finish()
            raise
        finally:
            self._lock.release()

    def send(self, value: Any) -> Any:
        if value is None:
            return self._step(lambda: next(self._it))
        return self._step(lambda: self._it.send(value))  # type: ignore[attr-defined]

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        throw = getattr(self._it, "throw", None)
        if throw is None:
            raise typ if val is None else val
        return self._step(lambda: throw(typ, val, tb) if val is not None else throw(typ))

    def close(self) -> None:
        if not self._open:
            return
        self._lock.acquire(stream_step=True)
        try:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        finally:
            self._finish()
            self._lock.release()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self.close()


_F = TypeVar("_F", bound=Callable[..., Any])


def holds_context(method: _F) -> _F:
    """Run ``method`` (of an :class:`ElasticLlama`) holding the model's context lock: calls from other threads wait,
    nested calls re-enter; an iterator it returns (a stream) holds the lock until it is exhausted or closed."""

    @functools.wraps(method)
    def held(self: "ElasticLlama", *args: Any, **kwargs: Any) -> Any:
        lock = self._elms_lock
        with lock.held():
            out = method(self, *args, **kwargs)
            if isinstance(out, collections.abc.Iterator) and not isinstance(out, _HeldStream):
                out = _HeldStream(lock, out)
            return out

    return held  # type: ignore[return-value]



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
        repack: let llama.cpp's CPU backend repack weights into its interleaved layouts (its default, and the
            fast kernels); levels run on prefix views of the repacked weights. ``False`` = plain layout
            (llama.cpp's ``--repack 0``).

    Threads: one instance may be shared. Every call that uses the llama context (completions, chat, ``__call__``,
    ``eval``, ``generate``, ``sample``, ``reset``, embeddings, state, :meth:`set_level`, :meth:`set_ratio`) holds
    the instance's lock, so requests run one at a time; a stream (``stream=True``, ``generate()``) holds it from
    the call until it is read to its end or closed, so read or close streams promptly (the thread that opened a
    stream gets a RuntimeError if it makes another call first). A level switch followed by a request is two
    calls: run them as one unit with :meth:`exclusive` (``with llm.exclusive(level=0): llm.create_completion(...)``),
    or another thread may switch the level in between. ``tokenize``/``detokenize`` (vocabulary only) take no lock.
    """

    def __init__(
        self,
        model_path: str,
        *,
        ratio: Optional[float] = None,
        level: Optional[int] = None,
        elms_lora: str = "required",
        repack: bool = True,
        **kwargs: object,
    ) -> None:
        self._elms_lock = _ContextLock()  # before anything can reach the context (see the class docstring)
        if ratio is not None and level is not None:
            raise ValueError("give ratio= or level=, not both")
        if ratio is not None:
            ratio = contract.check_ratio(ratio)
        if not isinstance(repack, bool):
            raise TypeError(f"repack must be True or False, got {repack!r}")
        if elms_lora not in LORA_POLICIES:
            raise ValueError(f"elms_lora must be one of {LORA_POLICIES}, got {elms_lora!r}")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"model file not found: {model_path}")
        lib()  # fail early and clearly on an unpatched libllama
        _warn_if_openmp_sleeps()
        errors: list[str] = []
        messages: list[str] = []
        with _elastic_load_env(elms_lora, errors, repack=repack, messages=messages):
            try:
                super().__init__(model_path, **kwargs)  # type: ignore[arg-type]
            except ValueError as e:
                reason = "; ".join(errors) or str(e)
                raise ElasticError(f"cannot load {model_path}: {reason}") from e
        #: what llama.cpp logged while loading (buffer types, repacked weights, adapters), for diagnostics
        self.load_log: str = "".join(messages)
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

    @holds_context
    def set_level(self, level: int) -> None:
        """Run level ``level`` (-1 = dense). Clears the KV cache: it holds another sub-model's K/V."""
        if isinstance(level, bool) or not isinstance(level, numbers.Integral):
            raise TypeError(f"level must be an int (a level index, -1 = dense), got {level!r} "
                            f"({type(level).__name__})")
        level = int(level)
        n = self.n_levels
        if n == 0 and level != -1:
            raise ElasticError(f"{self.model_path} is not an elastic model (no elms.* keys): only level -1 (dense) "
                               f"exists, got level {level}")
        if not -1 <= level < n:  # checked here: ctypes would wrap a big int into int32 (2**40 -> level 0)
            raise ElasticError(f"elastic level {level} does not exist in {self.model_path}: valid levels are "
                               f"-1 (dense) to {n - 1}")
        if level == self.level:
            return
        if lib().llama_set_elastic_level(self._ctx.ctx, level) != 0:
            raise ElasticError(last_error())
        self._clear_cache()

    @holds_context
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

    @contextlib.contextmanager
    def exclusive(self, *, level: Optional[int] = None, ratio: Optional[float] = None) -> Iterator["ElasticLlama"]:
        """Hold this model for a block, after switching to ``level`` or ``ratio`` if given: other threads' calls
        wait until the block ends, so the switch and the calls in the block run as one unit.

        >>> with llm.exclusive(level=0):                                        # doctest: +SKIP
        ...     out = llm.create_completion("Hello", max_tokens=8, temperature=0.0)
        """
        if level is not None and ratio is not None:
            raise ValueError(f"give level= or ratio=, not both (got level={level!r}, ratio={ratio!r})")
        with self._elms_lock.held():
            if level is not None:
                self.set_level(level)
            elif ratio is not None:
                self.set_ratio(ratio)
            yield self

    # llama-cpp-python's methods that use the llama context, each holding the lock (see the class docstring)
    create_completion = holds_context(llama_cpp.Llama.create_completion)
    create_chat_completion = holds_context(llama_cpp.Llama.create_chat_completion)
    __call__ = holds_context(llama_cpp.Llama.__call__)
    eval = holds_context(llama_cpp.Llama.eval)
    generate = holds_context(llama_cpp.Llama.generate)
    sample = holds_context(llama_cpp.Llama.sample)
    reset = holds_context(llama_cpp.Llama.reset)
    create_embedding = holds_context(llama_cpp.Llama.create_embedding)
    embed = holds_context(llama_cpp.Llama.embed)
    save_state = holds_context(llama_cpp.Llama.save_state)
    load_state = holds_context(llama_cpp.Llama.load_state)

    def _clear_cache(self) -> None:  # called by set_level / set_ratio, which hold the context
        # forget every cell (data=False: no need to zero the buffers, empty cells are masked and overwritten)
        mem = _ll.llama_get_memory(self._ctx.ctx)
        if mem is not None:
            _ll.llama_memory_clear(mem, False)
        self.reset()  # llama-cpp-python reuses cached prefixes otherwise


__all__ = ["ElasticLlama", "ElasticError", "LevelInfo", "lib", "last_error", "holds_context", "DEFAULT_LIB_DIR"]
