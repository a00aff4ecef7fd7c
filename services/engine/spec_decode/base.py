"""The ``Proposer`` interface: who guesses the next k tokens of running requests.

Glossary
- draft: up to k tokens a proposer guesses will follow a request's known tokens, verified by
  the target model in the next step (services/engine/spec_decode/rejection.py).
- q: the proposer's distribution at each draft position (``Draft.probs``), used by the
  rejection rule on sampled requests; a deterministic proposer (n-gram lookup, greedy drafts)
  has the one-hot q of its token and gives ``probs=None``.
- target: the engine's own model; ``TargetInfo`` is what a proposer may know of it.

A proposer is registered in ``PROPOSERS`` (services/engine/spec_decode/__init__.py) as a factory
``(options, deps) -> build`` where ``build(target: TargetInfo) -> Proposer``: the options are
validated when the config is parsed, the proposer is built once the target is loaded.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.engine.model_config import ModelConfig
from services.engine.request import Request
from services.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class TargetInfo:
    """What the engine tells a proposer about the model it speculates for."""

    model_config: ModelConfig  # the target's architecture (vocab_size, max_position_embeddings)
    tokenizer: Tokenizer  # the target's tokenizer (a draft model must have the same vocabulary)
    device: torch.device  # where the target runs (a draft model runs there too)
    dtype: torch.dtype  # the target's weights and KV dtype
    block_size: int  # tokens per KV block of the target's cache
    num_kv_blocks: int  # blocks in the target's KV pool
    max_model_len: int  # prompt + output tokens at most
    seed: int  # the engine's seed (for a proposer's own generator)


@dataclass(frozen=True)
class Draft:
    """Proposed tokens for one request (k = ``len(token_ids)``, possibly 0)."""

    token_ids: list[int]  # proposed continuation, in order
    probs: torch.Tensor | None = None  # [k, V] float32 q at each position; None = one-hot (deterministic)


NO_DRAFT = Draft([])


@dataclass
class RemoteProposerStats:
    """Counters of a proposer whose drafts come from another process (a DraftWorker deployment:
    services/draft_client.py), since it was built (``tandem_spec_decode_draft_worker_*``)."""

    num_calls: int = 0  # calls made (one per engine step that asked for drafts)
    num_timeouts: int = 0  # of those, not answered within the timeout (that step had no drafts)
    num_errors: int = 0  # of those, failed with an error or a malformed answer (no drafts)
    num_unavailable: int = 0  # of those, failed because the replica was dead or unreachable (no drafts)
    num_skipped_steps: int = 0  # steps run without asking at all (the pause after a failure)
    call_seconds: float = 0.0  # summed round trip of the answered calls
    num_direct_calls: int = 0  # answered calls that went as plain actor calls (not through the Serve handle)

    @property
    def num_steps_without_drafts(self) -> int:
        """Steps that wanted drafts and ran without them because of the remote side."""
        return self.num_timeouts + self.num_errors + self.num_unavailable + self.num_skipped_steps


@dataclass(frozen=True)
class SpeculativeOptions:
    """Options of every method (the ``speculative`` section's common keys); each method's
    options dataclass extends this one."""

    adaptive: bool = True  # propose only where the measured costs say it pays (policy.py); False = every step


class Proposer(abc.ABC):
    """Proposes drafts for running requests once per engine step, before scheduling.

    ``propose`` sees each request's prompt and output so far (``Request.token_at``,
    ``output_token_ids``); it must not change the request. A proposer that keeps per-request
    state (a draft model's KV cache) reconciles it with the request's tokens at every call
    (the target may have rejected part of the last draft, or not verified it at all) and
    drops it in ``release``. Proposing nothing is always allowed (fail closed).
    """

    num_speculative_tokens: int  # k: draft tokens per request and step at most

    @abc.abstractmethod
    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> list[Draft]:
        """One ``Draft`` per request, of at most ``max_tokens[i]`` (<= k, >= 1) tokens."""

    def release(self, request_id: str) -> None:
        """Forget a request that finished or was aborted (free what is held for it)."""

    def remote_stats(self) -> RemoteProposerStats | None:
        """A copy of the remote side's counters, or None for a proposer in this process."""
        return None
