"""``tandem bench offline --vs-vllm``: the pure parts (arguments, ABBA schedule, merging the
processes' figures, the report's vLLM column only with a measurement of this run, the CPU line),
then the Tandem-process path end to end, and the vLLM-process path where its venv exists."""

import json
import os
from pathlib import Path

import pytest

from bench import offline, offline_report, sysperf, vs_vllm
from bench.workload import Workload, batch_prompts, ttft_prompt, warmup_prompt
from services.engine.kernels.cpu_features import auto_cpu_dtype, cpu_features

AUTO = str(auto_cpu_dtype(cpu_features())).removeprefix("torch.")


def test_schedule_alternates_abba():
    assert vs_vllm.schedule(4) == ["tandem", "vllm", "vllm", "tandem", "tandem", "vllm", "vllm", "tandem"]
    assert vs_vllm.schedule(1) == ["tandem", "vllm"]
    assert vs_vllm.schedule(3, ("tandem",)) == ["tandem"] * 3
    order = vs_vllm.schedule(6)
    firsts = [order[i] for i in range(0, len(order), 2)]  # who opens each round: even split
    assert firsts.count("tandem") == firsts.count("vllm") == 3
    with pytest.raises(ValueError, match="rounds"):
        vs_vllm.schedule(0)


def test_arguments_defaults_depend_on_vs_vllm():
    plain = offline.parse_args(["--model", "x"])
    assert (plain.rounds, plain.dtype, plain.vs_vllm) == (3, "float32", False)
    vs = offline.parse_args(["--model", "x", "--vs-vllm"])
    assert (vs.rounds, vs.dtype, vs.vllm_dtype) == (4, AUTO, AUTO)  # each engine's best for this CPU
    given = offline.parse_args(["--model", "x", "--vs-vllm", "--rounds", "2", "--dtype", "float32",
                                "--vllm-dtype", "bfloat16"])
    assert (given.rounds, given.dtype, given.vllm_dtype) == (2, "float32", "bfloat16")
    with pytest.raises(ValueError, match="--vllm-dtype"):
        offline.parse_args(["--model", "x", "--vllm-dtype", "fp8"])
    with pytest.raises(ValueError, match="--dtype"):
        offline.parse_args(["--model", "x", "--dtype", "half"])
    with pytest.raises(ValueError, match="--round-timeout"):
        offline.parse_args(["--model", "x", "--round-timeout", "0"])


def _fake_venv(root: Path) -> tuple[Path, Path]:
    venv, anchors = root / "venv", root / "anchors"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    anchors.mkdir()
    (anchors / "bench_vllm.py").write_text("")
    return venv, anchors


def test_locate_venv_by_flag_env_or_says_why(tmp_path, monkeypatch):
    venv, anchors = _fake_venv(tmp_path)
    args = offline.parse_args(["--model", "x", "--vs-vllm", "--vllm-venv", str(venv), "--bench-anchors", str(anchors)])
    setup = vs_vllm.locate(args)
    assert setup == vs_vllm.VllmSetup(venv=venv, python=venv / "bin" / "python", anchors=anchors)
    assert vs_vllm.skip_reason(args, setup) is None
    monkeypatch.setenv(vs_vllm.VENV_ENV, str(venv))
    monkeypatch.setenv(vs_vllm.ANCHORS_ENV, str(anchors))
    assert vs_vllm.locate(offline.parse_args(["--model", "x", "--vs-vllm"])) == setup
    monkeypatch.setenv(vs_vllm.VENV_ENV, str(tmp_path / "missing"))
    args = offline.parse_args(["--model", "x", "--vs-vllm"])
    reason = vs_vllm.locate(args)
    assert isinstance(reason, str) and str(tmp_path / "missing") in reason
    assert vs_vllm.skip_reason(args, reason) == reason
    assert "--vs-vllm" in vs_vllm.skip_reason(offline.parse_args(["--model", "x"]), None)


