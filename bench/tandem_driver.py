"""One Tandem round of ``tandem bench offline --vs-vllm``, in a process of its own.

    python -m bench.tandem_driver --spec SPEC.json --out OUT.json

Reads the spec bench/vs_vllm.py writes (the same one bench/vllm_driver.py reads: checkpoint,
dtype, warm-up batches, one batch of prompts per concurrency, long prompts), builds the engine as
``tandem bench offline`` does in process (prefix caching off, KV pool sized to the workload),
warms up, runs each level once (the batch-1 level bracketed by read-bandwidth readings, as in
process), then the long-prompt TTFTs, and writes:
{"init_s", "num_kv_blocks", "params", "weight_bytes_per_token", "flop_params", "vocab_size",
 "dtype", "threads", "levels": [offline.tandem_batch dicts, + "read_bw_GBps" at c=1],
 "ttft_long": [{"ttft_s", "other_cpu_frac"}]}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import sysperf
from bench.offline import make_engine, model_facts, probed, tandem_batch
from bench.workload import Workload


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.tandem_driver", description=__doc__.split("\n")[0])
    ap.add_argument("--spec", type=Path, required=True, help="the round's JSON spec (bench/vs_vllm.py writes it)")
    ap.add_argument("--out", type=Path, required=True, help="where the round's figures go (JSON)")
    return ap.parse_args(argv)


def run_round(spec: dict) -> dict:
    """Every figure of one process (see the module docstring)."""
    opts = spec["tandem"]
    workload = Workload(**{**spec["workload"], "concurrencies": tuple(spec["workload"]["concurrencies"])})
    t0 = time.perf_counter()
    engine = make_engine(Path(spec["model"]), argparse.Namespace(
        dtype=spec["dtype"], max_num_batched_tokens=opts["max_num_batched_tokens"]), workload)
    res = {"init_s": time.perf_counter() - t0, "num_kv_blocks": engine.kv.pool.num_blocks, **model_facts(engine),
           "vocab_size": engine.model_config.vocab_size, "dtype": spec["dtype"], "threads": torch.get_num_threads()}
    for w in spec["warmup"]:
        tandem_batch(engine, w["prompts"], w["max_tokens"], desc="tandem warm-up")
    probe = sysperf.ReadProbe(opts["bandwidth_mib"])
    res["levels"] = []
    for level in spec["levels"]:
        c = level["concurrency"]
        res["levels"].append(probed(probe if c == 1 else None, lambda: tandem_batch(
            engine, level["prompts"], spec["output_len"], desc=f"tandem c={c}")))
        print(f"tandem c={c}: {c * spec['output_len'] / max(res['levels'][-1]['end']):.1f} tok/s", flush=True)
    probe.close()
    res["ttft_long"] = []
    for prompt in spec["ttft"]:
        r = tandem_batch(engine, [prompt], 1, desc=f"tandem ttft({len(prompt)})")
        res["ttft_long"].append({"ttft_s": r["first"][0], "other_cpu_frac": r["other_cpu_frac"]})
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = json.loads(args.spec.read_text())
    if spec["tandem"]["threads"]:
        torch.set_num_threads(spec["tandem"]["threads"])
    res = run_round(spec)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
