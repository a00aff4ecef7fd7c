"""Smoke test of ``tandem bench spec`` on the in-repo model (short outputs): it runs end to end
through the ``tandem`` command, prints the ratios table and the CPU, writes JSON, and the model
as its own draft accepts every greedy proposal."""

import json
import re
from importlib.metadata import EntryPoint

import pytest

from bench import spec
from bench.spec_prompts import PROMPT_SETS
from router import cli

BENCH = EntryPoint("bench", "bench.cli:register", cli.COMMANDS_GROUP)  # as pyproject.toml registers it


def test_prompt_sets_are_fixed_and_of_32_prompts():
    assert sorted(PROMPT_SETS) == ["chat", "grounded"]
    assert all(len(p) == 32 and len(set(p)) == 32 for p in PROMPT_SETS.values())
    assert "Repeat the text above exactly" in PROMPT_SETS["grounded"][1]


def test_bench_spec_self_draft_end_to_end(tmp_path, capsys):
    out = tmp_path / "spec.json"
    rc = cli.main(["bench", "spec", "--model", "embedded", "--method", "draft_model", "--draft", "embedded",
                 "--concurrency", "1,2", "--output-len", "6", "--requests", "2", "--rounds", "1",
                 "--k", "2", "--json", str(out)], entry_points=[BENCH])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("CPU: ") and "adaptive/off" in text and "always/off" in text
    assert "greedy outputs identical in every mode: yes" in text
    res = json.loads(out.read_text())
    assert sorted(res["sets"]) == ["chat", "grounded"]
    for levels in res["sets"].values():
        assert [lv["concurrency"] for lv in levels] == [1, 2] and all(lv["identical"] for lv in levels)
        for lv in levels:
            always = lv["modes"]["always"]
            assert always["spec_num_draft_tokens"] > 0 and always["acceptance_rate"] == 1.0
            assert lv["modes"]["off"]["spec_num_drafts"] == 0 and lv["modes"]["off"]["out_tok_per_s"] > 0
    rows = [line for line in text.splitlines() if line.startswith(("chat ", "grounded "))]
    assert len(rows) == 4 and all(len(re.findall(r"\d+\.\d\dx", row)) == 2 for row in rows)  # adaptive/off, always/off


def test_bench_spec_ngram_one_set(capsys):
    assert spec.main(["--model", "embedded", "--sets", "grounded", "--modes", "off,adaptive",
                      "--concurrency", "2", "--output-len", "4", "--requests", "2", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "method ngram" in text and "adaptive/off" in text and "always" not in text


def test_bad_arguments_name_the_option(capsys):
    for argv, needle in ((["--method", "draft_model"], "--draft"), (["--concurrency", "1,x"], "--concurrency"),
                         (["--modes", "fast"], "--modes")):
        with pytest.raises(SystemExit):
            spec.parse_args(argv)
        assert needle in capsys.readouterr().err
