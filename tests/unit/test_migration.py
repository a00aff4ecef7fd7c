"""Live-stream migration (router/migration.py) through the request lifecycle, without Ray: a fake
pipeline whose replicas fail on cue stands in for the workers."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from ray import exceptions as ray_exc

from router.app import parse_args
from router.channels import NoReplicaError, WorkerDispatch
from router.errors import ErrorKind, RequestError
from router.lifecycle import AdmissionLimits, RequestLifecycle
from router.migration import KV_LOST, REPLICA_DIED, MigrationConfig, migration_reason
from router.replica_directory import ReplicaDirectory
from router.validation import GenerateInput, Limits, RequestValidator
from services.engine.make_model import make_model
from services.engine.scheduler import EngineOverloadedError
from services.telemetry.metrics import MIGRATION_REASONS, Identity
from services.telemetry.router_telemetry import RouterTelemetry
from services.types import KVTransferError, ModelInfo, StreamChunk, WrongReplicaError
from tests.unit.test_lifecycle import FakeResponse, FakeTokenizer, run

LABELS = {"model": "m", "role": "router", "replica": "r0"}
OUTPUT = list(range(20, 30))  # the whole output of the fake model, whatever replica computes it


def _in_replica(exc: BaseException) -> BaseException:
    return ray_exc.RayTaskError("submit", "Traceback ...", exc).as_instanceof_cause()


class FailingReplicas:
    """A pipeline over replicas u0, u1, ...: attempt i runs on replica u<i> and, if ``failures``
    has an i-th entry (n, exc), raises ``exc`` after n more tokens. It resumes after
    ``call.resume_token_ids`` exactly as a real engine continues (OUTPUT is the answer), and
    never runs on a replica in ``ctl.excluded``."""

    def __init__(self, failures=(), per_chunk: int = 2):
        self.failures = list(failures)
        self.per_chunk = per_chunk
        self.calls = []

    async def run(self, call, ctl):
        attempt = len(self.calls)
        self.calls.append(call)
        replica = f"u{attempt}"
        assert replica not in ctl.excluded
        ctl.place("unified", replica)
        response = FakeResponse()
        ctl.attach(response)
        try:
            done = len(call.resume_token_ids)
            assert call.resume_token_ids == OUTPUT[:done]
            limit = len(OUTPUT) if attempt >= len(self.failures) else done + self.failures[attempt][0]
            while done < limit:
                n = min(self.per_chunk, limit - done)
                done += n
                finish = "length" if done == len(OUTPUT) else None
                yield StreamChunk(OUTPUT[done - n:done], "x" * n, finish_reason=finish, num_prompt_tokens=3,
                                  num_cached_tokens=16 if not call.resume_token_ids else 3 + done,
                                  num_output_tokens=done)
                await asyncio.sleep(0)
            if attempt < len(self.failures):
                raise self.failures[attempt][1]
        finally:
            ctl.detach(response)


def lifecycle(pipeline, max_migrations: int = 2, tracer=None) -> RequestLifecycle:
    info = ModelInfo("m", max_model_len=256, vocab_size=512, eos_token_ids=(1,), block_size=16)
    validator = RequestValidator(info, FakeTokenizer(), Limits(max_prompt_bytes=4096))
    telemetry = RouterTelemetry(Identity("m", "router", "r0"), tracer=tracer)
    return RequestLifecycle(pipeline, validator, AdmissionLimits(8), telemetry, MigrationConfig(max_migrations))


def migrations(lc, reason: str) -> float:
    return lc.telemetry.metrics.registry.get_sample_value("tandem_migrations_total", {**LABELS, "reason": reason})


async def drain(lc, rid="r1"):
    live = lc.start(GenerateInput(prompt_token_ids=[5, 6, 7], request_id=rid))
    return live, [c async for c in live.stream()]


def test_a_stream_whose_replica_dies_goes_on_elsewhere_without_an_error():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pipeline = FailingReplicas([(4, ConnectionError("channel to replica u0 broke"))])
    lc = lifecycle(pipeline, tracer=provider.get_tracer("test"))
    live, got = run(drain(lc))
    assert [t for c in got for t in c.token_ids] == OUTPUT and got[-1].finish_reason == "length"
    assert [c.resume_token_ids for c in pipeline.calls] == [[], OUTPUT[:4]]
    assert {c.request_id for c in pipeline.calls} == {"r1"}
    assert live.routed == {"unified": "u1"}
    # the client's usage is the first placement's (not the recompute's cache hit)
    assert (live.usage.completion_tokens, live.usage.cached_prompt_tokens) == (10, 16)
    assert migrations(lc, REPLICA_DIED) == 1 and migrations(lc, KV_LOST) == 0
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "tandem.generate"]
    (event,) = [e for e in span.events if e.name == "tandem.migration"]
    assert dict(event.attributes) == {"tandem.migration.reason": REPLICA_DIED, "tandem.migration.role": "unified",
                                      "tandem.migration.from_replica": "u0", "tandem.migration.attempt": 1,
                                      "tandem.migration.resumed_tokens": 4}
    assert lc.num_inflight == 0


def test_a_dead_replica_is_excluded_and_a_lost_kv_is_not():
    seen = []

    class Recording(FailingReplicas):
        async def run(self, call, ctl):
            seen.append(set(ctl.excluded))
            async for c in super().run(call, ctl):
                yield c

    pipeline = Recording([(2, _in_replica(KVTransferError("fetch failed"))), (2, ray_exc.ActorDiedError())])
    lc = lifecycle(pipeline)
    _, got = run(drain(lc))
    assert [t for c in got for t in c.token_ids] == OUTPUT
    assert seen == [set(), set(), {"u1"}]  # u0 only lost the KV; u1 died
    assert [len(c.resume_token_ids) for c in pipeline.calls] == [0, 2, 4]
    assert migrations(lc, KV_LOST) == 1 and migrations(lc, REPLICA_DIED) == 1


def test_a_failure_before_any_token_starts_the_request_over():
    pipeline = FailingReplicas([(0, ray_exc.RayActorError())])
    _, got = run(drain(lifecycle(pipeline)))
    assert [t for c in got for t in c.token_ids] == OUTPUT
    assert [c.resume_token_ids for c in pipeline.calls] == [[], []]


def test_migrations_are_bounded_then_the_client_gets_unavailable():
    pipeline = FailingReplicas([(2, ConnectionError("broke"))] * 3)
    lc = lifecycle(pipeline, max_migrations=2)
    with pytest.raises(RequestError) as info:
        run(drain(lc))
    assert info.value.kind == ErrorKind.UNAVAILABLE and len(pipeline.calls) == 3
    assert migrations(lc, REPLICA_DIED) == 2 and lc.num_inflight == 0
    assert lc.telemetry.metrics.registry.get_sample_value("tandem_requests_failed_total",
                                                          {**LABELS, "code": "UNAVAILABLE"}) == 1


def test_zero_migrations_turns_it_off():
    pipeline = FailingReplicas([(2, ConnectionError("broke"))])
    with pytest.raises(RequestError) as info:
        run(drain(lifecycle(pipeline, max_migrations=0)))
    assert info.value.kind == ErrorKind.UNAVAILABLE and len(pipeline.calls) == 1


@pytest.mark.parametrize("exc,kind", [
    (NoReplicaError("no live replica of UnifiedWorker"), ErrorKind.UNAVAILABLE),
    (ValueError("max_tokens: too many"), ErrorKind.INVALID_ARGUMENT),
    (_in_replica(EngineOverloadedError("queue full")), ErrorKind.RESOURCE_EXHAUSTED),
    (RuntimeError("a bug"), ErrorKind.INTERNAL),
])
def test_failures_another_replica_cannot_mend_are_not_migrated(exc, kind):
    pipeline = FailingReplicas([(2, exc)])
    with pytest.raises(RequestError) as info:
        run(drain(lifecycle(pipeline)))
    assert info.value.kind == kind and len(pipeline.calls) == 1


def test_an_aborted_request_is_not_migrated():
    class AbortThenFail(FailingReplicas):
        async def run(self, call, ctl):
            async for c in super().run(call, ctl):
                yield c
                if c.num_output_tokens == 2:  # aborted here: the failure that follows is the cancelled call's
                    lc.abort("r1")

    pipeline = AbortThenFail([(2, ConnectionError("broke"))])
    lc = lifecycle(pipeline)
    _, got = run(drain(lc))
    assert got[-1].finish_reason == "abort" and len(pipeline.calls) == 1
    assert migrations(lc, REPLICA_DIED) == 0


@pytest.mark.parametrize("exc,reason", [
    (ConnectionError("channel broke"), REPLICA_DIED),
    (ray_exc.RayActorError(), REPLICA_DIED),
    (ray_exc.ActorDiedError(), REPLICA_DIED),
    (ray_exc.WorkerCrashedError(), REPLICA_DIED),
    (WrongReplicaError("left the set"), REPLICA_DIED),
    (KVTransferError("lost"), KV_LOST),
    (_in_replica(KVTransferError("fetch failed")), KV_LOST),
    (ray_exc.OwnerDiedError("ab" * 14, None, ""), KV_LOST),
    (NoReplicaError("none"), None),
    (ValueError("x"), None),
    (asyncio.CancelledError(), None),
    (TimeoutError(), None),
])
def test_migration_reasons(exc, reason):
    assert migration_reason(exc) == reason


def test_the_reasons_are_the_metric_labels():
    assert set(MIGRATION_REASONS) == {REPLICA_DIED, KV_LOST}


def test_max_migrations_is_validated_where_the_app_is_built(tmp_path):
    model = str(make_model("tiny-llama", tmp_path))
    assert parse_args({"model": model}).router.max_migrations == 2
    assert parse_args({"model": model, "router": {"max_migrations": 0}}).router.max_migrations == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"args\.router: max_migrations: must be an integer >= 0"):
            parse_args({"model": model, "router": {"max_migrations": bad}})


# ---- the replica choice of a migrating request (router/channels.py) -------------------------
class _Directory:
    """What Serve's request router is to ``ReplicaDirectory``: a replica list."""

    def __init__(self, ids):
        self.ids = ids

    def replica_list(self):
        return [SimpleNamespace(replica_id=SimpleNamespace(unique_id=i), routing_stats={}) for i in self.ids]


