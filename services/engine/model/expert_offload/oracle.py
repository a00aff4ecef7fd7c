"""Belady's MIN (Belady 1966, "A study of replacement algorithms for a virtual-storage
computer"): on a miss with a full cache, evict the resident item whose next use is farthest
in the future. It is the most hits any demand-paging policy can get on a known trace; the
``offload`` backend reports it beside its realised hit rate (same trace, same slots).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

_NEVER = float("inf")


def belady_hits(uses: Sequence[int], slots: int) -> int:
    """Hits of MIN on ``uses`` (item ids in order) with ``slots`` places, starting empty.
    Every missed item is brought in (no bypass: the experts must be resident to run).
    O(n log n)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    next_use = [_NEVER] * len(uses)
    last: dict[int, int] = {}
    for i in range(len(uses) - 1, -1, -1):
        next_use[i] = last.get(uses[i], _NEVER)
        last[uses[i]] = i
    resident: dict[int, float] = {}  # item -> its next use
    heap: list[tuple[float, int]] = []  # (-next use, item); stale entries skipped
    hits = 0
    for i, item in enumerate(uses):
        if item in resident:
            hits += 1
        elif len(resident) >= slots:
            while True:
                far, victim = heapq.heappop(heap)
                if resident.get(victim) == -far:
                    del resident[victim]
                    break
        resident[item] = next_use[i]
        heapq.heappush(heap, (-next_use[i], item))
    return hits


def oracle_hit_rate(steps: Sequence[Sequence[int]], slots: int) -> float:
    """MIN's hit rate over a trace of steps (each the experts one layer used in one step, in
    the order it used them); 0.0 for an empty trace."""
    uses = [e for step in steps for e in step]
    return belady_hits(uses, slots) / len(uses) if uses else 0.0
