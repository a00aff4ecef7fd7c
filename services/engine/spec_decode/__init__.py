"""Speculative decoding: proposers of draft tokens, chosen by the engine config's ``speculative``
section (vLLM's ``speculative_config``: ``{"method": ..., "num_speculative_tokens": k, ...}``).

Each proposer is one module in this package that registers a factory ``(options, deps) ->
Proposer`` with ``PROPOSERS.register(method, options=OptionsDataclass)``; the registry imports
the modules of this package on first use. None is registered yet: a config that names a method
fails at build time with the list of available ones.
"""

from services.engine.plugins import Registry

PROPOSERS: Registry = Registry("speculative", name_key="method", discover=__name__)

__all__ = ["PROPOSERS"]
