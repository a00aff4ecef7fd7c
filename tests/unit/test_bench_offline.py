"""Smoke test of the offline benchmark on a tiny random-weight checkpoint (Tandem + transformers)."""

import json

import pytest

pytest.importorskip("transformers")

from bench import offline  # noqa: E402
from bench.workload import Workload, batch_prompts, prompts  # noqa: E402
from services.engine.make_model import make_model  # noqa: E402


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_prompts_match_anchor_formula():
    # bench-anchors/common.py: random.Random(seed * 1000003 + length), randrange(4, vocab)
    import random
    rng = random.Random(1008 * 1000003 + 16)
    assert prompts(2, 16, seed=1008, vocab=50000)[0] == [rng.randrange(4, 32000) for _ in range(16)]
    wl = Workload((8,), 16, 4, 0, 1)
    assert batch_prompts(wl, 8, vocab=512) == prompts(8, 16, seed=1008, vocab=512)
    assert all(4 <= t < 512 for p in batch_prompts(wl, 8, vocab=512) for t in p)


def test_offline_smoke(tmp_path, capsys):
    import torch
    threads = torch.get_num_threads()
    # one thread: on a busy shared box, 2-thread OpenMP regions wait for descheduled threads
    model = make_model("tiny-llama", tmp_path / "tiny-llama")
    out = tmp_path / "bench.json"
    rc = offline.main(["--model", str(model), "--prompt-len", "16", "--output-len", "4",
                       "--concurrency", "1,2", "--ttft-len", "32", "--ttft-reps", "1",
                       "--bandwidth-mib", "32", "--threads", "1", "--json", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    out_text = capsys.readouterr().out
    assert "out tok/s c=2" in out_text
    res = json.loads(out.read_text())

    for engine in ("tandem", "hf"):
        runs = {r["concurrency"]: r for r in res[engine]["runs"]}
        assert sorted(runs) == [1, 2]
        for c, r in runs.items():
            assert _positive(r["out_tok_per_s"]) and _positive(r["wall_s"])
            assert len(r["out_tok_per_s_rounds"]) == 3  # --rounds defaults to 3
            assert min(r["out_tok_per_s_rounds"]) <= r["out_tok_per_s"] <= max(r["out_tok_per_s_rounds"])
            if engine == "tandem":
                assert r["tpot_s"]["p50"] <= r["tpot_s"]["p90"] <= r["tpot_s"]["p99"]
                for metric in ("ttft_s", "tpot_s", "e2e_s"):
                    assert all(_positive(r[metric][p]) for p in ("p50", "p90", "p99")), (engine, c, metric)
            else:
                assert _positive(r["ttft_s"]) and _positive(r["tpot_s"])
            assert len(r["token_ids"]) == c and all(len(ids) == 4 for ids in r["token_ids"])
        assert _positive(res[engine]["ttft_long"]["ttft_s"])
        assert res[engine]["ttft_long"]["prompt_len"] == 32

    for c in (0, 1):  # same greedy tokens from both engines for every request of every batch
        assert res["tandem"]["runs"][c]["token_ids"] == res["hf"]["runs"][c]["token_ids"]

    sp = res["sysperf"]
    assert _positive(sp["read_bw_GBps"]) and _positive(sp["weight_bytes_per_token"]) and _positive(sp["tpot_floor_s"])
    readings = sp["read_bw_GBps_readings"]
    assert sorted(readings) == ["after", "before"] and all("torch_sum" in r for r in readings.values())
    every = [v for r in readings.values() for v in r.values()]
    for engine in ("tandem", "hf"):  # each batch-1 round is bracketed by readings of both probes
        level = res[engine]["runs"][0]
        assert len(level["rounds_tpot_s"]) == len(level["rounds_read_bw_GBps"]) == 3
        assert "rounds_read_bw_GBps" not in res[engine]["runs"][1]  # c=2 is not probed
        paired = sp["paired_floor_ratio"][engine]
        for tpot, bw, ratio in zip(level["rounds_tpot_s"], level["rounds_read_bw_GBps"], paired["rounds"]):
            assert sorted(bw) == ["after", "before"] and all("torch_sum" in r for r in bw.values())
            highest = max(v for r in bw.values() for v in r.values())
            assert ratio == pytest.approx(tpot / (sp["weight_bytes_per_token"] / (highest * 1e9)))
            every += [v for r in bw.values() for v in r.values()]
        assert paired["ratio"] == sorted(paired["rounds"])[1]
    assert sp["read_bw_GBps"] == max(every)  # the run-max floor: the highest reading of all
    assert res["vllm"] is None and "Tandem/vLLM" not in out_text  # no vLLM figure without --vs-vllm (never a table of another run)
    assert res["env"]["torch"] and res["env"]["torch_threads"] == 1
    assert "whole run" in res["other_cpu"]
    assert res["env"]["cpu_flags_class"] in ("amx", "avx512-bf16", "avx512", "avx2", "baseline")
    rows = {row["metric"]: row for row in res["table"]}
    for engine in ("tandem", "hf"):  # llama-bench's pp / tg figures, derived from the same runs
        assert rows["prefill tok/s (16, c=1)"][engine] == pytest.approx(16 / offline._p50(res[engine]["runs"][0], "ttft_s"))
        assert rows["prefill tok/s (32)"][engine] == pytest.approx(32 / res[engine]["ttft_long"]["ttft_s"])
        assert rows["decode tok/s (c=1)"][engine] == pytest.approx(1 / offline._p50(res[engine]["runs"][0], "tpot_s"))
    for row in res["table"]:
        assert _positive(row["tandem"]) and _positive(row["hf"]), row
