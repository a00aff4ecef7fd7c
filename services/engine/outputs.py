"""What the engine returns: whole results (offline API) and streamed chunks (async API).

``merge_chunks`` is the one merge rule of every chunk type between the engine and the wire:
the engine's ``TokenChunk`` here and the wire's ``services.types.StreamChunk`` (which this
module does not import: imports go services -> services.engine).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TypeVar


@dataclass
class RequestOutput:
    """The finished result of one prompt (``LLM.generate``)."""

    request_id: str  # engine request id
    prompt: str | None  # the prompt text when the prompt was text
    prompt_token_ids: list[int]  # tokens the model saw
    token_ids: list[int]  # generated tokens (an EOS or stop token that ended it included)
    text: str  # generated text (stop strings and special tokens removed)
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token_id: logprob}
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class TokenChunk:
    """New output of one request since its previous chunk (``AsyncEngine`` streams these)."""

    request_id: str  # engine request id
    token_ids: list[int] = field(default_factory=list)  # new tokens in this chunk
    text: str = ""  # new text in this chunk (held back while it could begin a stop string)
    logprobs: list[dict[int, float]] | None = None  # logprobs of the new tokens when asked
    finish_reason: str | None = None  # set on the last chunk only
    stop_reason: int | str | None = None  # the stop token id or string, on the last chunk
    num_prompt_tokens: int = 0  # prompt length
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (every tier)
    num_output_tokens: int = 0  # output tokens so far, this chunk included
    queue_time_s: float | None = None  # arrival in the engine -> first scheduled (None until scheduled)
    num_imported_cached_tokens: int = 0  # of num_cached_tokens, imported from an external tier (Redis)
    emitted_at: float | None = None  # time.time() when the engine produced this output (for the serving-delay metric)
    # speculative decoding so far (cumulative, like num_output_tokens): steps that verified a
    # draft, draft tokens verified, and of those accepted (the request's final usage)
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: "TokenChunk") -> "TokenChunk":
        """This chunk's output followed by ``later``'s (``merge_chunks``)."""
        return merge_chunks(self, later)


Chunk = TypeVar("Chunk")


def merge_chunks(a: Chunk, b: Chunk) -> Chunk:
    """One chunk carrying ``a``'s output followed by ``b``'s (``b`` is the later one).

    For any chunk dataclass with ``token_ids``, ``text``, ``logprobs`` and ``queue_time_s``
    (``TokenChunk``, ``services.types.StreamChunk``); by field name:
    - ``token_ids``, ``text``, ``logprobs``: concatenated (``logprobs`` stays None unless one has them);
    - ``queue_time_s``: the first one set (it is stamped once, on the first scheduled chunk);
    - time stamps (the fields named ``*_at``: ``emitted_at``, ``arrived_at``): the earliest one
      set, since the delay of a merged chunk is the delay of its oldest token;
    - everything else (counts, finish and stop reason, tier split, ids): ``b``'s.
    """
    lp = None
    if a.logprobs is not None or b.logprobs is not None:
        lp = (a.logprobs or []) + (b.logprobs or [])
    changes = {"token_ids": a.token_ids + b.token_ids, "text": a.text + b.text, "logprobs": lp,
               "queue_time_s": a.queue_time_s if a.queue_time_s is not None else b.queue_time_s}
    for name in _stamp_fields(type(b)):
        changes[name] = earliest(getattr(a, name), getattr(b, name))
    return dataclasses.replace(b, **changes)


@functools.cache
def _stamp_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name.endswith("_at"))


def earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional timestamps (None when both are None)."""
    if a is None or b is None:
        return b if a is None else a
    return min(a, b)
