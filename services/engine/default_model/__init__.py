"""The embedded default model: a small Llama-architecture model trained offline.

``weights/`` holds an HF-compatible ``LlamaForCausalLM`` checkpoint (config.json,
model.safetensors, generation_config.json, tokenizer.json) produced by
``python -m services.engine.default_model.train --out services/engine/default_model/weights``.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["WEIGHTS_DIR"]
