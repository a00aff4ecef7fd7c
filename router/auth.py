"""Optional API keys of the router's gRPC server: ``authorization: Bearer <key>`` metadata.

Keys come from the environment or from files, never from code or a config YAML
(services/engine/env.py: TANDEM_API_KEYS / TANDEM_API_KEYS_FILE for the Generation service,
TANDEM_ADMIN_API_KEYS / TANDEM_ADMIN_API_KEYS_FILE for Admin). Rules, per service:

- Health (``grpc.health.v1.Health``) and reflection stay open: load balancers and Serve's
  launcher probe them without a key, and they reveal nothing but service names and SERVING.
- Generation (and any other service) needs one of the API keys when any is set.
- Admin needs one of the admin keys when any is set; when API keys are on and no admin key is
  set, Admin refuses every call (it is never the open door beside a closed one).
- A refused call ends UNAUTHENTICATED before its request is even parsed; the message says
  only "missing" or "invalid", never which keys exist.

A presented key is compared with every configured key by ``hmac.compare_digest`` (constant
time per key; all keys are compared, so the time does not say which one matched). The
caller's identity is the matching key's fingerprint (``key-`` + 12 hex digits of its SHA-256;
never the key itself): the request lifecycle (router/lifecycle.py) scopes request ids and
Abort by it, so one key's caller can neither abort nor detect another's requests.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.engine import env

OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
ADMIN_SERVICE = "tandem.v1.Admin"
MIN_KEY_CHARS = 16  # a shorter key is a configuration error (guessable)
HEADER = "authorization"
SCHEME = "bearer"


@dataclass(frozen=True)
class AuthConfig:
    """The accepted keys; both empty = no authentication (the default)."""

    api_keys: tuple[str, ...] = ()  # keys of the Generation service
    admin_keys: tuple[str, ...] = ()  # keys of the Admin service

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    @classmethod
    def from_env(cls, environ=None) -> "AuthConfig":
        """Keys from TANDEM_API_KEYS(_FILE) and TANDEM_ADMIN_API_KEYS(_FILE); ValueError naming
        the variable on an unreadable file or a bad key."""
        return cls(api_keys=_keys("TANDEM_API_KEYS", *env.api_keys(False, environ)),
                   admin_keys=_keys("TANDEM_ADMIN_API_KEYS", *env.api_keys(True, environ)))


def _keys(name: str, raw: str, file: str | None) -> tuple[str, ...]:
    """The keys of a comma-separated list and of a file (one per line, # comments)."""
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"{name}_FILE: cannot read {file!r}: {exc.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ValueError(f"{name}_FILE: {file!r} holds no key")
    for i, key in enumerate(keys):
        if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
            raise ValueError(f"{name}: key #{i + 1} must be at least {MIN_KEY_CHARS} printable ASCII characters "
                             "without spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return tuple(dict.fromkeys(keys))


def fingerprint(key: str) -> str:
    """The identity of a key's callers: safe to log, never the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry of a call's metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == HEADER and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == SCHEME and token.strip():
                return token.strip()
    return None


def match(token: str | None, keys: tuple[str, ...]) -> str | None:
    """The fingerprint of the key ``token`` equals (every key compared in constant time), or None."""
    if token is None:
        return None
    presented = token.encode()
    found = None
    for key in keys:  # no early exit: the time does not tell which key matched
        if hmac.compare_digest(presented, key.encode()):
            found = key
    return fingerprint(found) if found is not None else None


class Authenticator:
    """Decides each call (module docstring) and names its caller."""

    def __init__(self, config: AuthConfig):
        self.config = config

    def refusal(self, method: str, metadata) -> str | None:
        """Why a call of ``method`` ("/pkg.Service/Method") with ``metadata`` is refused; None = allowed."""
        service = method.strip("/").split("/")[0]
        if service in OPEN_SERVICES:
            return None
        if service == ADMIN_SERVICE:
            keys = self.config.admin_keys
            if not keys:
                return "Admin is closed: API keys are on and no admin key is set" if self.config.api_keys else None
        else:
            keys = self.config.api_keys
            if not keys:
                return None
        token = bearer_token(metadata)
        if token is None:
            return "missing API key: send metadata `authorization: Bearer <key>`"
        return None if match(token, keys) is not None else "invalid API key"

    def identity(self, metadata) -> str:
        """The caller of a Generation call: its key's fingerprint ("" when API keys are off)."""
        if not self.config.api_keys:
            return ""
        return match(bearer_token(metadata), self.config.api_keys) or ""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Ends a refused call UNAUTHENTICATED before its handler (or its request parser) runs."""

    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        reason = self.authenticator.refusal(details.method, details.invocation_metadata)
        if reason is None or handler is None:
            return handler
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED without reading the request."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)
