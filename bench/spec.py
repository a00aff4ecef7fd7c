"""Speculative decoding benchmark: output tok/s with speculation on vs off, in this process.

    tandem bench spec --model smollm2 [--method ngram | --method draft_model --draft PATH]
                      [--concurrency 1,4,8,32] [--output-len 128] [--modes off,adaptive,always]
                      [--rounds 2] [--json out.json] [--draft-deployment]

Engines (one per mode, built once, same model, dtype and KV pool; prefix caching off):
- off: no ``speculative`` section;
- adaptive: ``speculative: {method, num_speculative_tokens, adaptive: true}`` (the default: the
  policy of services/engine/spec_decode/policy.py proposes only where it measures a gain);
- always: the same with ``adaptive: false`` (drafts at every step);
- worker-adaptive / worker-always (``--draft-deployment``, draft_model only): the same draft in a
  DraftWorker Serve deployment on a local Ray head (bench/spec_worker.py), plain actor calls;
  handle-adaptive / handle-always (named in ``--modes``): every call through the Serve handle.
  Their rows add the mean round trip of a DraftWorker call.

Workload: the fixed prompt sets of bench/spec_prompts.py (``chat`` and ``grounded``), each
rendered with the model's chat template; greedy, stopping at EOS / end of turn or at
``--output-len`` tokens. At concurrency c, ``max(c, --requests)`` requests (the set's first
ones) run in a closed loop with c in flight: a request starts as soon as one finishes. Every
(set, c) runs each mode in turn, ``--rounds`` times (modes interleaved, in reverse order every
other round, so a drift of the machine's speed hits them alike), after a warm-up of every mode on the set (``--warmup``
requests at once).

Figures, per (set, c, mode): out tok/s = output tokens / wall time from the first submit to the
last finish (prefill included; the median round), and from the engine's counters over those
rounds: acceptance rate = accepted / draft tokens and mean acceptance length = 1 + accepted /
drafts (vLLM's definitions; drafts = verified proposals), and the share of output tokens that
were accepted drafts. Greedy outputs must be the same in every mode; the run checks it and says
so (``identical``). Every measurement records the share of CPUs other processes used
(``other_cpu_frac``); above 0.10 the table marks it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

from bench import spec_worker, sysperf
from bench.spec_prompts import PROMPT_SETS, render
from bench.workload import DISTURBED, CpuMonitor, resolve_model

MODES = ("off", "adaptive", "always", "worker-adaptive", "worker-always", "handle-adaptive", "handle-always")


def spec_section(args: argparse.Namespace, adaptive: bool) -> dict:
    section = {"method": args.method, "num_speculative_tokens": args.k, "adaptive": adaptive}
    if args.method == "draft_model":
        section["model"] = str(resolve_model(args.draft))
    else:
        section.update(prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max)
    return section


def engine_config(path: Path, args: argparse.Namespace, mode: str, num_kv_blocks: int):
    from services.engine.llm import build_engine_config
    options = dict(device="cpu", dtype=args.dtype, seed=0, block_size=16, num_kv_blocks=num_kv_blocks,
                   enable_prefix_caching=False, max_num_seqs=max(128, max(args.levels)))
    if mode != "off":
        section = spec_section(args, adaptive=mode.endswith("adaptive"))
        if spec_worker.is_remote(mode):
            section = spec_worker.remote_section(section, mode, args.draft_timeout)
        options["speculative_config"] = section
    return build_engine_config(str(path), **options)


def make_engine(path: Path, args: argparse.Namespace, mode: str, num_kv_blocks: int, deployment=None):
    from services.engine.engine import LLMEngine
    config = engine_config(path, args, mode, num_kv_blocks)
    return deployment.engine(config) if spec_worker.is_remote(mode) else LLMEngine(config)


def params_for(engine, output_len: int):
    """Greedy, at most ``output_len`` tokens, stopping at EOS and the chat template's end of turn."""
    from services.engine import SamplingParams
    from services.engine.chat_prompt import with_end_of_turn
    return with_end_of_turn(SamplingParams(max_tokens=output_len, temperature=0.0),
                            engine.tokenizer.stop_token_ids)


