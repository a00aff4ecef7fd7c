"""Sampling parameters of one request, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (vLLM's _SAMPLING_EPS): logits / 1e-40 overflow
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes: [-2^63, 2^64)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop.

    ``temperature == 0`` (or below ``GREEDY_BELOW``) is greedy; every number must be finite
    (NaN and +-inf are refused). Filters apply in the order temperature, top-k, top-p, min-p.
    Logprobs are always those of the model's raw distribution (log-softmax of the logits), as
    in vLLM and the OpenAI API.
    """

    max_tokens: int = 16  # new tokens to generate at most (>= 1)
    temperature: float = 1.0  # 0 = greedy; otherwise logits are divided by it
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = -1  # keep the k most likely tokens; -1 or 0 = off
    min_p: float = 0.0  # drop tokens with p < min_p * p_max; 0 = off
    seed: int | None = None  # per-request seed: same tokens whatever else is in the batch
    stop: tuple[str, ...] = ()  # stop strings; the matched text is not returned
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that finish the request (kept in token_ids)
    ignore_eos: bool = False  # keep generating past the model's EOS tokens
    logprobs: int | None = None  # return the sampled token's logprob plus the top-n (0..20)
    skip_special_tokens: bool = True  # leave special tokens out of the returned text
    speculative: bool = True  # False: this request never verifies drafts (per-request opt-out)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop", str))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids", int))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               "temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= -1,
               "top_k", f"must be -1 (off), 0 (off) or a positive integer, got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1,
               "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]),
               "seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        _check(all(s for s in self.stop), "stop", "stop strings must not be empty")
        _check(isinstance(self.speculative, bool), "speculative", f"must be true or false, got {self.speculative!r}")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """An int or float that is finite as a float (not a bool; NaN, +-inf and ints beyond float's range fail)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _as_tuple(value, name: str, kind: type) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind):
        value = (value,)
    items = tuple(value)
    _check(all(isinstance(v, kind) and not isinstance(v, bool) for v in items),
           name, f"every item must be {kind.__name__}")
    return items
