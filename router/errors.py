"""Why a request failed, whatever the protocol: ``ErrorKind`` + a one-line message (never a stack trace).

Exceptions from validation and from the workers (Ray re-raises a replica's exception as a
``RayTaskError`` subclass of the original class) become a ``RequestError`` in ``classify``;
each protocol adapter maps the kind to its own status in one table (gRPC: router/servicer.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging

from ray import exceptions as ray_exc
from ray.serve import exceptions as serve_exc

from services.engine.model.experts import ExpertsUnavailableError
from services.engine.scheduler import EngineOverloadedError
from services.types import KVTransferError, PrefillFailedError

log = logging.getLogger("tandem.router")
MAX_MESSAGE = 512  # characters of a client-facing error message at most
MAX_SHOWN = 200  # characters of an input value echoed into an error message at most


class ErrorKind(enum.Enum):
    """The kinds of failure a client can see.

    Values are the canonical codes of ``google.rpc.Code``, which gRPC's status codes share and
    HTTP mappings start from, so metrics and spans name a failure the same way whatever protocol
    carried the request. Kinds may be added (UNAUTHENTICATED = 16, PERMISSION_DENIED = 7 for auth).
    """

    CANCELLED = 1  # the client went away, or the request was cancelled
    INVALID_ARGUMENT = 3  # bad input; the message starts with the field's name
    DEADLINE_EXCEEDED = 4  # the request's deadline passed
    NOT_FOUND = 5  # something the request names is not here (a model that is not served)
    RESOURCE_EXHAUSTED = 8  # overload: an admission limit of the router or of an engine
    INTERNAL = 13  # a bug or a failed prefill; the message names no internals
    UNAVAILABLE = 14  # no worker could serve it (a replica died, the KV was lost)


class RequestError(Exception):
    """A request that failed: its ``kind`` and a one-line ``message`` for the client."""

    def __init__(self, kind: ErrorKind, message: str):
        message = capped(message, MAX_MESSAGE)
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def code(self):
        """The gRPC status code of ``kind`` (the gRPC adapter's table, router/servicer.py)."""
        from router.servicer import grpc_status

        return grpc_status(self.kind)


def capped(text: str, limit: int) -> str:
    """``text`` itself, or when longer its start + "... (N characters)", ``limit`` characters in all."""
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text)} characters)"
    return text[:max(limit - len(suffix), 0)] + suffix


def shown(value: str, limit: int = MAX_SHOWN) -> str:
    """An input value as an error message quotes it: ``repr(value)``, or for a value longer than
    ``limit`` the repr of its first ``limit`` characters + "... (N characters)" (a client's
    16,000-character model name must not come back whole: grpc caps a status's size)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def invalid(message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_ARGUMENT, message)


def unwrap(exc: BaseException) -> BaseException:
    """The user exception inside a ``RayTaskError`` (raised in a replica), else ``exc``."""
    seen = 0
    while isinstance(exc, ray_exc.RayTaskError) and getattr(exc, "cause", None) is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return capped(text[0] if text else type(exc).__name__, MAX_MESSAGE)


_UNAVAILABLE = (ray_exc.RayActorError, ray_exc.WorkerCrashedError, ray_exc.NodeDiedError,
                ray_exc.ObjectLostError, ray_exc.LocalRayletDiedError, serve_exc.DeploymentUnavailableError,
                KVTransferError, ConnectionError, ExpertsUnavailableError)
_CANCELLED = (serve_exc.RequestCancelledError, asyncio.CancelledError, ray_exc.TaskCancelledError)


def classify(exc: BaseException, request_id: str = "") -> RequestError:
    """The kind and one-line message of an exception raised while serving a request
    (``exc`` itself when it is a ``RequestError``). Logs what the operator must see."""
    inner = unwrap(exc)
    if isinstance(inner, RequestError):
        return inner
    if isinstance(inner, ValueError):
        return RequestError(ErrorKind.INVALID_ARGUMENT, _first_line(inner))
    if isinstance(inner, (EngineOverloadedError, serve_exc.BackPressureError)):
        return RequestError(ErrorKind.RESOURCE_EXHAUSTED, _first_line(inner))
    if isinstance(inner, (TimeoutError, asyncio.TimeoutError)):
        return RequestError(ErrorKind.DEADLINE_EXCEEDED, "deadline exceeded")
    if isinstance(inner, _CANCELLED):
        return RequestError(ErrorKind.CANCELLED, "request cancelled")
    if isinstance(inner, _UNAVAILABLE) or isinstance(exc, _UNAVAILABLE):
        log.warning("request %s: worker unavailable: %s", request_id, _first_line(inner))
        return RequestError(ErrorKind.UNAVAILABLE, f"no worker could serve the request: {type(inner).__name__}")
    if isinstance(inner, PrefillFailedError):
        log.error("request %s: %s", request_id, _first_line(inner))
        return RequestError(ErrorKind.INTERNAL, _first_line(inner))
    log.exception("request %s failed", request_id, exc_info=exc)
    return RequestError(ErrorKind.INTERNAL, f"internal error while serving request {shown(request_id)}")
