"""An in-process stand-in for a DraftWorker's Serve handle (tests of the protocol and the engine
side without Ray; the real deployment is tested over gRPC in tests/integration/test_spec_decode_serve.py)."""

from __future__ import annotations

import asyncio

from services.draft_service import DraftService


class Method:
    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


class InProcessHandle:
    """Stands in for the DraftWorker's Serve handle: awaitable calls into a DraftService."""

    def __init__(self, svc: DraftService):
        self.svc = svc
        self.delay_s = 0.0
        self.error: Exception | None = None
        self.propose = Method(self._propose)
        self.release = Method(self._release)

    async def _propose(self, call, route=None):
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.svc.propose([call])[0]

    async def _release(self, release, route=None):
        self.svc.release(release.client_id, release.seq_ids)