def closed_loop(engine, prompts: list[list[int]], c: int, params) -> dict:
    """Run every prompt with at most ``c`` in flight (the next starts when one finishes)."""
    before = engine.snapshot_stats()
    pending, flight, out = list(range(len(prompts))), {}, {}
    with CpuMonitor() as mon:
        t0 = time.perf_counter()
        while pending or flight:
            while pending and len(flight) < c:
                i = pending.pop(0)
                flight[engine.add_request(prompts[i], params).request_id] = i
                out[i] = []
            for ch in engine.step():
                out[flight[ch.request_id]].extend(ch.token_ids)
                if ch.finished:
                    del flight[ch.request_id]
        wall = time.perf_counter() - t0
    after = engine.snapshot_stats()
    counts = {name: getattr(after, name) - getattr(before, name)
              for name in ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens", "num_steps")}
    calls, rtt_ms = spec_worker.round_trip_ms(before.spec_remote, after.spec_remote)
    n_out = sum(len(ids) for ids in out.values())
    return {"wall_s": wall, "output_tokens": n_out, "out_tok_per_s": n_out / wall, **counts,
            "draft_calls": calls, "draft_round_trip_ms": rtt_ms,
            "other_cpu_frac": mon.other_cpu_frac, "token_ids": [out[i] for i in range(len(prompts))]}


def summarize(rounds: list[dict]) -> dict:
    """One (set, c, mode)'s figures over its rounds (tok/s: the median round; counters: summed)."""
    total = {k: sum(r[k] for r in rounds) for k in ("spec_num_drafts", "spec_num_draft_tokens",
                                                    "spec_num_accepted_tokens", "output_tokens")}
    drafts, tokens, accepted = total["spec_num_drafts"], total["spec_num_draft_tokens"], total["spec_num_accepted_tokens"]
    return {"out_tok_per_s": statistics.median(r["out_tok_per_s"] for r in rounds),
            "out_tok_per_s_rounds": [r["out_tok_per_s"] for r in rounds],
            "wall_s_rounds": [r["wall_s"] for r in rounds], **total,
            "acceptance_rate": accepted / tokens if tokens else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
            "draft_share_of_output": accepted / total["output_tokens"] if total["output_tokens"] else None,
            "draft_round_trip_ms": _mean_rtt(rounds),
            "other_cpu_frac": max(r["other_cpu_frac"] or 0.0 for r in rounds)}


def _mean_rtt(rounds: list[dict]) -> float | None:
    """Mean round trip of the rounds' answered DraftWorker calls (None: no remote draft)."""
    calls = sum(r["draft_calls"] for r in rounds)
    return sum(r["draft_calls"] * (r["draft_round_trip_ms"] or 0.0) for r in rounds) / calls if calls else None


def bench_level(engines: dict, prompts: list[list[int]], c: int, args: argparse.Namespace) -> dict:
    """Every mode at concurrency c, modes interleaved round by round."""
    n = max(c, args.requests)
    batch = prompts[:n]
    rounds: dict[str, list[dict]] = {m: [] for m in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]  # ABBA: a linear drift hits all alike
        for mode in order:
            engine = engines[mode]
            rounds[mode].append(closed_loop(engine, batch, c, params_for(engine, args.output_len)))
    reference = rounds[next(iter(engines))][0]["token_ids"]
    identical = all(r["token_ids"] == reference for rs in rounds.values() for r in rs)
    return {"concurrency": c, "requests": len(batch), "identical": identical,
            "modes": {m: summarize(rs) for m, rs in rounds.items()}}


def kv_blocks_needed(prompt_sets: dict[str, list[list[int]]], args: argparse.Namespace) -> int:
    """A pool that holds the ``max(levels)`` longest requests at once, with room to spare."""
    longest = sorted((len(p) for ps in prompt_sets.values() for p in ps), reverse=True)[:max(args.levels)]
    per_req = [-(-(n + args.output_len + args.k + 1) // 16) for n in longest]
    return sum(per_req) + len(per_req) + 16


def run(args: argparse.Namespace) -> dict:
    """Every measurement of one run, as one JSON-ready dict."""
    from services.engine.tokenizer import Tokenizer
    path = resolve_model(args.model)
    tokenizer = Tokenizer(str(path))
    sets = {name: [render(tokenizer, text) for text in PROMPT_SETS[name]] for name in args.sets}
    res = {"model": {"arg": args.model, "path": str(path)}, "dtype": args.dtype,
           "method": args.method, "draft": args.draft, "num_speculative_tokens": args.k,
           "workload": {"concurrency": args.levels, "output_len": args.output_len, "requests": args.requests,
                        "rounds": args.rounds, "warmup": args.warmup, "prompt_tokens": {s: [len(p) for p in ps] for s, ps in sets.items()}},
           "env": sysperf.environment(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "sets": {}}
    blocks = kv_blocks_needed(sets, args)
    remote = [m for m in args.modes if spec_worker.is_remote(m)]
    deployment = spec_worker.DraftDeployment(engine_config(path, args, remote[0], blocks), args.threads) \
        if remote else contextlib.nullcontext()
    with CpuMonitor() as mon, deployment:
        engines = {mode: make_engine(path, args, mode, blocks, deployment) for mode in args.modes}
        for name, prompts in sets.items():
            for mode, engine in engines.items():  # warm-up: kernels, allocator, the policy's first estimates
                if args.warmup:
                    closed_loop(engine, prompts[:args.warmup], args.warmup, params_for(engine, args.output_len))
            res["sets"][name] = [bench_level(engines, prompts, c, args) for c in args.levels]
        if remote:
            res["draft_worker"] = deployment.replica_stats()
    res["other_cpu_frac"] = mon.other_cpu_frac
    res["elapsed_s"] = mon.wall_s
    return res


# ---- report --------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 100 else f"{x:.0f}"


def table_lines(res: dict) -> list[list[str]]:
    """Header + one row per (set, c): each mode's tok/s, the ratios to off, and beside every
    speculating figure its acceptance rate / mean acceptance length."""
    modes = [m for m in MODES if m in next(iter(res["sets"].values()))[0]["modes"]]
    spec = [m for m in modes if m != "off"]
    head = ["set", "c"] + [f"{m} tok/s" for m in modes]
    head += [f"{m}/off" for m in spec if "off" in modes] + [f"{m} acc rate / len / from drafts" for m in spec]
    lines = [head]
    for name, levels in res["sets"].items():
        for lv in levels:
            f = lv["modes"]
            row = [name, str(lv["concurrency"])]
            row += [_fmt(f[m]["out_tok_per_s"]) + ("*" if f[m]["other_cpu_frac"] > DISTURBED else "") for m in modes]
            if "off" in modes:
                row += [f"{f[m]['out_tok_per_s'] / f['off']['out_tok_per_s']:.2f}x" for m in spec]
            row += [f"{_fmt(f[m]['acceptance_rate'], 2)} / {_fmt(f[m]['mean_acceptance_length'], 3)} / "
                    f"{_fmt(f[m]['draft_share_of_output'], 2)}"
                    + (f" / rtt {f[m]['draft_round_trip_ms']:.1f} ms" if f[m].get("draft_round_trip_ms") else "")
                    for m in spec]
            lines.append(row + ([] if lv["identical"] else ["OUTPUTS DIFFER"]))
    return lines


def print_table(res: dict) -> None:
    env = res["env"]
    draft = f" (draft {res['draft']})" if res["method"] == "draft_model" else ""
    print(f"CPU: {env['cpu']} | torch {env['torch']}, {env['torch_threads']} threads | dtype {res['dtype']}")
    print(f"model {res['model']['arg']} | method {res['method']}{draft}, k={res['num_speculative_tokens']} | "
          f"output <= {res['workload']['output_len']} tokens, greedy | rounds {res['workload']['rounds']}")
    lines = table_lines(res)
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(lines[0]))]
    for k, line in enumerate(lines):
        cells = [s.ljust(w) if i < 2 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))]
        print("  ".join(cells + line[len(widths):]))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    if res.get("draft_worker", {}).get("propose_ms_per_call") is not None:
        dw = res["draft_worker"]
        print(f"DraftWorker replica: {dw['calls']} calls, {dw['propose_ms_per_call']:.1f} ms per call drafting "
              f"(the rest of a round trip is transport)")
    for name, levels in res["sets"].items():
        for lv in levels:
            f = lv["modes"]
            for local in ("adaptive", "always"):
                for remote in (f"worker-{local}", f"handle-{local}"):
                    if {"off", local, remote} <= set(f):
                        gain = f[local]["out_tok_per_s"] / f["off"]["out_tok_per_s"] - 1
                        kept = (f[remote]["out_tok_per_s"] / f["off"]["out_tok_per_s"] - 1) / gain if gain > 0 else None
                        print(f"{name} c={lv['concurrency']}: {remote} keeps "
                              f"{'-' if kept is None else f'{kept:.0%}'} of {local}'s gain over off")
    identical = all(lv["identical"] for levels in res["sets"].values() for lv in levels)
    print("greedy outputs identical in every mode: " + ("yes" if identical else "NO"))
    print("acc rate = accepted / draft tokens; len = mean acceptance length (1 + accepted / drafts); "
          "from drafts = share of output tokens that were accepted drafts")
    if (res["other_cpu_frac"] or 0.0) > DISTURBED or any("*" in c for line in lines[1:] for c in line):
        print(f"WARNING: other processes used > {DISTURBED:.0%} of the CPUs during the run "
              f"({(res['other_cpu_frac'] or 0.0):.0%} over all; * marks a disturbed figure)")


