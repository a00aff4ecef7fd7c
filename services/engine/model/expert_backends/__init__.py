"""Where MoE expert weights live and run: one module per ``ExpertBackend`` variant.

A module here registers a factory ``(options, deps) -> ExpertFactory`` (an ``ExpertFactory`` is
a callable ``ExpertSpec -> ExpertBackend``, called once per MoE layer; see
services/engine/model/experts.py) with ``EXPERT_BACKENDS.register(name, options=Options)``.
The engine config's ``experts`` section (``{"backend": name, ...options}``) picks one; the
registry imports every module of this package on first use.
"""

from services.engine.plugins import Registry

EXPERT_BACKENDS: Registry = Registry("experts", name_key="backend", discover=__name__)

__all__ = ["EXPERT_BACKENDS"]
