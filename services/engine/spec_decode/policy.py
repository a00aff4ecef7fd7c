"""When speculation pays: per engine step, how many draft tokens (0..k) each request is asked for.

Verifying k drafts of a request adds k decode rows to the step. At batch 1 on a memory-bound
machine that costs little more than the one row it already had; at batch 32 the step is
compute-bound and every row costs about as much as a request's own, so drafts that are often
rejected make the step slower per emitted token (vLLM issue #49548: n-gram falls below
no-speculation at batch 16). This module measures both sides instead of guessing a threshold.

Glossary
- bucket: decoding batch sizes grouped about x1.4 apart (1, 2, 3, 4, 5-6, 7-9, 10-13, 14-19,
  20-26, 27-38, ...); the time estimates are kept per bucket, since the cost of a row depends on the batch.
- plain / spec step: a step whose rows are all decodes (no prompt tokens), without / with draft
  rows; only such steps teach the time model (a prompt chunk's cost says nothing about drafts).
- rows R: the decode query rows of a step: one per request plus one per draft token.
- alpha_i: request i's per-token acceptance under the geometric model of Leviathan et al. 2023
  (arXiv 2211.17192, section 3.1: each draft token is accepted with probability alpha, so k
  drafts emit 1 + alpha + ... + alpha^k tokens on average); estimated as accepted /
  (accepted + rejections) over the request's recent drafts (the maximum-likelihood estimate
  when runs are cut at k), shrunk towards the estimate over all requests.
- phi_i: the share of the positions asked of the proposer that it filled (n-gram lookup finds
  nothing for some requests; a draft model fills every one).
- in sync: most requests asked this step were asked the step before. A draft model asked after
  a pause first runs every token it missed (a whole prompt for a new request), so only steps in
  sync teach the proposer's cost per position; until one has, that cost is taken as 0 (tried,
  then measured).

Model (per bucket, EWMA estimates forgetting by engine step): a pure decode step of R rows takes
``T(R) = plain_s + slope * (R - plain_rows)``, where (plain_rows, plain_s) and (spec_rows,
spec_s) are the running means of plain and spec steps and ``slope`` the line through them; the
proposer takes ``propose_s`` per asked position. Asking request i for its j-th draft token
costs ``c_i = phi_i * slope + propose_s`` and gains ``g_ij = phi_i * alpha_i ** j`` tokens on
average. From the plain step (N tokens in T(N) seconds), positions are added in decreasing
order of g / c while g / c > N / T: each such addition raises N / T, and in that order the
first one that does not marks the maximum of tokens per second (a ratio objective over items of
known gain and cost; Dinkelbach 1967). A position must clear N / T by ``margin`` (10%): near
break-even the estimates' noise would decide. Where a row costs more than the tokens a draft
position adds are worth at the step's rate, nothing is drafted; a request that keeps accepting
speculates at larger batches than one that does not; nothing switches at a fixed batch size.

Exploration: a bucket starts by alternating plain steps and steps of one draft token per
request until it has ``min_samples`` of each; after that, every ``interval`` steps it runs the step the estimates
did not choose (no drafts when they chose some; one draft token per request when they chose
none, the cheapest step that measures both the acceptance and the cost of a draft row), so
estimates that went stale (load changed, requests changed) are measured again. The interval
doubles from ``explore_min`` up to ``explore_max`` while the choice stays the same and starts
over when it flips, so a settled bucket pays for exploring less than 1 step in 100.

Fixed requests (``Ask.fixed``: seeded sampling, whose tokens must not depend on timing) always
get their whole limit. The policy only decides what is proposed, never what is emitted: the
verifier's rule keeps every output what the target alone would produce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PolicyConfig:
    """How the policy learns; ``adaptive`` is the user's switch (``speculative.adaptive``)."""

    adaptive: bool = True  # False: every request is asked for its whole limit every step
    min_samples: int = 2  # plain and spec steps a bucket measures before it trusts its estimates
    explore_min: int = 8  # steps between explorations after a flip
    explore_max: int = 128  # steps between explorations at most
    time_decay: float = 0.9  # EWMA: weight an old time estimate keeps per engine step
    global_decay: float = 0.97  # EWMA weight of old acceptance counts over all requests
    request_decay: float = 0.7  # EWMA weight of a request's old acceptance counts
    prior_weight: float = 1.0  # how many drafts' worth the global estimate counts in a request's
    margin: float = 0.1  # a draft position must promise this much more than the step's tokens/s


@dataclass(frozen=True)
class Ask:
    """One request the engine could ask the proposer for."""

    request_id: str
    limit: int  # draft tokens it may take at most this step (1..k)
    fixed: bool = False  # True: always ask for ``limit`` (its output must not depend on timing)


@dataclass(frozen=True)
class DraftOutcome:
    """What became of one request's ask in the step."""

    request_id: str
    asked: int  # positions asked of the proposer
    drafted: int  # draft tokens verified (<= asked; the proposer or the scheduler may cut)
    accepted: int  # of those, accepted


