"""Console entry points of the torch-heavy commands (``elms-convert``, ``elms-train-lora``).

They let idle OpenMP workers sleep (``OMP_WAIT_POLICY=PASSIVE``, unless the caller chose a policy): on a shared
2-core machine torch's spinning workers burn ~4x the CPU time of the work itself (converter probes: 29 s vs
6.5 s user time) and make a LoRA training step ~10x slower (11.6 s vs 1.3 s). libgomp reads the policy once, when
it is loaded, so it is set here, *before* the command's module imports torch.

Only in those processes. The policy is process-wide, and llama.cpp's CPU backend waits on an OpenMP barrier at
every graph node: a process that serves, profiles or benchmarks llama.cpp under PASSIVE decodes about half as fast
(Qwen2.5-Coder-0.5B Q4_K_M, 2 threads, ``llama-bench -p 512 -n 32``: tg32 37.9 t/s by default, 18.6 t/s with
``OMP_WAIT_POLICY=PASSIVE``; prefill is unaffected). So importing :mod:`elms_gguf.convert` or
:mod:`elms_gguf.train_lora` as a library changes nothing, and :mod:`elms_gguf.runtime` warns when llama.cpp is
loaded under PASSIVE.
"""
from __future__ import annotations

import os


def sleep_idle_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set; effective only before libgomp loads (torch, llama.cpp)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def convert() -> int:
    sleep_idle_openmp()
    from .convert import main

    return main()


def train_lora() -> int:
    sleep_idle_openmp()
    from .train_lora import main

    return main()
