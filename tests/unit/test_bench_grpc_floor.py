"""The grpc.aio floor benchmark: a real server on loopback and a client in a child process."""

import json

import pytest

from bench.grpc_floor import main


def test_grpc_floor_counts_every_message_after_warmup(tmp_path, capsys):
    out = tmp_path / "floor.json"
    assert main(["--streams", "1,3", "--steps", "8", "--warmup", "2", "--interval", "0.01",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["streams"] for r in res] == [1, 3]
    assert [r["messages"] for r in res] == [6, 18]  # (steps - warmup) per stream
    for r in res:
        d = r["delay_s"]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"] < 5
    assert "hand-off delay" in capsys.readouterr().out


def test_grpc_floor_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--streams", "0"])
    with pytest.raises(SystemExit):
        main(["--steps", "3", "--warmup", "5"])
