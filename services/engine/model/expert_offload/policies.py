"""Eviction policies of the hot-expert cache: which resident expert leaves for a missing one.

- ``lru``: the least recently used.
- ``lfu``: the least often used since start (counts survive eviction), ties to the least recent.
- ``decay``: the lowest frequency with exponential decay: each use adds 1 to a score that
  is multiplied by ``DECAY`` every step, so recent popularity counts more than old.

Default: ``lru``, by measurement (bench/moe.py --policies, replaying recorded routing traces
through ``cache.replay``; see the README's MoE section for the figures). On the random-weight
checkpoints (tiny-mixtral, tiny-qwen3-moe, moe-1b) routing is near-uniform and all three
land within a point or two of each other, below Belady; on a skewed (Zipf) trace LFU and decay
gain a little at steady state but recover slowly when the hot set moves, which LRU does at
once. LRU is also what Mixtral-offloading uses. Change the default only with a trace from a
trained model that says otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

DECAY = 0.8  # per-step factor of the ``decay`` policy's scores


class EvictionPolicy(ABC):
    """Keeps what it needs to pick a victim; told about every use and eviction of one layer."""

    @abstractmethod
    def use(self, expert: int, step: int) -> None:
        """``expert`` was used (or loaded ahead of use) in ``step`` (steps never decrease)."""

    @abstractmethod
    def victim(self, candidates: Iterable[int], step: int) -> int:
        """The expert among ``candidates`` (resident, non-empty) to evict now."""

    def evicted(self, expert: int) -> None:
        """``expert`` left the cache."""


class LRU(EvictionPolicy):
    def __init__(self):
        self._tick = 0
        self._last: dict[int, int] = {}

    def use(self, expert: int, step: int) -> None:
        self._tick += 1
        self._last[expert] = self._tick

    def victim(self, candidates: Iterable[int], step: int) -> int:
        return min(candidates, key=lambda e: self._last.get(e, 0))

    def evicted(self, expert: int) -> None:
        self._last.pop(expert, None)


class LFU(EvictionPolicy):
    def __init__(self):
        self._tick = 0
        self._count: dict[int, int] = {}
        self._last: dict[int, int] = {}

    def use(self, expert: int, step: int) -> None:
        self._tick += 1
        self._count[expert] = self._count.get(expert, 0) + 1
        self._last[expert] = self._tick

    def victim(self, candidates: Iterable[int], step: int) -> int:
        return min(candidates, key=lambda e: (self._count.get(e, 0), self._last.get(e, 0)))


class DecayedFrequency(EvictionPolicy):
    def __init__(self, decay: float = DECAY):
        self.decay = decay
        self._score: dict[int, tuple[float, int]] = {}  # expert -> (score, step it was last updated)

    def _now(self, expert: int, step: int) -> float:
        score, at = self._score.get(expert, (0.0, step))
        return score * self.decay ** (step - at)

    def use(self, expert: int, step: int) -> None:
        self._score[expert] = (self._now(expert, step) + 1.0, step)

    def victim(self, candidates: Iterable[int], step: int) -> int:
        return min(candidates, key=lambda e: self._now(e, step))


POLICIES = {"lru": LRU, "lfu": LFU, "decay": DecayedFrequency}
DEFAULT_POLICY = "lru"
