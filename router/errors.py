"""Exceptions from validation and from the workers -> gRPC status codes (never a stack trace)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from ray import exceptions as ray_exc
from ray.serve import exceptions as serve_exc

from services.engine.scheduler import EngineOverloadedError
from services.types import KVTransferError, PrefillFailedError

log = logging.getLogger("tandem.router")
MAX_MESSAGE = 512


class RequestError(Exception):
    """A request the router rejects before any worker sees it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unwrap(exc: BaseException) -> BaseException:
    """The user exception inside a ``RayTaskError`` (raised in a replica), else ``exc``."""
    seen = 0
    while isinstance(exc, ray_exc.RayTaskError) and getattr(exc, "cause", None) is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg[:MAX_MESSAGE]


_UNAVAILABLE = (ray_exc.RayActorError, ray_exc.WorkerCrashedError, ray_exc.NodeDiedError,
                ray_exc.ObjectLostError, ray_exc.LocalRayletDiedError, serve_exc.DeploymentUnavailableError,
                KVTransferError, ConnectionError)


def status_for(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and a one-line message for an exception raised while serving a request."""
    inner = unwrap(exc)
    if isinstance(inner, RequestError):
        return inner.code, inner.message
    if isinstance(inner, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, _first_line(inner)
    if isinstance(inner, (EngineOverloadedError, serve_exc.BackPressureError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _first_line(inner)
    if isinstance(inner, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(inner, (serve_exc.RequestCancelledError, asyncio.CancelledError, ray_exc.TaskCancelledError)):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    if isinstance(inner, _UNAVAILABLE) or isinstance(exc, _UNAVAILABLE):
        log.warning("request %s: worker unavailable: %s", request_id, _first_line(inner))
        return grpc.StatusCode.UNAVAILABLE, f"no worker could serve the request: {type(inner).__name__}"
    if isinstance(inner, PrefillFailedError):
        log.error("request %s: %s", request_id, _first_line(inner))
        return grpc.StatusCode.INTERNAL, _first_line(inner)
    log.exception("request %s failed", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error while serving request {request_id!r}"
