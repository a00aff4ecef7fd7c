"""A request as any protocol describes it (``GenerateInput``, plain Python) -> a validated,
tokenized ``GenerateCall``, or a ``RequestError`` whose message starts with the field's name.

Protocol adapters build the input (gRPC: router/servicer.py ``generate_input``); field names
are the gRPC API's (``sampling.top_p``), which an HTTP adapter maps its own names onto.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

from router.errors import ErrorKind, RequestError, invalid, shown
from services.engine.config_parse import ConfigError
from services.engine.chat_prompt import with_end_of_turn
from services.engine.chat_template import ChatTemplateError
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.types import GenerateCall, ModelInfo

MAX_REQUEST_ID = 256


@dataclass(frozen=True)
class SamplingInput:
    """Sampling values as the client sent them; None = not set (the engine's default applies)."""

    max_tokens: int | None = None  # output tokens at most
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None  # nucleus mass in (0, 1]
    top_k: int | None = None  # keep the k most likely tokens (0 / -1 = all)
    min_p: float | None = None  # drop tokens below min_p * the top probability
    seed: int | None = None  # per-request RNG seed (reproducible sampling)
    ignore_eos: bool | None = None  # go on after an EOS token
    logprobs: int | None = None  # top-n logprobs per output token
    speculative: bool | None = None  # False: never speculate for this request (same output either way)
    stop: tuple[str, ...] = ()  # stop strings (not part of the output)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the output


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str  # "system", "user", "assistant", ...
    content: str  # the turn's text


@dataclass(frozen=True)
class GenerateInput:
    """One generation request as a protocol adapter hands it over; nothing checked yet."""

    prompt: str = ""  # prompt text; set exactly one of prompt, prompt_token_ids and messages
    prompt_token_ids: list[int] = field(default_factory=list)  # the prompt as token ids
    messages: tuple[ChatMessage, ...] = ()  # a conversation, rendered with the model's chat template
    sampling: SamplingInput = SamplingInput()  # sampling values
    request_id: str = ""  # "" = the router generates one; at most MAX_REQUEST_ID characters
    priority: int = 0  # lower is served first
    model: str = ""  # "" = the served model; anything else must be its id
    deadline: float | None = None  # unix time after which the request is abandoned; None = none
    replica_hint: str = ""  # force the unified / prefill replica (a replica id); "" = the routing policy
    traceparent: str = ""  # the client's W3C trace context ("" = start a trace)
    tracestate: str = ""  # the client's W3C tracestate


@dataclass(frozen=True)
class Limits:
    """Input limits checked before tokenizing; the router config keys of the same names
    (router/server.py ``RouterConfig``). Each breach is INVALID_ARGUMENT naming the field and the limit."""

    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a text prompt (or of all messages' contents) at most
    max_prompt_token_ids: int = 1 << 18  # entries of prompt_token_ids at most (the context length also applies)
    max_messages: int = 1024  # turns of a conversation at most
    max_stop_strings: int = 16  # entries of sampling.stop at most
    max_stop_chars: int = 1024  # characters of one stop string at most
    max_stop_token_ids: int = 256  # entries of sampling.stop_token_ids at most

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f.name, f"must be an integer >= 1, got {value!r}")


# the SamplingInput fields that are None when unset (the rest are tuples, () when unset)
OPTIONAL_SAMPLING = tuple(f.name for f in dataclasses.fields(SamplingInput) if f.default is None)


class RequestValidator:
    def __init__(self, info: ModelInfo, tokenizer: Tokenizer, limits: Limits):
        self.info = info
        self.tokenizer = tokenizer
        self.limits = limits

    def check_model(self, model: str) -> None:
        if model and model != self.info.model_id:
            raise RequestError(ErrorKind.NOT_FOUND,
                               f"model: {shown(model)} is not served here; served: {shown(self.info.model_id)}")

    def request_id(self, request_id: str) -> str:
        """The client's id, or a new one when it sent none."""
        rid = request_id or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID:
            raise invalid(f"request_id: longer than {MAX_REQUEST_ID} characters")
        return rid

    def build(self, request: GenerateInput, request_id: str, deadline: float | None,
              traceparent: str = "") -> GenerateCall:
        self.check_model(request.model)
        params = self.sampling(request.sampling)
        ids = self.prompt_ids(request)
        if request.messages:
            params = with_end_of_turn(params, self.tokenizer.stop_token_ids)
        if len(ids) + params.max_tokens > self.info.max_model_len:
            raise invalid(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                          f"the context length of {self.info.max_model_len}")
        return GenerateCall(request_id, ids, params, priority=request.priority, deadline=deadline,
                            traceparent=traceparent)

    def prompt_ids(self, request: GenerateInput) -> list[int]:
        given = [name for name, value in (("prompt", request.prompt), ("prompt_token_ids", request.prompt_token_ids),
                                          ("messages", request.messages)) if value]
        if len(given) != 1:
            raise invalid("prompt: set exactly one of prompt, prompt_token_ids and messages "
                          f"(got {' and '.join(given) if given else 'none'})")
        if request.messages:
            return self.chat_ids(request.messages)
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            _at_most(len(ids), self.limits.max_prompt_token_ids, "prompt_token_ids", "token ids")
            if len(ids) >= self.info.max_model_len:
                raise invalid(f"prompt_token_ids: {len(ids)} tokens do not fit the context length "
                              f"of {self.info.max_model_len}")
            bad = next((t for t in ids if not 0 <= t < self.info.vocab_size), None)
            if bad is not None:
                raise invalid(f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {self.info.vocab_size})")
            return ids
        return self.tokenize(request.prompt, "prompt")

    def chat_ids(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        """The token ids of a conversation rendered with the model's chat template."""
        if self.tokenizer.chat_template is None:
            raise invalid("messages: the served model has no chat template; send a prompt instead")
        _at_most(len(messages), self.limits.max_messages, "messages", "messages")
        for i, m in enumerate(messages):
            if not m.role:
                raise invalid(f"messages[{i}].role: must not be empty")
        size = sum(len(m.content.encode("utf-8", errors="replace")) for m in messages)
        if size > self.limits.max_prompt_bytes:
            raise invalid(f"messages: {size} bytes exceeds the limit of {self.limits.max_prompt_bytes} bytes")
        try:
            text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
        except ChatTemplateError as exc:  # the template refused the conversation (raise_exception)
            message = str(exc)
            raise invalid(message if message.startswith("messages") else f"messages: {message}") from None
        return self.tokenize(text, "messages")

    def tokenize(self, text: str, field: str) -> list[int]:
        size = len(text.encode("utf-8", errors="replace"))
        if size > self.limits.max_prompt_bytes:
            raise invalid(f"{field}: {size} bytes exceeds the limit of {self.limits.max_prompt_bytes} bytes")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise invalid(f"{field}: tokenizes to zero tokens")
        if len(ids) >= self.info.max_model_len:
            raise invalid(f"{field}: {len(ids)} tokens do not fit the context length of {self.info.max_model_len}")
        return ids

    def sampling(self, s: SamplingInput) -> SamplingParams:
        values = {name: getattr(s, name) for name in OPTIONAL_SAMPLING if getattr(s, name) is not None}
        if s.stop:
            _at_most(len(s.stop), self.limits.max_stop_strings, "sampling.stop", "stop strings")
            longest = max(range(len(s.stop)), key=lambda i: len(s.stop[i]))
            if len(s.stop[longest]) > self.limits.max_stop_chars:
                raise invalid(f"sampling.stop[{longest}]: {len(s.stop[longest])} characters, more than the limit "
                              f"of {self.limits.max_stop_chars}")
            values["stop"] = tuple(s.stop)
        if s.stop_token_ids:
            _at_most(len(s.stop_token_ids), self.limits.max_stop_token_ids, "sampling.stop_token_ids", "token ids")
            bad = next((t for t in s.stop_token_ids if not 0 <= t < self.info.vocab_size), None)
            if bad is not None:
                raise invalid(f"sampling.stop_token_ids: token id {bad} is outside the vocabulary")
            values["stop_token_ids"] = tuple(s.stop_token_ids)
        for name in ("temperature", "top_p", "min_p"):
            if name in values:
                values[name] = float(values[name])
        try:
            return SamplingParams(**values)
        except ValueError as exc:
            raise invalid(f"sampling.{exc}") from None


def _at_most(count: int, limit: int, field: str, what: str) -> None:
    if count > limit:
        raise invalid(f"{field}: {count} {what}, more than the limit of {limit}")