# ---- entry point ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tandem bench spec", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="checkpoint folder, .gguf file or model name (smollm2, embedded)")
    ap.add_argument("--method", choices=("ngram", "draft_model"), default="ngram")
    ap.add_argument("--draft", help="the draft model (with --method draft_model): a path or model name")
    ap.add_argument("--k", "--num-speculative-tokens", dest="k", type=int, default=3, help="draft tokens per step")
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--prompt-lookup-max", type=int, default=5)
    ap.add_argument("--concurrency", default="1,4,8,32", help="comma-separated requests in flight")
    ap.add_argument("--sets", default="chat,grounded", help=f"prompt sets, of {sorted(PROMPT_SETS)}")
    ap.add_argument("--modes", default="off,adaptive,always", help=f"engines to compare, of {list(MODES)}")
    ap.add_argument("--output-len", type=int, default=128, help="new tokens per request at most")
    ap.add_argument("--requests", type=int, default=8, help="requests per level at least (c if larger)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each (set, c, mode)")
    ap.add_argument("--warmup", type=int, help="requests (all at once) of each mode's warm-up per set; "
                                               "default max(--concurrency), 0 = none")
    ap.add_argument("--dtype", default="auto", help="the engine's dtype (auto: its default, float32 on CPU)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path, help="write every raw figure here")
    spec_worker.add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    args.sets, args.modes = args.sets.split(","), args.modes.split(",")
    args.modes = spec_worker.expand_modes(args.modes, args.draft_deployment)
    if min(args.levels) < 1:
        ap.error("--concurrency: every level must be >= 1")
    if set(args.sets) - set(PROMPT_SETS) or set(args.modes) - set(MODES) or not args.modes:
        ap.error(f"--sets must name {sorted(PROMPT_SETS)}, --modes {list(MODES)}")
    if (args.method == "draft_model") != bool(args.draft):
        ap.error("--draft PATH goes with --method draft_model (and only with it)")
    if any(spec_worker.is_remote(m) for m in args.modes) and args.method != "draft_model":
        ap.error("--draft-deployment (worker-* / handle-* modes) needs --method draft_model")
    if not 0 < args.draft_timeout <= 60:
        ap.error("--draft-timeout must be in (0, 60] seconds")
    if args.output_len < 1 or args.rounds < 1 or args.requests < 1 or args.k < 1 or (args.threads or 1) < 1:
        ap.error("--output-len, --rounds, --requests, --k and --threads must be >= 1")
    args.warmup = max(args.levels) if args.warmup is None else args.warmup
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """``tandem bench spec ...``: run, print the table, optionally write JSON. Returns 0.
    ``--threads`` sets torch's thread count for the run only (restored afterwards)."""
    args = parse_args(argv)
    import torch
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
