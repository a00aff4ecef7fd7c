"""``tandem bench SUITE [ARGS]``: the benchmark suites as a ``tandem`` command.

Registered through the ``tandem.commands`` entry point in pyproject.toml (``bench =
"bench.cli:register"``); the dispatcher in router/cli.py discovers it and imports nothing
from bench/ by name. Each suite is a module with its own ``main(argv) -> int`` (also runnable
as ``python -m bench.<module>``); this file only names them. A suite's parser is its own, so
``tandem bench serve --help`` prints the help of ``bench serve``: the suite's subparser takes
no arguments (not even ``-h``) and hands every argument after the suite's name to ``main``.
"""

from __future__ import annotations

import argparse
import functools
import importlib

# suite name -> (module with main(argv), one line for `tandem bench --help`)
SUITES: dict[str, tuple[str, str]] = {
    "offline": ("bench.offline", "the engine in this process (LLM.generate): throughput, TTFT, TPOT"),
    "serve": ("bench.serve", "gRPC load generator against a running server"),
    "prefix": ("bench.prefix", "time to first token with and without the Redis prefix cache"),
    "grpc-floor": ("bench.grpc_floor", "grpc.aio's own per-message delay on this machine"),
    "moe": ("bench.moe", "MoE decode tok/s, experts partly resident (offload) or in ExpertWorker shards (remote), against local"),
    "spec": ("bench.spec", "speculative decoding on vs off: tok/s and acceptance, chat and input-grounded prompts"),
}


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``bench`` command to the ``tandem`` parser's subcommands."""
    bench = commands.add_parser("bench", help="benchmarks: " + ", ".join(SUITES),
                                description="Tandem's benchmark suites; `tandem bench SUITE --help` for each.")
    suites = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (module, summary) in SUITES.items():
        suite = suites.add_parser(name, help=summary, add_help=False)
        suite.set_defaults(handler=functools.partial(run_suite, module), forwards_extra=True)


def run_suite(module: str, args: argparse.Namespace, extra: list[str]) -> int:
    """Run the suite ``module`` with the arguments that followed its name."""
    return importlib.import_module(module).main(extra)