def test_vllm_env_preloads_and_binds_threads(tmp_path, monkeypatch):
    venv, anchors = _fake_venv(tmp_path)
    (venv / "lib").mkdir()
    (venv / "lib" / "libiomp5.so").write_text("")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/of/ours")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    env = vs_vllm.vllm_env(vs_vllm.VllmSetup(venv, venv / "bin" / "python", anchors), threads=2)
    assert str(venv / "lib" / "libiomp5.so") in env["LD_PRELOAD"].split(":")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "PYTHONPATH" not in env
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vs_vllm.vllm_env(vs_vllm.VllmSetup(venv, venv, anchors), None)


def test_round_spec_carries_the_in_process_prompts(tmp_path):
    wl = Workload((1, 8), 16, 4, 64, 2, 4)
    args = offline.parse_args(["--model", "x", "--vs-vllm"])
    spec = vs_vllm.round_spec(tmp_path, wl, 512, "float32", args)
    assert [lv["prompts"] for lv in spec["levels"]] == [batch_prompts(wl, 1, 512), batch_prompts(wl, 8, 512)]
    assert spec["ttft"] == [ttft_prompt(wl, 0, 512), ttft_prompt(wl, 1, 512)]
    measured = {tuple(p) for lv in spec["levels"] for p in lv["prompts"]} | {tuple(p) for p in spec["ttft"]}
    warm = [tuple(p) for w in spec["warmup"] for p in w["prompts"]]
    assert warm[0] == tuple(warmup_prompt(512)) and not measured & set(warm)  # never a measured prompt
    assert spec["max_num_seqs"] >= 8 and spec["max_model_len"] >= 64 + 1
    assert json.loads(json.dumps(spec)) == spec  # what the drivers read back


def _tandem_round(c: int, wall: float, ttft: float, probed: bool) -> dict:
    r = {"first": [0.1] * c, "end": [wall] * c, "token_ids": [[5, 6]] * c, "other_cpu_frac": 0.01, "t0": 0.0}
    if probed:
        r["read_bw_GBps"] = {"before": {"torch_sum": 30.0}, "after": {"torch_sum": 32.0}}
    return r


def test_merge_tandem_processes_like_in_process_rounds():
    wl = Workload((1, 4), 16, 2, 32, 1, 3)
    outs = [{"params": 10, "weight_bytes_per_token": 40, "flop_params": 9, "vocab_size": 512, "num_kv_blocks": 8,
             "init_s": 1.0, "levels": [_tandem_round(1, w, 0.1, True), _tandem_round(4, 2 * w, 0.1, False)],
             "ttft_long": [{"ttft_s": t, "other_cpu_frac": 0.0}]} for w, t in ((1.0, 0.3), (2.0, 0.1), (4.0, 0.2))]
    res = vs_vllm.merge_tandem(outs, wl)
    c1, c4 = res["runs"]
    assert c1["out_tok_per_s_rounds"] == [2.0, 1.0, 0.5] and c1["out_tok_per_s"] == 1.0  # median process
    assert c4["out_tok_per_s"] == pytest.approx(4 * 2 / 4.0)
    assert len(c1["rounds_read_bw_GBps"]) == 3 and "rounds_read_bw_GBps" not in c4  # c=1 is bracketed
    assert res["ttft_long"]["ttft_s"] == 0.2 and res["ttft_long"]["ttft_s_all"] == [0.3, 0.1, 0.2]
    assert res["rounds"] == 3 and res["flop_params"] == 9


def test_merge_vllm_medians_over_processes():
    wl = Workload((8,), 16, 2, 32, 1, 2)

    def out(tok_s, tpot):
        return {"version": "0.32.0", "torch": "2.13", "dtype": "bfloat16", "env": {}, "init_s": 50.0,
                "levels": [{"concurrency": 8, "wall_s": 16 / tok_s, "out_tok_per_s": tok_s, "ttft_s": 0.5,
                            "ttft_s_mean": 0.4, "tpot_s": tpot, "other_cpu_frac": 0.02}],
                "ttft_long": [{"ttft_s": 0.3, "other_cpu_frac": 0.0}]}
    res = vs_vllm.merge_vllm([out(100.0, 0.01), out(200.0, 0.03), out(150.0, 0.02)], wl)
    (level,) = res["runs"]
    assert level["out_tok_per_s"] == 150.0 and level["tpot_s"] == 0.02 and level["ttft_s"] == 0.4
    assert res["rounds"] == 3 and res["ttft_long"]["ttft_s"] == 0.3


