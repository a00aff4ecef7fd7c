"""Moving the prompt KV of a request from a prefill worker to a decode worker.

A backend is a ``KVTransfer`` subclass in its own module of this package, registered under a
name with ``register`` (``KV_TRANSFERS``); adding one (Redis, a GPU transport) is one file, found
by the registry on first use. The Ray object store backend ("ray", ray_store.py) is the default.
"""

from services.kv_transfer.base import KV_TRANSFERS, KVPayload, KVTransfer, available, create, register

__all__ = ["KV_TRANSFERS", "KVPayload", "KVTransfer", "available", "create", "register"]