@dataclass(frozen=True)
class StepCost:
    """What one engine step measured."""

    num_decodes: int  # decode requests in the step (one row each, drafts not counted)
    num_draft_rows: int  # draft tokens verified in the step
    num_prefill_tokens: int  # prompt tokens in the step (> 0: the step does not teach the time model)
    step_s: float  # scheduling, the forward pass and verification (output processing not included)
    propose_s: float  # the proposer's time before the step (0 when it was not asked)
    num_asked: int  # positions asked of the proposer
    outcomes: tuple[DraftOutcome, ...] = ()  # one per request that was asked


def bucket_of(num_decodes: int) -> int:
    """The bucket index of a batch of ``num_decodes`` (>= 1) decodes: round(2 log2 n), so exact up
    to 4, then about x1.4 wide."""
    return int(2 * math.log2(max(num_decodes, 1)) + 0.5)


class _Ewma:
    """A mean that forgets by engine step, not by sample: the old value keeps weight ``decay **
    steps`` since the last sample, so a rare sample (an exploration) replaces most of an estimate
    made long ago, and a sample every step moves it by ``1 - decay``. The first sample sets it."""

    def __init__(self, decay: float):
        self.decay, self.value, self.n, self.last = decay, 0.0, 0, 0

    def add(self, x: float, now: int) -> None:
        keep = self.decay ** max(now - self.last, 1) if self.n else 0.0
        self.value = keep * self.value + (1 - keep) * x
        self.n, self.last = self.n + 1, now


class _Bucket:
    """Time estimates of one bucket and its exploration clock."""

    def __init__(self, decay: float, interval: int):
        self.plain_rows, self.plain_s = _Ewma(decay), _Ewma(decay)  # steps without drafts: rows, seconds
        self.spec_rows, self.spec_s = _Ewma(decay), _Ewma(decay)  # steps with drafts: rows, seconds
        self.propose_s = _Ewma(decay)  # the proposer's seconds per asked position (steps in sync)
        self.interval = interval  # steps between explorations now
        self.since_explore = 0
        self.last_choice: bool | None = None  # whether the estimates chose drafts at the last exploration

    def slope(self) -> float:
        """Seconds per extra row (>= 0); the plain step's time per row when spec and plain
        steps had (about) the same rows."""
        dx = self.spec_rows.value - self.plain_rows.value
        if dx < 0.5:
            return self.plain_s.value / max(self.plain_rows.value, 1.0)
        return max(0.0, (self.spec_s.value - self.plain_s.value) / dx)

    def time(self, rows: float) -> float:
        return max(self.plain_s.value + self.slope() * (rows - self.plain_rows.value), 1e-9)


@dataclass
class _Acceptance:
    """Decayed counts of accepted drafts, rejections, filled and asked positions."""

    accepted: float = 0.0
    rejected: float = 0.0
    filled: float = 0.0
    asked: float = 0.0

    def add(self, o: DraftOutcome, decay: float) -> None:
        """Count one outcome; one with nothing drafted teaches only the fill rate."""
        if o.drafted:
            self.accepted = decay * self.accepted + o.accepted
            self.rejected = decay * self.rejected + (1.0 if o.accepted < o.drafted else 0.0)
        self.filled = decay * self.filled + o.drafted
        self.asked = decay * self.asked + o.asked


@dataclass
class _Plan:
    explored: bool = False  # the step the estimates did not choose
    asked: dict[str, int] = field(default_factory=dict)  # request id -> positions asked (> 0)
    in_sync: bool = False  # most asked requests were asked the step before (no catch-up in the proposer's time)


