"""``quantization: none``: weights stay in the engine's dtype."""

from __future__ import annotations

from torch import nn

from services.engine.plugins import HostDeps, NoOptions
from services.engine.quantization import QUANTIZERS


@QUANTIZERS.register("none")
def no_quantization(options: NoOptions, deps: HostDeps):
    """The identity quantizer."""

    def apply(model: nn.Module) -> nn.Module:
        return model

    return apply
