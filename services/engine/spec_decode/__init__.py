"""Speculative decoding: proposers of draft tokens, chosen by the engine config's ``speculative``
section (vLLM's ``speculative_config``: ``{"method": ..., "num_speculative_tokens": k, ...}``).

Each proposer is one module in this package that registers a factory ``(options, deps) ->
build`` with ``PROPOSERS.register(method, options=OptionsDataclass)``, where ``build(target:
TargetInfo) -> Proposer`` (base.py) runs once the target model is loaded; the registry imports
the modules of this package on first use. Methods: ``ngram`` (ngram.py, prompt lookup) and
``draft_model`` (draft_model.py, a small model in the engine's process). The verifier shared by
all of them is rejection.py; the engine drives them (services/engine/engine.py ``_propose``).
"""

from services.engine.plugins import Registry

PROPOSERS: Registry = Registry("speculative", name_key="method", discover=__name__)

__all__ = ["PROPOSERS"]
