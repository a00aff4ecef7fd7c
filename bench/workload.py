"""The offline benchmark's workload: prompts, checkpoints, and the machine-load monitor.

Glossary
- prompt: a list of random token ids drawn from [4, min(vocab, 32000)), seeded. The formula
  is the one the anchor benchmarks (../shared/bench-anchors/common.py ``prompts``) use, and
  the seeds follow theirs too, so Tandem, transformers and the recorded vLLM figures see
  exactly the same token ids: batch of c requests -> seed 1000 + c; long-prompt TTFT rep r
  -> seed 100 + 10 * r; warm-up -> seed 7.
- other-CPU share: CPU time used by processes outside this one during a measurement,
  divided by (wall time x CPUs). Above ~0.10 the figures were taken on a busy machine.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO_ROOT / ".bench" / "models"  # gitignored
MAX_PROMPT_TOKEN = 32000  # prompts stay valid for every model's WordLevel tokenizer
DISTURBED = 0.10  # other-CPU share above which a measurement is marked disturbed


@dataclass(frozen=True)
class Workload:
    """What one benchmark run measures (identical for every engine)."""

    concurrencies: tuple[int, ...]  # batch sizes: c requests submitted together
    prompt_len: int  # tokens per prompt of the throughput runs
    output_len: int  # new tokens per request (EOS never stops a request)
    ttft_len: int  # prompt length of the single-request TTFT measurement (0 = skip)
    ttft_reps: int  # TTFT repetitions, each with a fresh prompt (median reported)
    rounds: int = 1  # runs of each concurrency level (tok/s: median round; latencies: all requests)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds: need >= 1, got {self.rounds}")
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrency: need integers >= 1, got {self.concurrencies}")
        if self.prompt_len < 1 or self.output_len < 2:
            raise ValueError("prompt-len must be >= 1 and output-len >= 2 (TPOT needs two tokens)")
        if self.ttft_len < 0 or self.ttft_reps < 1:
            raise ValueError("ttft-len must be >= 0 and ttft-reps >= 1")


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    """``n`` prompts of ``length`` random ids in [4, min(vocab, 32000)) (anchor formula)."""
    high = min(vocab, MAX_PROMPT_TOKEN)
    rng = random.Random(seed * 1000003 + length)
    return [[rng.randrange(4, high) for _ in range(length)] for _ in range(n)]


def batch_prompts(workload: Workload, c: int, vocab: int) -> list[list[int]]:
    """The c prompts of the throughput run at concurrency c."""
    return prompts(c, workload.prompt_len, seed=1000 + c, vocab=vocab)


def ttft_prompt(workload: Workload, rep: int, vocab: int) -> list[int]:
    """The long prompt of TTFT repetition ``rep`` (a different one each rep)."""
    return prompts(1, workload.ttft_len, seed=100 + 10 * rep, vocab=vocab)[0]


def warmup_prompt(vocab: int) -> list[int]:
    return prompts(1, 32, seed=7, vocab=vocab)[0]


def resolve_model(name_or_path: str, cache: Path = MODEL_CACHE) -> Path:
    """A checkpoint: an existing folder or .gguf file as is, a model name of the catalog
    (``smollm2``, ``embedded``: services/engine/model_catalog.py), or a ``make_model`` shape
    name written once (random weights) under ``cache/NAME``."""
    from services.engine.model_catalog import NAMED_MODELS

    path = Path(name_or_path)
    if path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file()):
        return path
    if name_or_path in NAMED_MODELS:
        return NAMED_MODELS[name_or_path]()
    from services.engine.make_model import SHAPES, make_model
    if name_or_path not in SHAPES:
        raise ValueError(f"--model: {name_or_path!r} is neither a folder, a .gguf file, a model name "
                         f"({sorted(NAMED_MODELS)}) nor one of {sorted(SHAPES)}")
    out = cache / name_or_path
    if not (out / "config.json").exists():
        tmp = cache / f".{name_or_path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        make_model(name_or_path, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation) and the mean of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean())}


def _system_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies summed over all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


def _own_cpu_s() -> float:
    """CPU seconds (user + sys, all threads) of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMonitor:
    """``with CpuMonitor() as m: ...`` then ``m.other_cpu_frac``: the share of the machine's
    CPUs that other processes used meanwhile (None where /proc/stat is missing)."""

    other_cpu_frac: float | None = None
    wall_s: float = 0.0

    def __enter__(self) -> "CpuMonitor":
        self._t0, self._own0 = time.perf_counter(), _own_cpu_s()
        try:
            self._busy0, _ = _system_jiffies()
        except OSError:
            self._busy0 = None
        return self

    def __exit__(self, *exc) -> bool:
        self.wall_s = time.perf_counter() - self._t0
        own = _own_cpu_s() - self._own0
        if self._busy0 is not None and self.wall_s > 0:
            busy = (_system_jiffies()[0] - self._busy0) / os.sysconf("SC_CLK_TCK")
            ncpu = os.cpu_count() or 1
            self.other_cpu_frac = max(0.0, (busy - own) / (self.wall_s * ncpu))
        return False
