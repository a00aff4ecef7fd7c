"""``ngram``: prompt lookup decoding (Saxena 2023; vLLM's ``method: ngram``).

The longest suffix of a request's tokens (prompt + output), between ``prompt_lookup_min`` and
``prompt_lookup_max`` tokens long, that also occurs earlier in those tokens proposes the (up to
k) tokens that followed that earlier occurrence; the most recent occurrence wins a tie. No
model runs: the draft is deterministic (q one-hot), which pays on input-grounded text
(summaries, edits, code) where the output repeats spans of the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.engine.config_parse import ConfigError
from services.engine.plugins import HostDeps
from services.engine.request import Request
from services.engine.spec_decode import PROPOSERS
from services.engine.spec_decode.base import NO_DRAFT, Draft, Proposer, SpeculativeOptions, TargetInfo


@dataclass(frozen=True)
class NgramOptions(SpeculativeOptions):
    """``speculative: {method: ngram, ...}`` (and ``adaptive``, SpeculativeOptions)."""

    num_speculative_tokens: int = 3  # k: tokens proposed per step at most
    prompt_lookup_min: int = 2  # shortest suffix n-gram matched
    prompt_lookup_max: int = 5  # longest suffix n-gram matched

    def __post_init__(self) -> None:
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ConfigError("prompt_lookup_max", f"must be >= prompt_lookup_min ({self.prompt_lookup_min}), "
                                                   f"got {self.prompt_lookup_max}")


def find_continuation(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix
    of ``tokens`` [L] (int64) of ``n_min..n_max`` tokens; [] when no suffix of ``n_min`` recurs."""
    length = len(tokens)
    if length <= n_min:
        return []
    tail = tokens[length - n_min:]
    # candidate starts i of an earlier n_min-gram equal to the tail, followed by >= 1 token
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n_min)
    starts = np.flatnonzero((windows == tail).all(axis=1))
    if starts.size == 0:
        return []
    # extend each match backwards, up to n_max tokens in all
    matched = np.full(starts.shape, n_min)
    alive = np.ones(starts.shape, dtype=bool)
    for extra in range(1, n_max - n_min + 1):
        before = starts - extra
        ok = alive & (before >= 0)
        ok[ok] = tokens[before[ok]] == tokens[length - n_min - extra]
        matched[ok] += 1
        alive = ok
        if not alive.any():
            break
    best = np.flatnonzero(matched == matched.max())[-1]  # longest, then most recent
    follow = starts[best] + n_min
    return tokens[follow:follow + k].tolist()


class NgramProposer(Proposer):
    def __init__(self, options: NgramOptions):
        self.options = options
        self.num_speculative_tokens = options.num_speculative_tokens

    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> list[Draft]:
        o = self.options
        drafts = []
        for req, k in zip(requests, max_tokens):
            tokens = np.asarray(req.token_at(0, req.num_tokens), dtype=np.int64)
            k = min(k, o.num_speculative_tokens)
            found = find_continuation(tokens, o.prompt_lookup_min, o.prompt_lookup_max, k)
            drafts.append(Draft(found) if found else NO_DRAFT)
        return drafts


@PROPOSERS.register("ngram", options=NgramOptions)
def ngram(options: NgramOptions, deps: HostDeps):
    return lambda target: NgramProposer(options)
