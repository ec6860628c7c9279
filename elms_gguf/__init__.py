"""elms-gguf: the ELMS elastic-LLM design on llama.cpp and GGUF.

One GGUF holds nested sub-models ("levels"); a patched llama.cpp runs any level through zero-copy views.

Modules, one per pipeline stage:

* :mod:`elms_gguf.contract`    -- GGUF key names and width rules (shared by everything below)
* :mod:`elms_gguf.model`       -- PyTorch reference forward + GGUF reading/writing
* :mod:`elms_gguf.convert`     -- ``elms-convert``: importance, anchors, allocation, reordering, level tables
  (helpers: :mod:`~elms_gguf.calib`, :mod:`~elms_gguf.tokenizer`, :mod:`~elms_gguf.importance`,
  :mod:`~elms_gguf.measure`, :mod:`~elms_gguf.allocate`)
* :mod:`elms_gguf.truncate`    -- physically truncated export of one level
* :mod:`elms_gguf.lora`        -- per-level LoRA adapter GGUFs (:mod:`~elms_gguf.train_lora`: ``elms-train-lora``)
* :mod:`elms_gguf.runtime`     -- ctypes bindings for the patched llama.cpp and :class:`ElasticLlama`
* :mod:`elms_gguf.evaluate`    -- ``elms-eval``: accuracy and perplexity of every level through llama.cpp
* :mod:`elms_gguf.profile`     -- ``elms-profile``: TTFT/TPOT latency profile of this device, :class:`SLO`
* :mod:`elms_gguf.compress`    -- word-level prompt compression (TLM: :mod:`~elms_gguf.tlm`, ``elms-train-tlm``)
* :mod:`elms_gguf.orchestrate` -- choose (prompt ratio, level) for an SLO from the profile
* :mod:`elms_gguf.serve`       -- :class:`ElasticLlama` with ``slo=`` / ``context=`` requests
"""
from __future__ import annotations

__version__ = "0.1.0"

from .contract import ContractError, ElasticSpec, Level, ModelDims  # noqa: F401  (re-exported)


def __getattr__(name: str):  # lazy: importing the runtime loads libllama
    if name in ("ElasticLlama",):
        from .runtime import ElasticLlama

        return ElasticLlama
    raise AttributeError(name)
