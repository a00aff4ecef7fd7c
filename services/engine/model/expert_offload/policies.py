"""Eviction policies of the hot-expert cache: which resident expert leaves for a missing one.

- ``lru``: the least recently used.
- ``lfu``: the least often used since start (counts survive eviction), ties to the least recent.
- ``decay``: the lowest frequency with exponential decay: each use adds 1 to a score that
  is multiplied by ``DECAY`` every step, so recent popularity counts more than old.

Default: ``decay``, by measurement (hit rates, same slots, no prefetch; 2-core shared box):
- recorded routing traces of tiny-qwen3-moe (8 experts, random weights: near-uniform routing;
  ``tandem bench moe --model tiny-qwen3-moe --fractions 0.25,0.5 --policies``):
  2 slots: lru 0.241, lfu 0.246, decay 0.243, Belady 0.251; 4 slots: lru 0.498, lfu 0.508,
  decay 0.498, Belady 0.559. All within a point: random routers leave little to learn.
- synthetic Zipf(1.1) traces over 16 experts, top-2 (bench/moe_policy_replay.py),
  4 / 8 slots, one token per step: static hot set lru 0.466 / 0.716, lfu 0.565 / 0.787,
  decay 0.526 / 0.732 (Belady 0.639 / 0.851); hot set reshuffled every 200 steps: lru
  0.462 / 0.717, lfu 0.425 / 0.673, decay 0.519 / 0.730. Eight tokens per step, reshuffled:
  lru 0.291 / 0.594, lfu 0.298 / 0.571, decay 0.311 / 0.625 (static: lfu 0.311 / 0.634 best).
LFU wins while popularity stays put and loses most when it moves (its counts never forget);
LRU ignores popularity; decay is the best when the hot set moves and within 4 points of LFU
when it stays put.
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
DEFAULT_POLICY = "decay"