class _Handle:
    def __init__(self, name):
        self.deployment_name = name
        self.model_info = SimpleNamespace(remote=self._never)

    async def _never(self):  # a handle with no replica: the call waits for one
        await asyncio.sleep(3600)


def test_a_migrating_request_never_gets_a_failed_replica_and_does_not_wait_for_one():
    async def main():
        ReplicaDirectory.register("MigW", _Directory(["a", "b", "c"]))
        dispatch = WorkerDispatch(_Handle("MigW"))
        dispatch._mark_broken("b")  # its channel broke: no request goes there while it is listed
        chosen = {await dispatch.choose((), "", {"a"}) for _ in range(6)}
        with pytest.raises(NoReplicaError):
            await dispatch.choose((), "c", {"a", "c"})  # a hint of a failed replica is no way round
        ReplicaDirectory.register("MigW", _Directory([]))  # Serve dropped the dead one, none new yet
        start = time.monotonic()
        with pytest.raises(NoReplicaError):
            await dispatch.choose((), "", {"a"})
        return chosen, time.monotonic() - start

    chosen, waited = run(main())
    assert chosen == {"c"} and waited < 1.0


def test_draft_counts_of_every_placement_add_up_in_the_usage():
    """Each replica counts a request's drafts from 0: after a migration the usage keeps the
    earlier placement's counts and adds the new one's."""

    class Drafting(FailingReplicas):
        async def run(self, call, ctl):
            n = 0
            async for c in super().run(call, ctl):
                n += 1
                c.num_drafts, c.num_draft_tokens, c.num_accepted_draft_tokens = n, 3 * n, 2 * n
                yield c

    pipeline = Drafting([(4, ConnectionError("channel to replica u0 broke"))])  # 2 chunks there, then 3 on u1
    live, got = run(drain(lifecycle(pipeline)))
    assert [t for c in got for t in c.token_ids] == OUTPUT
    assert [c.num_drafts for c in got] == [1, 2, 3, 4, 5]
    u = live.usage
    assert (u.draft_steps, u.draft_tokens, u.accepted_draft_tokens) == (5, 15, 10)
