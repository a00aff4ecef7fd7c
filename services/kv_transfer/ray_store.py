"""KV transfer through the Ray object store (the default backend).

``send`` puts the payload as a numpy array (one copy into shared memory, no pickling of
tensor data); ``fetch`` awaits the ObjectRef and gets a zero-copy read-only view on the
same node, or a plasma-to-plasma copy across nodes.

The sender (the object's owner) keeps its own reference until ``release``. Borrowed
references alone are not enough on Ray 2.60: when the router passes the borrowed ref on,
nested in a handle call's arguments, to the decode replica, the object can be freed once
the owner drops its reference, before the decode replica fetches it
(ReferenceCountingAssertionError, reproduced at 64 concurrent requests).

Do not combine with Serve's gRPC transport between replicas (RAY_SERVE_USE_GRPC_BY_DEFAULT,
part of RAY_SERVE_THROUGHPUT_OPTIMIZED): it pickles handle arguments itself, the ObjectRef
travels out of band and Ray pins every payload forever (measured: 100 requests left 49 MiB
in plasma). ``check_transport`` warns about it.
"""

from __future__ import annotations

import logging

import ray

from services.engine import env
from services.engine.plugins import HostDeps, NoOptions
from services.kv_transfer.base import KVPayload, KVTransfer, register
from services.types import KVHandle, KVTransferError


log = logging.getLogger("tandem.kv_transfer")


def check_transport() -> None:
    """Warn when Serve's gRPC transport is on: it would leak every KV payload (see above)."""
    on = env.serve_grpc_transport()
    if on:
        log.warning("kv_transfer[ray]: %s is set; Serve's gRPC transport pins every KV payload in the "
                    "object store (memory leak). Unset it for P/D mode.", "/".join(on))


@register("ray")
class RayObjectStoreTransfer(KVTransfer):
    def __init__(self, options: NoOptions | None = None, deps: HostDeps | None = None):
        self._held: dict[str, ray.ObjectRef] = {}
        check_transport()

    def release(self, handle: KVHandle) -> None:
        self._held.pop(handle.request_id, None)

    def num_held(self) -> int:
        return len(self._held)

    def send(self, payload: KVPayload, traceparent: str = "") -> KVHandle:
        array = payload.to_numpy()
        try:
            ref = ray.put(array)
        except Exception as exc:
            raise KVTransferError(f"kv_transfer[ray]: put of {payload.request_id!r} failed: {exc}") from exc
        self._held[payload.request_id] = ref
        kv = payload.kv
        return KVHandle(backend=self.name, request_id=payload.request_id, num_tokens=payload.num_tokens,
                        num_blocks=kv.shape[2], block_size=kv.shape[3],
                        dtype=str(kv.dtype).removeprefix("torch."), shape=tuple(kv.shape),
                        locator=ref, traceparent=traceparent)

    async def fetch(self, handle: KVHandle) -> KVPayload:
        if not isinstance(handle.locator, ray.ObjectRef):
            raise KVTransferError(f"kv_transfer[ray]: handle of {handle.request_id!r} holds no ObjectRef")
        try:
            array = await handle.locator
        except Exception as exc:  # owner died, object lost, ...
            raise KVTransferError(f"kv_transfer[ray]: fetch of {handle.request_id!r} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        kv = KVPayload.tensor_from_numpy(array, handle.dtype)
        self.check(handle, kv)
        return KVPayload(handle.request_id, kv, handle.num_tokens)
