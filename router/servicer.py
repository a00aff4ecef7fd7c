"""The gRPC adapter: ``tandem.v1.Generation`` (the public API) and ``tandem.v1.Admin``.

Protobuf in -> ``GenerateInput`` (``generate_input``) -> the request lifecycle (router/lifecycle.py)
-> protobuf responses out; a ``RequestError``'s kind -> a gRPC status code (``grpc_status``, the
one table). Trailing metadata names the trace (x-trace-id) and the replicas that served the request.
"""

from __future__ import annotations

import time
from contextlib import aclosing

import grpc

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.auth import Authenticator
from router.errors import ErrorKind, RequestError, classify
from router.lifecycle import LiveRequest, RequestLifecycle, Usage
from router.validation import OPTIONAL_SAMPLING, ChatMessage, GenerateInput, SamplingInput
from services.types import StreamChunk

_GRPC_STATUS = {
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(kind: ErrorKind) -> grpc.StatusCode:
    """The gRPC status code of an error kind (the one kind -> status table)."""
    return _GRPC_STATUS[kind]


def status_for(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and one-line message of an exception raised while serving a request."""
    err = classify(exc, request_id)
    return _GRPC_STATUS[err.kind], err.message


def _usage(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    cached_prompt_tokens=usage.cached_prompt_tokens, draft_steps=usage.draft_steps,
                    draft_tokens=usage.draft_tokens, accepted_draft_tokens=usage.accepted_draft_tokens)


def _logprobs(token_ids: list[int], logprobs) -> list[pb.TokenLogprobs]:
    out = []
    for tok, lp in zip(token_ids, logprobs or []):
        if lp is None:
            continue
        top = sorted(lp.items(), key=lambda kv: -kv[1])
        out.append(pb.TokenLogprobs(token_id=tok, logprob=lp.get(tok, float("nan")),
                                    top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top]))
    return out


# Routing metadata (router/prefix_routing.py): a client may pin the unified / prefill replica
# (a replica_id from Admin.GetWorkerStats), and every Generate reply's trailing metadata names
# the replica that computed the prompt (and, in P/D mode, the decode replica).
REPLICA_HINT_KEY = "x-tandem-replica"
SERVED_BY_KEY = "x-tandem-replica"
DECODE_SERVED_BY_KEY = "x-tandem-decode-replica"


def _metadata(metadata, name: str) -> str:
    for key, value in metadata:
        if key == name:
            return value
    return ""


def generate_input(request: pb.GenerateRequest, deadline: float | None = None, metadata=()) -> GenerateInput:
    """The protocol-neutral form of a ``GenerateRequest`` and its call's metadata (nothing checked)."""
    s = request.sampling
    sampling = SamplingInput(**{name: getattr(s, name) for name in OPTIONAL_SAMPLING if s.HasField(name)},
                             stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids))
    headers = dict(metadata)
    messages = tuple(ChatMessage(m.role, m.content) for m in request.messages)
    return GenerateInput(prompt=request.prompt, prompt_token_ids=list(request.prompt_token_ids), messages=messages,
                         sampling=sampling,
                         request_id=request.request_id, priority=request.priority, model=request.model,
                         deadline=deadline, replica_hint=_metadata(metadata, REPLICA_HINT_KEY),
                         traceparent=headers.get("traceparent", ""), tracestate=headers.get("tracestate", ""))


def _set_routed(context: grpc.aio.ServicerContext, live: LiveRequest) -> None:
    routed = live.routed
    pairs = [*live.trace_metadata, (SERVED_BY_KEY, routed.get("unified") or routed.get("prefill", ""))]
    if "decode" in routed:
        pairs.append((DECODE_SERVED_BY_KEY, routed["decode"]))
    context.set_trailing_metadata(tuple((k, v) for k, v in pairs if v))


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, lifecycle: RequestLifecycle, authenticator: Authenticator | None = None):
        self.lifecycle = lifecycle
        self.authenticator = authenticator  # router/auth.py: names the caller (owner of its requests)

    def _owner(self, context) -> str:
        """The caller's key fingerprint ("" when API keys are off): scopes request ids and Abort."""
        if self.authenticator is None:
            return ""
        return self.authenticator.identity(context.invocation_metadata() or ())

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        deadline = time.time() + remaining if remaining is not None else None
        live = self.lifecycle.start(generate_input(request, deadline, context.invocation_metadata() or ()),
                                    self._owner(context))
        context.set_trailing_metadata(live.trace_metadata)  # x-trace-id, also on errors
        try:
            async with aclosing(live.stream()) as chunks:
                async for chunk in chunks:
                    if chunk.finish_reason is not None:
                        _set_routed(context, live)
                    yield self._response(live.request_id, chunk, live.usage)
        except Exception as exc:  # RequestError from the lifecycle; anything else is a bug here
            code, message = status_for(exc, live.request_id)
            _set_routed(context, live)
            await context.abort(code, message)

    @staticmethod
    def _response(rid: str, chunk: StreamChunk, usage: Usage) -> pb.GenerateResponse:
        msg = pb.GenerateResponse(request_id=rid, token_ids=chunk.token_ids, text=chunk.text)
        if chunk.logprobs is not None:  # per token, hot path: build logprob messages only when asked
            msg.logprobs.extend(_logprobs(chunk.token_ids, chunk.logprobs))
        if chunk.finish_reason is not None:
            msg.finish_reason = chunk.finish_reason
            msg.usage.CopyFrom(_usage(usage))
        return msg

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.lifecycle.abort(request.request_id, self._owner(context)))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        info = self.lifecycle.info
        return pb.ModelInfo(model_id=info.model_id, max_context_length=info.max_model_len,
                            vocab_size=info.vocab_size, eos_token_ids=list(info.eos_token_ids),
                            kv_block_size=info.block_size,
                            has_chat_template=self.lifecycle.validator.tokenizer.chat_template is not None)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            ids = await self.lifecycle.tokenize(request.text, request.model)
        except RequestError as exc:
            await context.abort(grpc_status(exc.kind), exc.message)
        return pb.TokenizeResponse(token_ids=ids)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, pipeline, lifecycle: RequestLifecycle):
        self.pipeline = pipeline
        self.lifecycle = lifecycle

    async def GetWorkerStats(self, request, context) -> admin_pb2.GetWorkerStatsResponse:
        stats = await self.pipeline.worker_stats()
        workers = [admin_pb2.WorkerStats(
            role=s.role, replica_id=s.replica_id, node_id=s.node_id, kv_blocks_total=s.kv_blocks_total,
            kv_blocks_free=s.kv_blocks_free, num_running=s.num_running, num_waiting=s.num_waiting,
            num_open_streams=s.num_open_streams, num_kv_sent=s.num_kv_sent, num_kv_adopted=s.num_kv_adopted,
            num_kv_held=s.num_kv_held, metrics_address=s.metrics_address)
            for s in stats]
        return admin_pb2.GetWorkerStatsResponse(workers=workers,
                                                num_inflight_requests=self.lifecycle.num_inflight,
                                                router_metrics_address=self.lifecycle.telemetry.metrics_address)

