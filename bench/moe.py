"""MoE expert offload benchmark: decode throughput with part of the experts resident.

    python -m bench.moe [--model moe-1b] [--fractions 0.25,0.5,1.0] [--remote-shards 2] [--concurrency 1,8]
                        [--json out.json]

For ``local`` (every expert resident), ``offload`` at each resident fraction (file tier:
experts read from the safetensors files on demand) and ``remote`` (the experts in
``--remote-shards`` ExpertWorker Serve deployments on a local Ray head, bench/moe_remote.py;
``--no-remote`` skips it), each in a fresh process (clean RSS):
the checkpoint's page cache is dropped first (``posix_fadvise(DONTNEED)`` on every file,
which drops the clean pages no one maps; ``--drop-caches``: ``/proc/sys/vm/drop_caches`` as
root, the whole machine's), then one unmeasured warm-up batch at the largest concurrency
(``--warmup-tokens``: fills the expert cache, so 100% resident is not measured cold), then per
concurrency c, c greedy requests (``--prompt-len`` random
ids, ``--output-len`` new tokens, ignore_eos) submitted together; decode tok/s = tokens after
each request's first / (last finish - first token of the batch). Reported beside it: the
offload cache's hit rate, Belady's oracle hit rate on the same trace, prefetch hits, bytes
loaded, and peak RSS (of this process: the engine's; for ``remote`` also each shard
replica's, and the shard calls' latency). Every run's JSON record has ``vs_local``: its decode
tok/s over local's, per concurrency. ``--policies`` replays the recorded routing traces of the offload runs
through every eviction policy (the measurement behind expert_offload/policies.py's default).

Random weights route near-uniformly across experts: the hardest case for a cache, where hit
rates sit near the resident fraction. Trained models route with more locality.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.workload import CpuMonitor, prompts, resolve_model

ROOT = Path(__file__).resolve().parents[1]
WARMUP_SEED = 500_000  # the warm-up batch's prompts: a seed no measured level uses (theirs are c)


def drop_page_cache(path: Path, system_wide: bool = False) -> str:
    """Evict the checkpoint's pages from the page cache; returns how. ``system_wide`` writes
    /proc/sys/vm/drop_caches (root; every process's cache: not on a shared machine)."""
    if system_wide:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "drop_caches"
        except OSError:
            pass
    for file in sorted(path.glob("*.safetensors")):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise"


def peak_rss() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmHWM"].split()[0]) * 1024


def decode_rate(engine, batch: list[list[int]], output_len: int) -> dict:
    from services.engine import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    first, end, tokens = {}, {}, 0
    with CpuMonitor() as mon:
        rids = [engine.add_request(p, params).request_id for p in batch]
        while engine.has_unfinished_requests():
            chunks = engine.step()
            now = time.perf_counter()
            for ch in chunks:
                tokens += len(ch.token_ids)
                if ch.token_ids:
                    first.setdefault(ch.request_id, now)
                if ch.finished:
                    end[ch.request_id] = now
    wall = max(end.values()) - max(first.values())
    return {"concurrency": len(batch), "decode_tok_per_s": len(rids) * (output_len - 1) / wall,
            "decode_wall_s": wall, "output_tokens": tokens, "other_cpu_frac": mon.other_cpu_frac}


def expert_totals(engine) -> dict:
    layers = engine.snapshot_stats().experts
    if not layers:
        return {}
    hits, misses = sum(s.hits for s in layers), sum(s.misses for s in layers)
    uses = sum(s.window_uses for s in layers)
    return {"hit_rate": hits / max(1, hits + misses), "hits": hits, "misses": misses,
            "window_hit_rate": sum(s.window_hits for s in layers) / max(1, uses),
            "oracle_hit_rate": sum(s.window_oracle_hits for s in layers) / max(1, uses),
            "prefetch_loads": sum(s.prefetch_loads for s in layers),
            "prefetch_hits": sum(s.prefetch_hits for s in layers),
            "bytes_loaded": sum(s.bytes_loaded for s in layers),
            "resident_bytes": sum(s.resident_bytes for s in layers)}


def traces(engine) -> list[list[list[int]]]:
    """Per MoE layer, the recorded routing trace: per step, the experts used."""
    from services.engine.model.expert_backends.offload import OffloadExperts
    return [[[e for e, _ in step] for step in m.cache.trace]
            for m in engine.model.modules() if isinstance(m, OffloadExperts)]


def run_one(args: argparse.Namespace) -> dict:
    """One configuration (``args.one``: "local", "remote" or a resident fraction) in this process."""
    path = Path(args.model)
    how = drop_page_cache(path, args.drop_caches)
    cs = [int(c) for c in args.concurrency.split(",")]
    need = max(cs) * (-(-(args.prompt_len + args.output_len) // 16)) + 8
    options = dict(device="cpu", dtype="float32", block_size=16, num_kv_blocks=need, enable_prefix_caching=False,
                   max_num_seqs=max(cs))
    if args.one == "remote":
        from bench.moe_remote import ExpertShardApps
        shards = ExpertShardApps(str(path), options, args.remote_shards)
        with shards:
            out = measure(args, shards.engine, cs, how, shards)
            out["shards"] = shards.shard_stats()
            out["deploy_s"] = shards.deploy_s
        out["processes_killed"] = shards.processes_killed  # Ray's processes still alive after shutdown
        return out
    from services.engine.engine import LLMEngine
    from services.engine.llm import build_engine_config
    experts = {"backend": "local"} if args.one == "local" else {
        "backend": "offload", "resident_fraction": float(args.one), "policy": args.policy,
        "prefetch": not args.no_prefetch, "trace_steps": 100_000}
    return measure(args, lambda: LLMEngine(build_engine_config(str(path), experts=experts, **options)), cs, how)


def measure(args: argparse.Namespace, build, cs: list[int], how: str, shards=None) -> dict:
    """Build the engine (``build()``) and measure each concurrency; ``shards``: the remote run's."""
    t0 = time.perf_counter()
    engine = build()
    out = {"config": args.one, "page_cache": how, "load_s": time.perf_counter() - t0, "levels": []}
    vocab = engine.model_config.vocab_size
    if args.warmup_tokens > 0:  # unmeasured: fills the expert cache (and the page cache) first
        out["warmup"] = decode_rate(engine, prompts(max(cs), args.prompt_len, seed=WARMUP_SEED, vocab=vocab),
                                    args.warmup_tokens)
    for c in cs:
        before, calls = expert_totals(engine), len(shards.latencies) if shards else 0
        level = decode_rate(engine, prompts(c, args.prompt_len, seed=c, vocab=vocab), args.output_len)
        after = expert_totals(engine)
        if after:  # this level's share of the counters
            level["misses"] = after["misses"] - before["misses"]
            level["hits"] = after["hits"] - before["hits"]
        if shards:
            level["remote_calls"] = shards.call_stats(calls)
        out["levels"].append(level)
    out["experts"] = expert_totals(engine)
    out["peak_rss_bytes"] = peak_rss()
    if shards:
        out["remote_calls"] = shards.call_stats()
    if args.one not in ("local", "remote") and args.trace_out:
        Path(args.trace_out).write_text(json.dumps(traces(engine)))
    return out


def replay_policies(trace_files: list[Path], fractions: list[float], num_experts: int) -> list[dict]:
    from services.engine.model.expert_offload.cache import replay
    from services.engine.model.expert_offload.oracle import oracle_hit_rate
    from services.engine.model.expert_offload.policies import POLICIES
    rows = []
    for file, fraction in zip(trace_files, fractions):
        layers = json.loads(file.read_text())
        slots = max(1, min(num_experts, round(fraction * num_experts)))
        row = {"fraction": fraction, "slots": slots}
        for name, policy in POLICIES.items():
            row[name] = statistics.mean(replay(steps, slots, policy()) for steps in layers)
        row["belady"] = statistics.mean(oracle_hit_rate(steps, slots) for steps in layers)
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tandem bench moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moe-1b", help="checkpoint folder or make_model shape (default moe-1b)")
    p.add_argument("--fractions", default="0.25,0.5,1.0", help="resident fractions of the offload runs ('': none)")
    p.add_argument("--remote-shards", type=int, default=2, help="ExpertWorker shards of the remote run (default 2)")
    p.add_argument("--no-remote", action="store_true", help="skip the remote run")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=8,
                   help="tokens of one unmeasured batch (the largest concurrency) before the levels; 0: none")
    p.add_argument("--policy", default="decay")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--policies", action="store_true", help="replay the offload runs' traces through every policy")
    p.add_argument("--drop-caches", action="store_true",
                   help="drop the whole page cache (root) instead of only the checkpoint's files")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    p.add_argument("--trace-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    from bench.sysperf import environment
    path = resolve_model(args.model)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    env = environment()
    print(f"CPU: {env['cpu']} | torch {env['torch']}, {env['torch_threads']} threads | model {path.name}", flush=True)
    results, trace_files = [], []
    for config in ["local", *map(str, fractions), *["remote"] * (not args.no_remote)]:
        trace = ROOT / ".bench" / f"moe-trace-{config}.json"
        cmd = [sys.executable, "-m", "bench.moe", "--one", config, "--model", str(path),
               "--concurrency", args.concurrency, "--prompt-len", str(args.prompt_len),
               "--output-len", str(args.output_len), "--policy", args.policy, "--trace-out", str(trace),
               "--remote-shards", str(args.remote_shards), "--warmup-tokens", str(args.warmup_tokens)]
        cmd += ["--no-prefetch"] * args.no_prefetch + ["--drop-caches"] * args.drop_caches
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{config}: {proc.stderr[-2000:]}")
        results.append(vs_local(results[0] if results else None, json.loads(proc.stdout.strip().splitlines()[-1])))
        if config not in ("local", "remote"):
            trace_files.append(trace)
        print_row(results[0], results[-1])
    report = {"model": str(path), "env": env, "results": results}
    if args.policies:
        from services.engine.model_config import ModelConfig
        report["policies"] = replay_policies(trace_files, fractions, ModelConfig.from_pretrained(path).num_experts)
        for row in report["policies"]:
            print("policy replay", json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def vs_local(local: dict | None, res: dict) -> dict:
    """``res`` with ``vs_local``: its decode tok/s over ``local``'s (None: ``res`` is local), per concurrency."""
    base = local or res
    res["vs_local"] = {str(b["concurrency"]): r["decode_tok_per_s"] / b["decode_tok_per_s"]
                       for b, r in zip(base["levels"], res["levels"])}
    return res


def print_row(local: dict, res: dict) -> None:
    e = res.get("experts", {})
    for base, level in zip(local["levels"], res["levels"]):
        ratio = level["decode_tok_per_s"] / base["decode_tok_per_s"]
        print(f"{res['config']:>6} c={level['concurrency']}: {level['decode_tok_per_s']:7.2f} decode tok/s "
              f"({ratio:.2f}x local)  other_cpu={level['other_cpu_frac'] or 0:.2f}", flush=True)
    if e:
        print(f"        hit {e['hit_rate']:.3f} (window {e['window_hit_rate']:.3f}, Belady {e['oracle_hit_rate']:.3f}) "
              f"prefetch {e['prefetch_hits']}/{e['prefetch_loads']} loaded {e['bytes_loaded'] / 2**30:.2f} GiB "
              f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB page cache: {res['page_cache']}", flush=True)
    for level in res["levels"]:
        if "remote_calls" in level:
            r = level["remote_calls"]
            print(f"        c={level['concurrency']} shard calls {r['calls']}: mean {r.get('mean_ms', 0):.2f} ms, "
                  f"p99 {r.get('p99_ms', 0):.2f} ms", flush=True)
    if "shards" in res:
        rss = ", ".join(f"{(s['peak_rss_bytes'] or 0) / 2**30:.2f}" for s in res["shards"])
        print(f"        shard replicas' peak RSS {rss} GiB", flush=True)
    if not e:
        print(f"        peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB page cache: {res['page_cache']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
