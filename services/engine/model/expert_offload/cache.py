"""The hot-expert cache of one MoE layer: which expert is in which slot, what to evict, counters.

Pure bookkeeping: the bytes move through the ``fill`` callback (``fill([(expert, slot), ...])``
loads those experts into those slots, all at once), so the same class runs the real backend
and the policy replays of ``replay``.

Invariants: ``slot_of`` and ``expert_in`` are inverse maps over occupied slots; at most
``num_slots`` experts are resident; an expert handed out by ``acquire`` stays in its slot until
the caller asks for the next one (the caller computes with it in between).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

from services.engine.model.expert_offload.oracle import belady_hits
from services.engine.model.expert_offload.policies import EvictionPolicy

Fill = Callable[[list[tuple[int, int]]], None]  # [(expert, slot)] -> those experts loaded


class ExpertCache:
    def __init__(self, num_slots: int, expert_bytes: int, policy: EvictionPolicy, fill: Fill,
                 trace_steps: int = 1024):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.expert_bytes = expert_bytes
        self.policy = policy
        self.fill = fill
        self.slot_of: dict[int, int] = {}  # resident expert -> its slot
        self.expert_in: dict[int, int] = {}  # occupied slot -> its expert
        self.step = 0
        self.hits = self.misses = self.prefetch_loads = self.prefetch_hits = self.bytes_loaded = 0
        self._prefetched: set[int] = set()  # loaded by prefetch, not used since
        self.trace: deque[list[tuple[int, bool]]] = deque(maxlen=trace_steps)  # per step: (expert, hit) uses
        self._window, self._window_step = (0, 0, 0), 0  # last ``window()`` result and the step it was taken

    def acquire(self, needed: Sequence[int]) -> Iterator[tuple[int, int]]:
        """Yield ``(expert, slot)`` for every expert of one step's ``needed`` (distinct): the
        resident ones first, then the missing ones, loaded ``num_slots`` at a time in one
        ``fill`` each (a step that needs more experts than slots runs in rounds)."""
        self.step += 1
        uses: list[tuple[int, bool]] = []
        if self.trace.maxlen:
            self.trace.append(uses)
        resident = [e for e in needed if e in self.slot_of]
        missing = [e for e in needed if e not in self.slot_of]
        for e in resident:
            self._count_use(e, hit=True, uses=uses)
            yield e, self.slot_of[e]
        for start in range(0, len(missing), self.num_slots):
            chunk = missing[start:start + self.num_slots]
            pairs = [(e, self._place(e, set(chunk))) for e in chunk]
            self.fill(pairs)
            self.bytes_loaded += len(pairs) * self.expert_bytes
            for e, slot in pairs:
                self._count_use(e, hit=False, uses=uses)
                yield e, slot

    def prefetch(self, ranked: Sequence[int]) -> int:
        """Load the first ``num_slots`` of ``ranked`` (predicted experts, most wanted first)
        that are not resident, in one ``fill``; returns how many were loaded."""
        wanted = list(dict.fromkeys(ranked))[:self.num_slots]
        step = self.step + 1  # the step these are for
        for e in wanted:
            if e in self.slot_of:
                self.policy.use(e, step)  # keep it: it is predicted again
        missing = [e for e in wanted if e not in self.slot_of]
        pairs = [(e, self._place(e, set(wanted))) for e in missing]
        if pairs:
            self.fill(pairs)
        for e, _ in pairs:
            self.policy.use(e, step)
            self._prefetched.add(e)
        self.prefetch_loads += len(pairs)
        self.bytes_loaded += len(pairs) * self.expert_bytes
        return len(pairs)

    def _place(self, expert: int, keep: set[int]) -> int:
        """A slot for ``expert``: a free one, else the policy's victim's (never one of ``keep``)."""
        if len(self.expert_in) < self.num_slots:
            slot = next(s for s in range(self.num_slots) if s not in self.expert_in)
        else:
            victim = self.policy.victim([e for e in self.slot_of if e not in keep], self.step)
            slot = self.slot_of.pop(victim)
            self.policy.evicted(victim)
            self._prefetched.discard(victim)
        self.slot_of[expert] = slot
        self.expert_in[slot] = expert
        return slot

    def _count_use(self, expert: int, hit: bool, uses: list) -> None:
        if hit:
            self.hits += 1
            if expert in self._prefetched:
                self.prefetch_hits += 1
        else:
            self.misses += 1
        self._prefetched.discard(expert)
        self.policy.use(expert, self.step)
        uses.append((expert, hit))

    @property
    def resident_bytes(self) -> int:
        return len(self.slot_of) * self.expert_bytes

    def window(self) -> tuple[int, int, int]:
        """(uses, hits, Belady's hits) over the recorded trace (the last ``trace_steps`` steps).
        MIN costs O(n log n) in Python, so it is recomputed only once the trace has moved on by
        a quarter of its length; between, the last result is returned."""
        if self.step - self._window_step >= max(1, len(self.trace) // 4):
            uses = [e for step in self.trace for e, _ in step]
            hits = sum(hit for step in self.trace for _, hit in step)
            self._window = (len(uses), hits, belady_hits(uses, self.num_slots) if uses else 0)
            self._window_step = self.step
        return self._window


def replay(steps: Sequence[Sequence[int]], num_slots: int, policy: EvictionPolicy) -> float:
    """Hit rate of ``policy`` on a recorded trace (per step: the experts one layer used, in
    order), through the real ``ExpertCache`` with no bytes moved and no prefetch."""
    cache = ExpertCache(num_slots, 0, policy, fill=lambda pairs: None, trace_steps=0)
    for needed in steps:
        for _ in cache.acquire(list(needed)):
            pass
    total = cache.hits + cache.misses
    return cache.hits / total if total else 0.0
