"""The options of one ``tandem distill`` run, and what must not change when it resumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.engine.distill.student import StudentShape
from services.engine.distill.trainer import TrainConfig


@dataclass(frozen=True)
class CorpusConfig:
    """What the target generates and how it is scored."""

    num_prompts: int = 384  # prompts answered (services/engine/distill/prompts.py)
    max_new_tokens: int = 128  # answer length at most
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)  # prompt i is sampled at temperatures[i % n]
    concurrency: int = 48  # requests generated at once (the engine's max_num_seqs)
    top_k: int = 64  # teacher tokens stored per position (the rest is one bucket, loss.py)
    shard_size: int = 64  # prompts per corpus shard file (the unit of resuming generation)
    eval_fraction: float = 0.05  # share of sequences held out of training, for the agreement figure

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "concurrency", "top_k", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures: must be one or more numbers >= 0, got {self.temperatures}")
        if not 0 <= self.eval_fraction < 0.5:
            raise ValueError(f"eval_fraction: must be in [0, 0.5), got {self.eval_fraction}")


@dataclass(frozen=True)
class DistillConfig:
    """One run: target, output folder and every option that shapes the result."""

    target: str  # the target model: a checkpoint folder, a .gguf file or a catalog name (smollm2)
    out_dir: Path  # where the draft checkpoint (and work/, the resumable state) goes
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    shape: StudentShape = field(default_factory=StudentShape)
    train: TrainConfig = field(default_factory=TrainConfig)
    dtype: str = "auto"  # the target engine's dtype while generating and scoring
    threads: int = 2  # torch threads (does not change what is computed, only how fast)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise ValueError("target: a model path or name is required")
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {self.threads}")

    def identity(self) -> dict:
        """The options a resumed run must share with the run that wrote OUT_DIR/work (JSON-able):
        everything but ``out_dir``, ``threads`` and ``checkpoint_every``."""
        train = asdict(self.train)
        train.pop("checkpoint_every")
        return {"target": self.target, "dtype": self.dtype, "corpus": {**asdict(self.corpus),
                "temperatures": list(self.corpus.temperatures)}, "shape": asdict(self.shape), "train": train}


def identity_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``field: was A, now B`` for each option that differs between two ``identity()`` dicts."""
    out = []
    for key in sorted(saved.keys() | current.keys()):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out
