"""What the engine returns: whole results (offline API) and streamed chunks (async API)."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: "TokenChunk") -> "TokenChunk":
        """One chunk carrying this chunk's output followed by ``later``'s; its ``emitted_at`` is the
        earlier stamp (the delay of a merged chunk is the delay of its oldest token)."""
        lp = None
        if self.logprobs is not None or later.logprobs is not None:
            lp = (self.logprobs or []) + (later.logprobs or [])
        return TokenChunk(self.request_id, self.token_ids + later.token_ids, self.text + later.text, lp,
                          later.finish_reason, later.stop_reason, later.num_prompt_tokens,
                          later.num_cached_tokens, later.num_output_tokens,
                          self.queue_time_s if self.queue_time_s is not None else later.queue_time_s,
                          later.num_imported_cached_tokens, earliest(self.emitted_at, later.emitted_at))


def earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional timestamps (None when both are None)."""
    if a is None or b is None:
        return b if a is None else a
    return min(a, b)
