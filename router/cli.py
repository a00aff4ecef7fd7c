"""The `tandem` command line: one subcommand per job, each dispatching to its module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_model_path() -> Path:
    """The small Llama model trained by services/engine/default_model/train.py (committed)."""
    import services.engine

    return Path(services.engine.__file__).parent / "default_model" / "weights"


def _make_model(args: argparse.Namespace) -> int:
    from services.engine.make_model import SHAPES, make_model

    if args.list or not args.name:
        for name in sorted(SHAPES):
            print(name)
        return 0
    if args.name not in SHAPES:
        print(f"make-model: unknown model name {args.name!r}; known: {', '.join(sorted(SHAPES))}", file=sys.stderr)
        return 2
    if not args.out_dir:
        print("make-model: OUT_DIR is required", file=sys.stderr)
        return 2
    out = make_model(args.name, args.out_dir, seed=args.seed)
    print(out)
    return 0


def _generate_local(args: argparse.Namespace) -> int:
    """Run the engine in this process and stream the completion to stdout."""
    from services.engine import SamplingParams
    from services.engine.engine import LLMEngine
    from services.engine.llm import build_engine_config

    engine = LLMEngine(build_engine_config(args.model or str(default_model_path()), device=args.device,
                                           dtype=args.dtype, kv_cache_memory_gb=0.25))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    engine.add_request(args.prompt, params)
    print(args.prompt, end="", flush=True)
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            print(chunk.text, end="", flush=True)
            if chunk.finished:
                print(f"\n[finish_reason={chunk.finish_reason} tokens={chunk.num_output_tokens}]")
    return 0


DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
DEFAULT_ADDRESS = "127.0.0.1:50051"


def _serve(args: argparse.Namespace) -> int:
    """Start a local Ray head on loopback, deploy the config, print the address, wait for Ctrl-C."""
    import signal
    import threading

    from router import launcher

    config_file = Path(args.config) if args.config else DEPLOY_DIR / "local.yaml"
    if not config_file.is_file():
        print(f"tandem serve: config {config_file} not found", file=sys.stderr)
        return 2
    model = args.model or str(default_model_path())
    if not (Path(model) / "config.json").is_file():
        print(f"tandem serve: no model checkpoint in {model} (pass --model PATH)", file=sys.stderr)
        return 2
    config = launcher.load_config(config_file, model=model, port=args.port)
    launcher.validate(config)  # a bad value fails here, naming its YAML path, before Redis or Ray start
    from services.prefix_store.server import redis_for_serve

    configured = (config["applications"][0].get("args", {}).get("prefix_store") or {}).get("url")
    redis, store_args, note = redis_for_serve(args.redis_url or configured, args.no_redis, args.redis_maxmemory)
    config = launcher.patch_config(config, overrides={"prefix_store": store_args})
    print(f"tandem serve: {note}", flush=True)
    stop = threading.Event()

    def on_signal(*_):  # installed explicitly: a background job starts with SIGINT ignored
        if stop.is_set() or not serving.is_set():
            raise KeyboardInterrupt  # still deploying (or a second Ctrl-C): stop waiting now
        stop.set()

    serving = threading.Event()
    print(f"tandem serve: starting Ray (127.0.0.1, token auth, no dashboard) and {config_file.name} ...", flush=True)
    try:
        launcher.start_local_ray(num_cpus=args.num_cpus)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, on_signal)
        address = launcher.deploy(config, timeout_s=args.timeout)
        serving.set()
        print(f"tandem serve: serving {Path(model).name} on {address} (Ctrl-C stops)", flush=True)
        print(f"  try: {_self_command()} generate --address {address} \"The for statement\"", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("tandem serve: shutting down", flush=True)
        launcher.shutdown()
        if redis is not None:
            redis.stop()
    return 0


def _self_command() -> str:
    """How to run this CLI again from the user's shell ("tandem" when it is on PATH)."""
    import shutil

    exe = Path(sys.argv[0])
    if exe.name == "tandem" and shutil.which("tandem") == str(exe.resolve()):
        return "tandem"
    return str(exe) if exe.name == "tandem" else "tandem"


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from protos.tandem.v1 import generation_pb2 as pb
    from router.client import stream_completion

    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        sampling.seed = args.seed
    try:
        stream_completion(args.address, args.prompt, sampling, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"\ntandem generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.suite == "offline":
        from bench.offline import main as offline_main

        return offline_main(rest)
    if args.suite == "serve":
        from bench.serve import main as serve_main

        return serve_main(rest)
    if args.suite == "prefix":
        from bench.prefix import main as prefix_main

        return prefix_main(rest)
    if args.suite == "grpc-floor":
        from bench.grpc_floor import main as floor_main

        return floor_main(rest)
    print(f"bench: unknown suite {args.suite!r}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description="Tandem: distributed LLM inference serving")
    sub = p.add_subparsers(dest="command", required=True)

    mm = sub.add_parser("make-model", help="write a random-weight checkpoint of a named shape")
    mm.add_argument("name", nargs="?")
    mm.add_argument("out_dir", nargs="?")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--list", action="store_true", help="list the known shapes")

    gl = sub.add_parser("generate-local", help="generate in this process (no server)")
    gl.add_argument("prompt")
    gl.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    gl.add_argument("--max-tokens", type=int, default=64)
    gl.add_argument("--temperature", type=float, default=0.0)
    gl.add_argument("--top-p", type=float, default=1.0)
    gl.add_argument("--seed", type=int, default=None)
    gl.add_argument("--device", default=None)
    gl.add_argument("--dtype", default=None)

    sv = sub.add_parser("serve", help="start a local Ray head and serve a deploy config over gRPC")
    sv.add_argument("--config", help="Serve config YAML (default: deploy/local.yaml)")
    sv.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    sv.add_argument("--port", type=int, default=None, help="gRPC port (default: the config's, 50051)")
    sv.add_argument("--num-cpus", type=int, default=16, help="logical CPUs of the local Ray head")
    sv.add_argument("--timeout", type=float, default=600, help="seconds to wait for the app to be ready")
    sv.add_argument("--redis-url", help="Redis of the prefix cache: redis://[user@]host:port or rediss:// (TLS); "
                    "password from $TANDEM_REDIS_PASSWORD (default: start a local redis-server)")
    sv.add_argument("--no-redis", action="store_true", help="prefix cache in each worker's memory only")
    sv.add_argument("--redis-maxmemory", default="512mb", help="maxmemory of the local redis-server (allkeys-lru)")

    g = sub.add_parser("generate", help="stream a completion from a running server")
    g.add_argument("prompt")
    g.add_argument("--address", default=DEFAULT_ADDRESS)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--timeout", type=float, default=None, help="gRPC deadline in seconds")

    b = sub.add_parser("bench", help="benchmarks: offline (engine in-process), serve (gRPC load generator), "
                       "prefix (Redis-prefix TTFT), grpc-floor (grpc.aio's own per-message delay)")
    b.add_argument("suite", choices=["offline", "serve", "prefix", "grpc-floor"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler = {"make-model": _make_model, "generate-local": _generate_local, "serve": _serve,
               "generate": _generate}[args.command]
    try:
        return handler(args)
    except ValueError as exc:
        print(f"tandem {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
