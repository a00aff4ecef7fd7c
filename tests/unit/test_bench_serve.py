"""The serving load generator, against the in-process engine (no Ray, no network)."""

import json

from bench.serve import main
from services.engine.make_model import make_model


def test_bench_serve_inprocess_reports_every_request(tmp_path, capsys):
    model = make_model("tiny-llama", tmp_path / "m")
    out = tmp_path / "s.json"
    rc = main(["--inprocess", str(model), "--num-prompts", "12", "--concurrency", "4", "--input-len", "20",
               "--output-len", "6", "--random-range-ratio", "0.5", "--warmup", "1", "--no-progress",
               "--kv-cache-memory-gb", "0.01", "--json", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 12 and s["failed"] == 0 and s["errors"] == {}
    assert s["output_tok_per_s"] > 0 and s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] > 0
    assert "TTFT" in capsys.readouterr().out


def test_open_loop_rate(tmp_path):
    model = make_model("tiny-llama", tmp_path / "m")
    out = tmp_path / "s.json"
    assert main(["--inprocess", str(model), "--num-prompts", "6", "--request-rate", "50", "--concurrency", "0",
                 "--input-len", "8", "--output-len", "4", "--warmup", "0", "--no-progress",
                 "--kv-cache-memory-gb", "0.01", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["completed"] == 6
