"""``experts: local``: every expert of every layer resident in this process (``LocalExperts``)."""

from __future__ import annotations

from services.engine.model.expert_backends import EXPERT_BACKENDS
from services.engine.model.experts import ExpertFactory, LocalExperts
from services.engine.plugins import HostDeps, NoOptions


@EXPERT_BACKENDS.register("local")
def local_experts(options: NoOptions, deps: HostDeps) -> ExpertFactory:
    return LocalExperts
