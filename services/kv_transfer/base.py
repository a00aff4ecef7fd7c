"""The KV transfer interface and its registry of backends.

Glossary
- payload: the prompt KV of one request as one array
  ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V).
- handle: a ``services.types.KVHandle``: small, picklable, names the payload inside the
  backend. It travels prefill -> router -> decode; the payload travels only through the
  backend (never through the router).

Lifetime: the sender holds a payload from ``send`` until ``release`` (the decode side has
adopted it, or the request failed or was aborted while its KV was in flight). Nothing is
recomputed silently on the decode side when ``fetch`` fails: the request fails with
``KVTransferError``.
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from services.engine.plugins import HostDeps, PluginSection, Registry
from services.types import KVHandle, KVTransferError

_BIT_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # numpy has no bf16


@dataclass
class KVPayload:
    """The prompt KV of one request, in host or device memory."""

    request_id: str  # the request it belongs to
    kv: torch.Tensor  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    num_tokens: int  # prompt tokens covered

    @property
    def block_size(self) -> int:
        return self.kv.shape[3]

    def to_numpy(self) -> np.ndarray:
        """A numpy view of the (host) tensor; 16-bit floats are viewed as int16 bits."""
        t = self.kv.detach().cpu().contiguous()
        return t.view(_BIT_VIEWS.get(t.dtype, t.dtype)).numpy()

    @staticmethod
    def tensor_from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
        """Inverse of ``to_numpy``; shares memory with ``array`` (which may be read-only)."""
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(array)
        target = getattr(torch, dtype)
        return t.view(target) if t.dtype != target else t


class KVTransfer(abc.ABC):
    """Sends a payload from the prefill side and fetches it on the decode side.

    ``send`` runs in the prefill worker and returns at once with a handle; the sender keeps
    the payload until ``release(handle)`` (sender side, idempotent). ``fetch`` runs in the
    decode worker (any replica, any node). Implementations raise ``KVTransferError`` on any
    failure.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def send(self, payload: KVPayload, traceparent: str = "") -> KVHandle:
        """Make ``payload`` fetchable; the handle is all a receiver needs."""

    @abc.abstractmethod
    async def fetch(self, handle: KVHandle) -> KVPayload:
        """The payload named by ``handle`` (host memory; may share the backend's buffer)."""

    @abc.abstractmethod
    def release(self, handle: KVHandle) -> None:
        """Sender side: drop the payload (adopted by decode, or the request ended)."""

    @abc.abstractmethod
    def num_held(self) -> int:
        """Sender side: payloads sent and not yet released."""

    @staticmethod
    def check(handle: KVHandle, payload_kv: torch.Tensor) -> None:
        if tuple(payload_kv.shape) != tuple(handle.shape):
            raise KVTransferError(f"KV of {handle.request_id!r} has shape {tuple(payload_kv.shape)}, "
                                  f"handle says {tuple(handle.shape)}")


# Backends: one module of this package each, registering a factory ``(options, deps) -> KVTransfer``
# (a KVTransfer subclass whose __init__ takes (options, deps)) with ``KV_TRANSFERS.register(name)``;
# the worker config's ``kv_transfer`` section picks one. The modules are found on first use.
KV_TRANSFERS: Registry[KVTransfer] = Registry("kv_transfer", discover="services.kv_transfer")


def register(name: str, options: type | None = None):
    """Class decorator: make a backend available under ``name`` (``KV_TRANSFERS.register``)."""

    def wrap(cls):
        cls.name = name
        return KV_TRANSFERS.register(name, **({"options": options} if options else {}))(cls)

    return wrap


def available() -> list[str]:
    return KV_TRANSFERS.names()


def create(section: PluginSection | str, deps: HostDeps | None = None) -> KVTransfer:
    """The backend ``section`` (or a bare name) picks, built with the host's ``deps``."""
    return KV_TRANSFERS.create(section, deps)
