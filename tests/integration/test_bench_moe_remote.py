"""``tandem bench moe``'s remote run, end to end on a tiny Mixtral: ``local`` then ``remote``
(2 ExpertWorker shards as real Serve deployments on a local Ray head started by the bench's
``--one remote`` process), one request of 4 tokens. The report has the remote record with its
ratio to local, tokens, shard calls from both shards, and once the bench has returned, the
shard replicas' processes are gone (the run shut its Ray down)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import moe
from bench.moe_remote import alive
from services.engine.make_model import make_model


@pytest.mark.timeout(300)
def test_bench_moe_remote_run_reports_against_local(tmp_path, capsys):
    model = make_model("tiny-mixtral", tmp_path / "tiny-mixtral")
    out = tmp_path / "moe.json"
    rc = moe.main(["--model", str(model), "--fractions", "", "--concurrency", "1", "--output-len", "4",
                   "--prompt-len", "8", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    local, remote = report["results"]
    assert (local["config"], remote["config"]) == ("local", "remote")
    assert local["vs_local"] == {"1": 1.0}
    (level,) = remote["levels"]
    assert level["output_tokens"] == 4 and level["decode_tok_per_s"] > 0
    assert remote["vs_local"]["1"] == pytest.approx(level["decode_tok_per_s"] / local["levels"][0]["decode_tok_per_s"])
    calls = remote["remote_calls"]
    assert calls["calls"] > 0 and calls["failures"] == 0 and calls["p99_ms"] >= calls["p50_ms"] > 0
    shards = remote["shards"]
    assert [(s["shard"], s["experts"]) for s in shards] == [(0, [0, 2]), (1, [2, 4])]
    assert all(s["calls"] > 0 and s["rows"] > 0 for s in shards)
    assert sum(s["calls"] for s in shards) == calls["total_calls"]
    assert remote["peak_rss_bytes"] > 0 and all(s["peak_rss_bytes"] > 0 for s in shards)
    assert remote["processes_killed"] == 0  # Ray's own shutdown ended them all
    deadline = time.monotonic() + 10
    while any(alive(s["pid"]) for s in shards) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(s["pid"]) for s in shards)
    assert "remote c=1:" in capsys.readouterr().out
