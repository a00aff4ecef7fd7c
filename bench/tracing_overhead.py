"""Tracing overhead: gRPC throughput with tracing on (sampling 1.0, OTLP/gRPC to a local
receiver) vs off, same machine, same session, rounds alternating off/on.

    python -m bench.tracing_overhead --model /tmp/perf_anchor/models/dense-100m --rounds 2 \\
        [--config deploy/pd.yaml] [--json out.json] [-- extra args of tandem bench serve]

Each round starts ``tandem serve`` (a fresh local Ray head) with or without the ``OTEL_*``
variables, runs ``tandem bench serve`` against it and stops it. The receiver
(bench/otlp_receiver.py, count only) runs in its own process for the whole session, as a
collector would; its span count shows the "on" rounds really exported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.engine.env import environ_without

ROOT = Path(__file__).resolve().parents[1]
BENCH_DEFAULTS = ["--num-prompts", "64", "--concurrency", "32", "--input-len", "128", "--output-len", "128",
                  "--no-progress"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_cpu(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of ``root_pid`` and its descendants, by process title
    (Serve replicas: "ray::ServeReplica:tandem:PrefillWorker", ...; the rest summed as "other")."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, title)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if pid in procs:
            _, cpu, title = procs[pid]
            name = title.split(":")[-1] if title.startswith("ray::ServeReplica") else "other"
            out[name] = out.get(name, 0.0) + cpu
    return out


def start_server(args, port: int, env: dict, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "router.cli", "serve", "--config", args.config, "--model", args.model,
           "--port", str(port), "--no-redis", "--timeout", "600"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    from router.launcher import wait_serving

    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"tandem serve exited ({proc.returncode}); see {log}")
        if "serving" in log.read_text():
            wait_serving(f"127.0.0.1:{port}", timeout_s=60)
            return proc
        time.sleep(1)
    raise TimeoutError(f"tandem serve not serving after 600s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # tandem serve shuts Serve and Ray down itself
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_bench(port: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "router.cli", "bench", "serve", "--address", f"127.0.0.1:{port}",
           *BENCH_DEFAULTS, *extra, "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--config", default=str(ROOT / "deploy" / "pd.yaml"))
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    p.add_argument("--json", type=Path)
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="tandem-tracing-bench-"))
    receiver_port = free_port()
    receiver_log = (work / "receiver.log").open("w")
    receiver = subprocess.Popen([sys.executable, "-m", "bench.otlp_receiver", "--port", str(receiver_port)], cwd=ROOT,
                                stdout=receiver_log, stderr=subprocess.STDOUT)
    base_env = environ_without("OTEL_")
    on_env = {**base_env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
              "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0",
              "OTEL_SERVICE_NAME": "tandem-bench"}
    results: list[dict] = []
    try:
        for i in range(args.rounds):
            for mode, env in (("off", base_env), ("on", on_env)):
                port = free_port()
                env = {**env, "TANDEM_METRICS_PORT": str(free_port())}
                server = start_server(args, port, env, work / f"serve-{mode}-{i}.log")
                try:
                    load_before = os.getloadavg()[0]
                    cpu_before = cluster_cpu(server.pid)
                    summary = run_bench(port, work / f"bench-{mode}-{i}.json", extra)
                    cpu_after = cluster_cpu(server.pid)
                finally:
                    stop_server(server)
                row = {"round": i, "tracing": mode, "output_tok_per_s": summary["output_tok_per_s"],
                       "failed": summary["failed"], "ttft_ms": summary["ttft_ms"], "tpot_ms": summary["tpot_ms"],
                       "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
                       # CPU the cluster spent on the run, per process kind, and per output token
                       "cluster_cpu_s": {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in cpu_after.items()}}
                row["cpu_ms_per_token"] = 1000 * sum(row["cluster_cpu_s"].values()) / (
                    summary["output_tok_per_s"] * summary["duration_s"])
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=30)
    counts = re.findall(r"spans (\d+)", (work / "receiver.log").read_text())
    off = [r["output_tok_per_s"] for r in results if r["tracing"] == "off"]
    on = [r["output_tok_per_s"] for r in results if r["tracing"] == "on"]
    cpu_off = [r["cpu_ms_per_token"] for r in results if r["tracing"] == "off"]
    cpu_on = [r["cpu_ms_per_token"] for r in results if r["tracing"] == "on"]
    report = {"rounds": results, "off_mean": sum(off) / len(off), "on_mean": sum(on) / len(on),
              "cpu_ms_per_token_off": sum(cpu_off) / len(cpu_off), "cpu_ms_per_token_on": sum(cpu_on) / len(cpu_on),
              "ratio": (sum(on) / len(on)) / (sum(off) / len(off)), "spans_received": int(counts[-1]) if counts else 0,
              "logs": str(work)}
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