def _result(vllm: bool) -> dict:
    """A run's result dict as offline.run builds it, with made-up figures."""
    level = {"concurrency": 32, "out_tok_per_s": 900.0, "ttft_s": {"p50": 0.5}, "tpot_s": {"p50": 0.02},
             "other_cpu_frac": 0.0}
    res = {"workload": {"concurrencies": [32], "prompt_len": 128, "output_len": 128, "ttft_len": 0},
           "env": sysperf.environment(), "dtypes": {"tandem": "bfloat16", "hf": "bfloat16", "vllm": "bfloat16"},
           "tandem": {"runs": [level], "flop_params": 100_000_000}, "hf": None, "vllm": None,
           "vllm_skipped": "run with --vs-vllm to measure vLLM-cpu in this run", "other_cpu": {},
           "sysperf": {"paired_floor_ratio": {}}}
    if vllm:
        res["vllm"] = {"runs": [{"concurrency": 32, "out_tok_per_s": 600.0, "ttft_s": 0.4, "tpot_s": 0.03,
                                 "other_cpu_frac": 0.0}], "version": "0.32.0", "rounds": 4}
        res["vllm_skipped"], res["schedule"] = None, vs_vllm.schedule(4)
    res["table"] = offline_report.table_rows(res)
    return res


def test_vllm_ratio_only_with_a_measurement_of_this_run():
    without = _result(vllm=False)
    text = "\n".join([offline_report.header(without)] + offline_report.table_lines(without))
    assert "Tandem/vLLM" not in text and "vLLM-cpu " not in offline_report.table_lines(without)[0]
    assert "no vLLM figures (run with --vs-vllm" in text
    assert all(row["vllm"] is None for row in without["table"])
    with_vllm = _result(vllm=True)
    head, _, first = offline_report.table_lines(with_vllm)[:3]
    assert "Tandem/vLLM" in head and first.split()[-1] == "1.5"  # 900 / 600 tok/s
    assert "measured in this run: 4 processes per engine" in offline_report.header(with_vllm)
    assert not hasattr(offline, "VLLM_REFERENCE") and not hasattr(offline, "reference_for")


def test_every_report_names_cpu_flags_class_and_cores():
    features = cpu_features()
    env = sysperf.environment()
    for part in (features.model_name or "unknown CPU", features.flags_class, f"{features.cores} cores"):
        assert part in env["cpu"]
    assert env["cpu_flags_class"] == features.flags_class
    assert offline_report.header(_result(vllm=False)).startswith(f"CPU: {env['cpu']} |")


def test_compute_report_is_two_flops_per_parameter_per_token():
    res = _result(vllm=True)
    peaks = {"bfloat16": {"GFLOPs": 400.0, "by_size": {"1024": 400.0}}}
    comp = offline_report.compute_report(res, peaks)
    assert comp["concurrency"] == 32
    assert comp["engines"]["tandem"]["GFLOPs"] == pytest.approx(2 * 1e8 * 900 / 1e9)
    assert comp["engines"]["tandem"]["of_peak"] == pytest.approx(180 / 400)
    assert comp["engines"]["vllm"]["GFLOPs"] == pytest.approx(120.0)
    assert comp["engines"]["tandem"]["GFLOPs_with_prompt_tokens"] == pytest.approx(360.0)
    assert "2 x parameters" in comp["estimate"]


