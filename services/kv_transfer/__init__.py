"""Moving the prompt KV of a request from a prefill worker to a decode worker.

A backend is a ``KVTransfer`` subclass registered under a name; adding one (Redis, a GPU
transport) is one file that calls ``register``. The Ray object store backend ("ray") is the
default.
"""

from services.kv_transfer.base import KVPayload, KVTransfer, available, create, register
from services.kv_transfer import ray_store  # noqa: F401  (registers "ray")

__all__ = ["KVPayload", "KVTransfer", "available", "create", "register"]
