"""GenerateRequest -> a validated, tokenized ``GenerateCall`` (or a RequestError naming the field)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc

from protos.tandem.v1 import generation_pb2 as pb
from router.errors import RequestError, invalid
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.types import GenerateCall, ModelInfo

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "logprobs")
MAX_REQUEST_ID = 256


@dataclass(frozen=True)
class Limits:
    """Input limits checked before tokenizing."""

    max_prompt_bytes: int  # UTF-8 bytes of a text prompt at most


class RequestValidator:
    def __init__(self, info: ModelInfo, tokenizer: Tokenizer, limits: Limits):
        self.info = info
        self.tokenizer = tokenizer
        self.limits = limits

    def check_model(self, model: str) -> None:
        if model and model != self.info.model_id:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model: {model!r} is not served here; served: {self.info.model_id!r}")

    def request_id(self, request: pb.GenerateRequest) -> str:
        rid = request.request_id or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID:
            raise invalid(f"request_id: longer than {MAX_REQUEST_ID} characters")
        return rid

    def build(self, request: pb.GenerateRequest, request_id: str, deadline: float | None,
              traceparent: str = "") -> GenerateCall:
        self.check_model(request.model)
        params = self.sampling(request.sampling if request.HasField("sampling") else pb.SamplingParams())
        ids = self.prompt_ids(request)
        if len(ids) + params.max_tokens > self.info.max_model_len:
            raise invalid(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                          f"the context length of {self.info.max_model_len}")
        return GenerateCall(request_id, ids, params, priority=request.priority, deadline=deadline,
                            traceparent=traceparent)

    def prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
        if has_text == has_ids:
            raise invalid("prompt: set exactly one of prompt and prompt_token_ids "
                          f"(got {'both' if has_text else 'neither'})")
        if has_ids:
            ids = list(request.prompt_token_ids)
            if len(ids) >= self.info.max_model_len:
                raise invalid(f"prompt_token_ids: {len(ids)} tokens do not fit the context length "
                              f"of {self.info.max_model_len}")
            bad = next((t for t in ids if t >= self.info.vocab_size), None)
            if bad is not None:
                raise invalid(f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {self.info.vocab_size})")
            return ids
        return self.tokenize(request.prompt, "prompt")

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

    def sampling(self, s: pb.SamplingParams) -> SamplingParams:
        values = {name: getattr(s, name) for name in _OPTIONAL if s.HasField(name)}
        if s.stop:
            values["stop"] = tuple(s.stop)
        if s.stop_token_ids:
            bad = next((t for t in s.stop_token_ids if t >= self.info.vocab_size), None)
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