def test_gemm_peak_is_a_positive_rate():
    peak = sysperf.gemm_peak(__import__("torch").float32, sizes=(64, 128), reps=2)
    assert set(peak["by_size"]) == {"64", "128"} and peak["GFLOPs"] == max(peak["by_size"].values()) > 0


# ---- end to end: the engine processes ----------------------------------------------------------
def _small_llama(tmp_path: Path) -> Path:
    """A small Llama checkpoint with head_dim 64 (vLLM's CPU attention takes it; 16 it may not)."""
    from services.engine.make_model import make_model
    return make_model("tiny-llama", tmp_path / "small-llama", overrides={
        "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 256})


def test_vs_vllm_runs_tandem_in_its_own_processes(tmp_path, monkeypatch, capsys):
    """No vLLM venv: --vs-vllm still measures Tandem in two processes (the path both engines
    share), prints no vLLM ratio, and the processes' greedy tokens equal transformers'."""
    monkeypatch.setenv(vs_vllm.VENV_ENV, str(tmp_path / "no-venv"))
    model = _small_llama(tmp_path)
    out = tmp_path / "vs.json"
    rc = offline.main(["--model", str(model), "--vs-vllm", "--dtype", "float32", "--rounds", "2",
                       "--concurrency", "1,2", "--prompt-len", "16", "--output-len", "4", "--ttft-len", "32",
                       "--ttft-reps", "1", "--bandwidth-mib", "32", "--threads", "1", "--gemm-sizes", "128",
                       "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr()
    assert "Tandem/vLLM" not in text.out and "no vLLM venv at" in text.out and "no vLLM venv at" in text.err
    res = json.loads(out.read_text())
    assert res["vllm"] is None and res["schedule"] == ["tandem", "tandem"]
    assert res["tandem"]["rounds"] == 2 and len(res["tandem"]["init_s"]) == 2
    runs = {r["concurrency"]: r for r in res["tandem"]["runs"]}
    assert len(runs[1]["out_tok_per_s_rounds"]) == 2 and len(runs[1]["rounds_read_bw_GBps"]) == 2
    assert res["sysperf"]["paired_floor_ratio"]["tandem"]["ratio"] > 0
    for c in (1, 2):
        assert runs[c]["token_ids"] == {r["concurrency"]: r for r in res["hf"]["runs"]}[c]["token_ids"]
    assert res["tandem"]["ttft_long"]["ttft_s"] > 0 and len(res["tandem"]["ttft_long"]["ttft_s_all"]) == 2
    assert res["compute"]["concurrency"] == 2 and res["compute"]["engines"]["tandem"]["of_peak"] > 0
    assert res["env"]["cpu"] in text.out


VLLM_PYTHON = Path(os.environ.get(vs_vllm.VENV_ENV) or vs_vllm.DEFAULT_VENV) / "bin" / "python"


@pytest.mark.skipif(not VLLM_PYTHON.exists() or not (vs_vllm._default_anchors() / "bench_vllm.py").is_file(),
                    reason="no vLLM-cpu venv (../shared/bench-anchors/setup_envs.sh builds it; CI installs only "
                           "the Makefile's packages)")
def test_vs_vllm_measures_vllm_in_the_same_run(tmp_path, capsys):
    model = _small_llama(tmp_path)
    out = tmp_path / "vs.json"
    rc = offline.main(["--model", str(model), "--vs-vllm", "--rounds", "1", "--no-hf", "--concurrency", "2",
                       "--prompt-len", "16", "--output-len", "4", "--ttft-len", "32", "--ttft-reps", "1",
                       "--bandwidth-mib", "32", "--gemm-sizes", "128", "--json", str(out)])
    assert rc == 0
    assert "Tandem/vLLM" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["schedule"] == ["tandem", "vllm"] and res["vllm"]["version"]
    (level,) = res["vllm"]["runs"]
    assert level["concurrency"] == 2 and level["out_tok_per_s"] > 0 and res["vllm"]["ttft_long"]["ttft_s"] > 0
    assert res["table"][0]["vllm"] == level["out_tok_per_s"]
