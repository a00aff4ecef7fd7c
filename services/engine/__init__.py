"""Tandem's inference engine: a plain library (no Ray, no gRPC).

    from services.engine import LLM, SamplingParams
    outputs = LLM(model="path/to/checkpoint").generate(["Hello"], SamplingParams(max_tokens=32))

Public names are imported lazily so that light modules (sampling params, block
bookkeeping) can be used without loading the model code.
"""

import importlib

_EXPORTS = {
    "AsyncEngine": "services.engine.async_engine",
    "CacheConfig": "services.engine.config",
    "EngineConfig": "services.engine.config",
    "SchedulerConfig": "services.engine.config",
    "LLMEngine": "services.engine.engine",
    "LLM": "services.engine.llm",
    "build_engine_config": "services.engine.llm",
    "RequestOutput": "services.engine.outputs",
    "TokenChunk": "services.engine.outputs",
    "SamplingParams": "services.engine.sampling_params",
    "EngineOverloadedError": "services.engine.scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
