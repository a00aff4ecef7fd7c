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


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.suite == "offline":
        from bench.offline import main as offline_main

        return offline_main(rest)
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

    b = sub.add_parser("bench", help="benchmarks (offline engine; more suites with the server)")
    b.add_argument("suite", choices=["offline"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler = {"make-model": _make_model, "generate-local": _generate_local}[args.command]
    try:
        return handler(args)
    except ValueError as exc:
        print(f"tandem {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
