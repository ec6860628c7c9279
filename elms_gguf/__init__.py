"""elms-gguf: the ELMS elastic-LLM design on llama.cpp and GGUF.

One GGUF holds nested sub-models ("levels"); a patched llama.cpp runs any level through zero-copy views.

Modules, one per pipeline stage:

* :mod:`elms_gguf.contract` -- GGUF key names and width rules (shared by everything below)
* :mod:`elms_gguf.model`    -- PyTorch reference forward + GGUF reading/writing
* :mod:`elms_gguf.convert`  -- ``elms-convert``: importance, anchors, reordering, level tables
* :mod:`elms_gguf.runtime`  -- ctypes bindings for the patched llama.cpp and :class:`ElasticLlama`
"""
from __future__ import annotations

__version__ = "0.1.0"

from .contract import ContractError, ElasticSpec, Level, ModelDims  # noqa: F401


def __getattr__(name: str):  # lazy: importing the runtime loads libllama
    if name in ("ElasticLlama",):
        from .runtime import ElasticLlama

        return ElasticLlama
    raise AttributeError(name)
