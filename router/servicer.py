"""The gRPC servicers: ``tandem.v1.Generation`` (the public API) and ``tandem.v1.Admin``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.errors import RequestError, invalid, status_for
from router.pipeline import Control
from router.validation import RequestValidator
from services.telemetry import RouterTelemetry
from services.telemetry.metrics import Identity
from services.types import StreamChunk

log = logging.getLogger("tandem.router")


@dataclass(frozen=True)
class AdmissionLimits:
    """Router-side admission control."""

    max_inflight_requests: int  # requests served at once by one router replica; beyond: RESOURCE_EXHAUSTED


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def proto(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                        cached_prompt_tokens=self.cached_prompt_tokens)


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


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value
    return ""


def _set_routed(context: grpc.aio.ServicerContext, ctl: Control, trace_md=()) -> None:
    routed = [*trace_md, (SERVED_BY_KEY, ctl.routed.get("unified") or ctl.routed.get("prefill", ""))]
    if "decode" in ctl.routed:
        routed.append((DECODE_SERVED_BY_KEY, ctl.routed["decode"]))
    context.set_trailing_metadata(tuple((k, v) for k, v in routed if v))


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, pipeline, validator: RequestValidator, limits: AdmissionLimits,
                 telemetry: RouterTelemetry | None = None):
        self.pipeline = pipeline
        self.validator = validator
        self.limits = limits
        self.telemetry = telemetry or RouterTelemetry(Identity(validator.info.model_id, "router", "local"))
        self.inflight: dict[str, Control] = {}

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id or "?"
        ctl = None
        obs = self.telemetry.start(context.invocation_metadata())  # tandem.generate span + request metrics
        context.set_trailing_metadata(obs.trailing_metadata())  # x-trace-id
        try:
            rid = self.validator.request_id(request)
            remaining = context.time_remaining()
            deadline = time.time() + remaining if remaining is not None else None
            call = await self._build(request, rid, deadline, obs.traceparent)
            if rid in self.inflight:
                raise invalid(f"request_id: {rid!r} is already in use")
            if len(self.inflight) >= self.limits.max_inflight_requests:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"router at its limit of {self.limits.max_inflight_requests} requests in flight")
            ctl = self.inflight[rid] = Control(_metadata(context, REPLICA_HINT_KEY))
            usage = _Usage(prompt_tokens=len(call.prompt_token_ids))
            obs.dispatched(call)
            try:
                async for chunk in self.pipeline.run(call, ctl):
                    obs.on_chunk(chunk)
                    if chunk.finish_reason is not None:
                        _set_routed(context, ctl, obs.trailing_metadata())
                    response = self._response(rid, chunk, usage)
                    obs.handed_over(chunk)  # the router token delay ends here
                    yield response
            except (asyncio.CancelledError, Exception) as exc:
                if not ctl.aborted or _being_cancelled():
                    raise
                log.info("request %s aborted (%s)", rid, type(exc).__name__)
                _set_routed(context, ctl, obs.trailing_metadata())
                obs.finished("abort", usage.cached_prompt_tokens)
                yield pb.GenerateResponse(request_id=rid, finish_reason="abort", usage=usage.proto())
        except asyncio.CancelledError:
            obs.cancelled(context.time_remaining())
            raise  # client cancel or deadline: grpc already knows the status
        except Exception as exc:
            code, message = status_for(exc, rid)
            obs.failed(code.name, code.value[0], exc, message)
            if ctl is not None:
                _set_routed(context, ctl, obs.trailing_metadata())
            await context.abort(code, message)
        finally:
            obs.end()
            if ctl is not None:
                ctl.cancel()
                self.inflight.pop(rid, None)

    async def _build(self, request, rid, deadline, traceparent):
        if len(request.prompt) > 4096:  # tokenizing a long text: keep the event loop free
            return await asyncio.to_thread(self.validator.build, request, rid, deadline, traceparent)
        return self.validator.build(request, rid, deadline, traceparent)

    @staticmethod
    def _response(rid: str, chunk: StreamChunk, usage: _Usage) -> pb.GenerateResponse:
        usage.completion_tokens = chunk.num_output_tokens or usage.completion_tokens + len(chunk.token_ids)
        usage.cached_prompt_tokens = chunk.num_cached_tokens
        msg = pb.GenerateResponse(request_id=rid, token_ids=chunk.token_ids, text=chunk.text)
        if chunk.logprobs is not None:  # per token, hot path: build logprob messages only when asked
            msg.logprobs.extend(_logprobs(chunk.token_ids, chunk.logprobs))
        if chunk.finish_reason is not None:
            msg.finish_reason = chunk.finish_reason
            msg.usage.CopyFrom(usage.proto())
        return msg

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        ctl = self.inflight.get(request.request_id)
        if ctl is None:
            return pb.AbortResponse(found=False)
        ctl.abort()
        return pb.AbortResponse(found=True)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        info = self.validator.info
        return pb.ModelInfo(model_id=info.model_id, max_context_length=info.max_model_len,
                            vocab_size=info.vocab_size, eos_token_ids=list(info.eos_token_ids),
                            kv_block_size=info.block_size)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            self.validator.check_model(request.model)
            if not request.text:
                raise invalid("text: must not be empty")
            ids = await asyncio.to_thread(self.validator.tokenize, request.text, "text")
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        return pb.TokenizeResponse(token_ids=ids)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, pipeline, generation: GenerationServicer):
        self.pipeline = pipeline
        self.generation = generation

    async def GetWorkerStats(self, request, context) -> admin_pb2.GetWorkerStatsResponse:
        stats = await self.pipeline.worker_stats()
        workers = [admin_pb2.WorkerStats(
            role=s.role, replica_id=s.replica_id, node_id=s.node_id, kv_blocks_total=s.kv_blocks_total,
            kv_blocks_free=s.kv_blocks_free, num_running=s.num_running, num_waiting=s.num_waiting,
            num_open_streams=s.num_open_streams, num_kv_sent=s.num_kv_sent, num_kv_adopted=s.num_kv_adopted,
            num_kv_held=s.num_kv_held, metrics_address=s.metrics_address)
            for s in stats]
        return admin_pb2.GetWorkerStatsResponse(workers=workers,
                                                num_inflight_requests=len(self.generation.inflight),
                                                router_metrics_address=self.generation.telemetry.metrics_address)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
