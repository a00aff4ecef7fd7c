"""A circuit breaker for calls to Redis.

States: *closed* (calls go through), *open* (calls are skipped: the cache is a miss) and
*half-open* (after ``retry_after_s`` one trial call goes through; its success closes the
breaker, its failure opens it again for another ``retry_after_s``). It opens after
``failure_threshold`` consecutive failures. Each transition to open and back to closed is
logged once, so an outage shows as two log lines, not one per request.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("tandem.prefix_store")


class CircuitBreaker:
    """Not thread-safe: used from one event loop."""

    def __init__(self, failure_threshold: int = 3, retry_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, name: str = "redis"):
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold: must be >= 1, got {failure_threshold}")
        if retry_after_s <= 0:
            raise ValueError(f"retry_after_s: must be > 0, got {retry_after_s}")
        self.failure_threshold = failure_threshold
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.name = name
        self.failures = 0  # consecutive failures
        self.opened_at: float | None = None  # None = closed
        self.times_opened = 0

    @property
    def is_open(self) -> bool:
        """True while calls are being skipped (open or half-open)."""
        return self.opened_at is not None

    def allow(self) -> bool:
        """May a call go out now? Closed: yes. Open: no until ``retry_after_s`` has passed,
        then yes for one trial call (half-open); the next trial only after another interval."""
        if self.opened_at is None:
            return True
        now = self.clock()
        if now - self.opened_at < self.retry_after_s:
            return False
        self.opened_at = now  # the trial's slot: the next one only after another interval
        return True

    def record_success(self) -> None:
        if self.opened_at is not None:
            log.warning("%s circuit breaker closed: %s answers again; prefix cache reuse resumes",
                        self.name, self.name)
        self.failures = 0
        self.opened_at = None

    def record_failure(self, error: BaseException | str = "") -> None:
        self.failures += 1
        if self.opened_at is not None:  # a failed half-open trial: wait another interval
            self.opened_at = self.clock()
            return
        if self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
            self.times_opened += 1
            log.warning("%s circuit breaker open after %d failures (last: %s); serving with the local "
                        "prefix cache only, retrying in %.1fs", self.name, self.failures, error or "?",
                        self.retry_after_s)
