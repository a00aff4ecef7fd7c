"""Weight quantization applied to a built and loaded model (not as branches inside it).

A quantizer is one module in this package registering a factory ``(options, deps) -> Quantizer``
with ``QUANTIZERS.register(name, options=OptionsDataclass)``; a ``Quantizer`` is a callable
``model -> model`` run once at assembly, after the weights are loaded and before the CPU backend
is installed. The registry imports the modules of this package on first use.
"""

from services.engine.plugins import Registry

QUANTIZERS: Registry = Registry("quantization", discover=__name__)

__all__ = ["QUANTIZERS"]
