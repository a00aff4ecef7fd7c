"""Where a model comes from: the one home of the default model and of model names.

A model argument (``LLM(model=...)``, ``tandem serve --model``, ``args.model`` in a Serve YAML)
is one of:
- a name in ``NAMED_MODELS`` (e.g. the model trained in-repo, ``embedded``);
- a checkpoint folder (config.json, *.safetensors, tokenizer.json);
- ``None``: the default model (``default_model_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def embedded_model_path() -> Path:
    """The small Llama model trained by services/engine/default_model/train.py (committed)."""
    return Path(__file__).parent / "default_model" / "weights"


# name -> function returning the model's path (resolved lazily: a name may need an installed package)
NAMED_MODELS: dict[str, Callable[[], Path]] = {"embedded": embedded_model_path}


def default_model_path() -> Path:
    """The model served when none is given."""
    return embedded_model_path()


def resolve_model(model: str | Path | None) -> str:
    """A model name, path or None (the default) -> the path to load."""
    if model is None or model == "":
        return str(default_model_path())
    if str(model) in NAMED_MODELS:
        return str(NAMED_MODELS[str(model)]())
    return str(model)


def check_model_path(path: str | Path) -> None:
    """ValueError unless ``path`` holds a checkpoint the engine can load."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"no checkpoint (config.json) in {str(path)!r}; known model names: {sorted(NAMED_MODELS)}")
