"""Request bytes -> the method's message, or INVALID_ARGUMENT; never UNKNOWN with internals.

grpc answers a ``request_deserializer`` that raises (protobuf's ``DecodeError``: truncated bytes,
a wrong wire type, invalid UTF-8 in a string field) with UNKNOWN and ``Unexpected <class
'google.protobuf.message.DecodeError'>`` in the details, and logs a stack trace per request.
``DecodingInterceptor`` wraps every method handler of the server (Generation, Admin, Health,
reflection) so that:

- the deserializer first checks the size, then parses; a request that fails either becomes an
  ``Undecodable`` (never raised), and the wrapped behavior answers it with INVALID_ARGUMENT
  before the servicer sees anything;
- an exception a servicer lets escape (other than ``context.abort``) becomes the status of its
  kind (router/errors.py ``classify``: INTERNAL with a message naming no internals for a bug),
  not grpc's UNKNOWN with the exception's text.

Sizes (router config): a serialized request up to ``max_request_bytes`` (4 MiB) is parsed;
above it, up to grpc's transport limit ``max_message_bytes`` (64 MiB), the answer is
INVALID_ARGUMENT ``request: N bytes exceeds the limit of M bytes`` (the client's input is at
fault and a retry cannot succeed, as Google's APIs answer an oversized payload; RESOURCE_EXHAUSTED
means overload here, which clients may retry); above the transport limit grpc itself answers
RESOURCE_EXHAUSTED before this code runs.

Streaming requests (reflection) are checked message by message in the request iterator; a
servicer that reads requests with ``context.read()`` instead would see an ``Undecodable``.
Wrapped handlers are cached per method, so a call costs one dict lookup here.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from router.servicer import status_for


@dataclass(frozen=True)
class Undecodable:
    """A request that did not parse (or was too large): what to tell the client."""

    message: str  # the INVALID_ARGUMENT details; starts with "request:"


def request_decoder(deserializer: Callable[[bytes], object] | None, type_name: str,
                    max_bytes: int) -> Callable[[bytes], object]:
    """``deserializer`` behind a size check; any failure -> an ``Undecodable`` (nothing raises)."""

    def decode(raw: bytes):
        if len(raw) > max_bytes:
            return Undecodable(f"request: {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, or anything a parser raises on hostile bytes
            return Undecodable(f"request: not a valid {type_name} message (malformed protobuf or invalid UTF-8)")

    return decode


def message_name(deserializer, method: str) -> str:
    """The protobuf type a deserializer parses (``tandem.v1.GenerateRequest``), else the method."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or f"request of {method}"


async def _fail(context, exc: Exception, method: str):
    """Abort with the status of ``exc``'s kind (never grpc's UNKNOWN with the exception's text)."""
    code, message = status_for(exc, method)
    await context.abort(code, message)


def _guarded(behavior, method: str):
    """``behavior(request, context)`` that answers an ``Undecodable`` request and escaped
    exceptions cleanly; the same kind of callable (async generator / coroutine) as ``behavior``."""
    if inspect.isasyncgenfunction(behavior):
        async def guarded_stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            try:
                async with aclosing(behavior(request, context)) as items:
                    async for item in items:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, exc, method)
        return guarded_stream
    if inspect.iscoroutinefunction(behavior):
        async def guarded_call(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, exc, method)
        return guarded_call
    return None  # a sync behavior: left as it is (this server has none)


async def _checked(requests: AsyncIterator, context) -> AsyncIterator:
    """A streaming request's messages; the first ``Undecodable`` aborts with INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _with_checked_requests(behavior):
    """A stream-request ``behavior`` whose request iterator goes through ``_checked``."""
    if behavior is None:
        return None
    if inspect.isasyncgenfunction(behavior):
        async def stream(requests, context):
            async with aclosing(behavior(_checked(requests, context), context)) as items:
                async for item in items:
                    yield item
        return stream
    if inspect.iscoroutinefunction(behavior):
        async def call(requests, context):
            return await behavior(_checked(requests, context), context)
        return call
    return None


_FACTORIES = {  # (request_streaming, response_streaming) -> (handler factory, behavior attribute)
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def guard_handler(handler: grpc.RpcMethodHandler, method: str, max_request_bytes: int) -> grpc.RpcMethodHandler:
    """``handler`` with a decoding deserializer and a guarded behavior (the handler itself when
    its behavior is synchronous: it could not answer an ``Undecodable``)."""
    factory, attr = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behavior = getattr(handler, attr)
    if handler.request_streaming:
        behavior = _with_checked_requests(behavior)
    behavior = _guarded(behavior, method) if behavior is not None else None
    if behavior is None:
        return handler
    decode = request_decoder(handler.request_deserializer, message_name(handler.request_deserializer, method),
                             max_request_bytes)
    return factory(behavior, request_deserializer=decode, response_serializer=handler.response_serializer)


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler with ``guard_handler`` (see the module docstring)."""

    def __init__(self, max_request_bytes: int):
        self.max_request_bytes = max_request_bytes
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # method -> (orig, wrapped)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = guard_handler(handler, method, self.max_request_bytes)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