class SpeculationPolicy:
    """Decides each step's draft lengths (``plan``) and learns from the step (``observe``).

    Call order per step: ``plan`` (before proposing), then ``observe`` (after the step ran);
    ``release`` when a request finishes. Times are passed in, so a test drives it with made-up
    durations. Not thread-safe (the engine thread owns it).
    """

    def __init__(self, config: PolicyConfig | None = None, prior_acceptance: float = 0.5):
        self.config = config or PolicyConfig()
        self.buckets: dict[int, _Bucket] = {}
        self.total = _Acceptance(accepted=prior_acceptance, rejected=1.0 - prior_acceptance, filled=1.0, asked=1.0)
        self.requests: dict[str, _Acceptance] = {}
        self._plan = _Plan()
        self.steps = 0  # steps observed (the clock the time estimates forget by)

    # ---- estimates ---------------------------------------------------------------------------
    def acceptance(self, request_id: str | None = None) -> tuple[float, float]:
        """(alpha, phi) of a request (or over all requests with ``None``), in [0, 1]."""
        g = self.total
        alpha_g = g.accepted / max(g.accepted + g.rejected, 1e-9)
        phi_g = min(1.0, g.filled / max(g.asked, 1e-9))
        r = self.requests.get(request_id) if request_id is not None else None
        if r is None:
            return alpha_g, phi_g
        w = self.config.prior_weight
        alpha = (r.accepted + w * alpha_g) / (r.accepted + r.rejected + w)
        phi = (r.filled + w * phi_g) / (r.asked + w)
        return alpha, min(1.0, phi)

    def bucket(self, num_decodes: int) -> _Bucket:
        b = bucket_of(num_decodes)
        if b not in self.buckets:
            self.buckets[b] = _Bucket(self.config.time_decay, self.config.explore_min)
        return self.buckets[b]

    # ---- per step ----------------------------------------------------------------------------
    def plan(self, asks: Sequence[Ask], num_decodes: int) -> list[int]:
        """Draft tokens to ask for, per ask (0..limit). ``num_decodes``: the requests in decode
        state this step (the asks and those that may not speculate)."""
        limits = [a.limit for a in asks]
        self._plan = _Plan(asked=self._plan.asked)
        if not self.config.adaptive or not asks:
            self._remember(asks, limits)
            return limits
        b = self.bucket(num_decodes)
        cfg = self.config
        if min(b.plain_s.n, b.spec_s.n) < cfg.min_samples:  # warming up: alternate
            chosen = self._one_each(asks) if b.spec_s.n <= b.plain_s.n else self._fixed_only(asks)
        else:
            chosen = self.best(asks, num_decodes)
            b.since_explore += 1
            if b.since_explore >= b.interval:
                chooses = any(k for k, a in zip(chosen, asks) if not a.fixed)
                b.interval = min(2 * b.interval, cfg.explore_max) if chooses == b.last_choice else cfg.explore_min
                b.since_explore, b.last_choice = 0, chooses
                chosen = self._fixed_only(asks) if chooses else self._one_each(asks)
                self._plan.explored = True
        self._remember(asks, chosen)
        return chosen

    def best(self, asks: Sequence[Ask], num_decodes: int) -> list[int]:
        """The draft lengths that maximize expected tokens per second (see the module docstring)."""
        b = self.bucket(num_decodes)
        slope, per_pos = b.slope(), b.propose_s.value
        tokens, seconds = float(num_decodes), b.time(num_decodes)
        chosen = [0] * len(asks)
        items = []  # (gain / cost, j, ask index, gain, cost)
        for i, a in enumerate(asks):
            alpha, phi = self.acceptance(a.request_id)
            cost = phi * slope + per_pos
            for j in range(1, a.limit + 1):
                gain = phi * alpha ** j
                if a.fixed:
                    tokens, seconds, chosen[i] = tokens + gain, seconds + cost, j
                else:
                    items.append((gain / max(cost, 1e-12), j, i, gain, cost))
        items.sort(key=lambda t: (-t[0], t[1]))
        for ratio, j, i, gain, cost in items:
            if gain <= 0 or ratio <= (1 + self.config.margin) * tokens / seconds:
                break
            tokens, seconds, chosen[i] = tokens + gain, seconds + cost, j
        return chosen

    def observe(self, cost: StepCost) -> None:
        """Learn from a step that ran after ``plan`` (acceptance always; times when it held only
        decodes)."""
        cfg = self.config
        for o in cost.outcomes:
            if o.asked:
                self.total.add(o, cfg.global_decay)
                self.requests.setdefault(o.request_id, _Acceptance()).add(o, cfg.request_decay)
        self.steps += 1
        if not cfg.adaptive or cost.num_prefill_tokens or cost.num_decodes == 0:
            return
        b, now = self.bucket(cost.num_decodes), self.steps
        rows = cost.num_decodes + cost.num_draft_rows
        if cost.num_draft_rows:
            b.spec_rows.add(rows, now)
            b.spec_s.add(cost.step_s, now)
        else:
            b.plain_rows.add(rows, now)
            b.plain_s.add(cost.step_s, now)
        if cost.num_asked and self._plan.in_sync:
            b.propose_s.add(cost.propose_s / cost.num_asked, now)

    def release(self, request_id: str) -> None:
        """Forget a finished request."""
        self.requests.pop(request_id, None)

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _fixed_only(asks: Sequence[Ask]) -> list[int]:
        return [a.limit if a.fixed else 0 for a in asks]

    @staticmethod
    def _one_each(asks: Sequence[Ask]) -> list[int]:
        """The cheapest step that measures a draft row's cost and the acceptance: one token each."""
        return [a.limit if a.fixed else 1 for a in asks]

    def _remember(self, asks: Sequence[Ask], chosen: Sequence[int]) -> None:
        before = self._plan.asked
        self._plan.asked = {a.request_id: k for a, k in zip(asks, chosen) if k}
        self._plan.in_sync = 4 * sum(rid in before for rid in self._plan.asked) >= 3 * len(self._plan.asked)

    @property
    def last_asked(self) -> dict[str, int]:
        """Positions asked per request in the last plan (requests asked for 0 left out)."""
        return self._plan.asked

    @property
    def last_explored(self) -> bool:
        """Whether the last plan was an exploration (the step the estimates did not choose)."""
        return self._plan.explored
