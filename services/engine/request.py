"""Per-request engine state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from services.engine.sampler import position_seed
from services.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    """A request's tokens and progress.

    Invariants: ``num_computed_tokens <= num_tokens``; the request samples a new token in a
    step that brings ``num_computed_tokens`` up to ``num_tokens``. After preemption
    ``num_computed_tokens`` is 0 and prompt + output are recomputed as one prompt.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower value is served first; FCFS within a priority
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission (-1 = not yet)
    num_imported_cached_tokens: int = 0  # of num_cached_tokens, blocks imported from an external tier (Redis)
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set (see sampling_generator)
    first_token_time: float | None = None
    scheduled_time: float | None = None  # monotonic time it first entered the running batch
    # speculative decoding: the draft proposed for the next step (services/engine/spec_decode);
    # verified when that step schedules it, cleared after every step
    spec_token_ids: list[int] = field(default_factory=list)  # proposed tokens after the known ones
    spec_probs: torch.Tensor | None = None  # [len(spec_token_ids), V] the proposer's q; None = one-hot
    num_drafts: int = 0  # steps that verified a draft of this request (its usage; vLLM's num_drafts)
    num_draft_tokens: int = 0  # draft tokens verified for this request
    num_accepted_draft_tokens: int = 0  # of those, accepted
    # detokenizer state (see Detokenizer)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    sent_text_len: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to first scheduled (None until scheduled)."""
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def sampling_generator(self) -> torch.Generator | None:
        """The request's generator seeded for its next output token, ``position_seed(seed,
        len(output_token_ids))`` (services/engine/sampler.py); None when unseeded."""
        if self.generator is not None:
            self.generator.manual_seed(position_seed(self.params.seed, len(self.output_token_ids)))
        return self.generator

    def token_at(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def sort_key(self) -> tuple[int, float]:
        return (self.priority, self.arrival_time)
