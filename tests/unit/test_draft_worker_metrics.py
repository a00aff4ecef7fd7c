"""The DraftWorker client's counters on /metrics: series only for an engine with a remote draft,
each failure reason exported from the start, steps without drafts counting pauses too."""

from prometheus_client import CollectorRegistry

from services.engine.engine import EngineStats
from services.engine.spec_decode.base import RemoteProposerStats
from services.telemetry.metrics import EngineCollector, Identity

IDS = {"model": "m", "role": "decode", "replica": "d0"}


def registry(stats: EngineStats) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(EngineCollector(Identity("m", "decode", "d0"), lambda: stats))
    return reg


def test_a_remote_draft_exports_calls_failures_by_reason_and_steps_without_drafts():
    remote = RemoteProposerStats(num_calls=10, num_timeouts=2, num_unavailable=1, num_skipped_steps=4,
                                 call_seconds=0.05)
    reg = registry(EngineStats(spec_remote=remote))
    value = lambda name, **extra: reg.get_sample_value(name, {**IDS, **extra})
    assert value("tandem_spec_decode_draft_worker_calls_total") == 10
    assert value("tandem_spec_decode_draft_worker_failures_total", reason="timeout") == 2
    assert value("tandem_spec_decode_draft_worker_failures_total", reason="unavailable") == 1
    assert value("tandem_spec_decode_draft_worker_failures_total", reason="error") == 0
    assert value("tandem_spec_decode_draft_worker_steps_without_drafts_total") == 7
    assert value("tandem_spec_decode_draft_worker_call_seconds_total") == 0.05


def test_a_local_draft_exports_no_draft_worker_series():
    reg = registry(EngineStats())
    assert reg.get_sample_value("tandem_spec_decode_draft_worker_calls_total", IDS) is None
    assert reg.get_sample_value("tandem_spec_decode_draft_worker_failures_total", {**IDS, "reason": "timeout"}) is None
