"""The `tandem` command line: a dispatcher of subcommands.

The serving commands (make-model, generate-local, serve, generate) are defined here. Other
packages add their own through the entry point group ``tandem.commands`` (pyproject.toml
``[project.entry-points."tandem.commands"]``): the entry point's name is the command, its
object a ``register(commands)`` that adds the parser of that name to ``commands`` (the
``add_subparsers`` action) and sets on it ``handler=fn`` (``fn(args) -> int``; with
``forwards_extra=True``: ``fn(args, extra) -> int``, where ``extra`` are the arguments this
parser did not know, e.g. for a sub-tool with its own parser). The benchmark suites come in
this way, so router/ knows no module of them.

Where the entry points come from: the installed package's metadata, and the pyproject.toml of
the source checkout this file belongs to, when there is one; the checkout's declaration wins on
a name both have. The metadata of an editable install is written at `pip install -e` time, so
without the second source a command declared since (or a checkout run as `python -m router.cli`
beside another checkout's install) would be missing; the checkout's pyproject describes the
code that actually runs. A plugin that fails to load is reported on stderr and left out: it
never takes the serving commands down with it.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from services.engine.model_catalog import check_model_path, resolve_model

COMMANDS_GROUP = "tandem.commands"
CHECKOUT = Path(__file__).resolve().parents[1]  # the source tree when run from one (has pyproject.toml)


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

    model = resolve_model(args.model)
    check_model_path(model)
    engine = LLMEngine(build_engine_config(model, device=args.device, dtype=args.dtype, kv_cache_memory_gb=0.25))
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

    launcher.loopback_environment(args.node_ip_address)  # before anything imports ray (launcher.validate does)
    config_file = Path(args.config) if args.config else DEPLOY_DIR / "local.yaml"
    if not config_file.is_file():
        print(f"tandem serve: config {config_file} not found", file=sys.stderr)
        return 2
    model = resolve_model(args.model)
    check_model_path(model)  # ValueError: main prints it, exit status 2
    config = launcher.load_config(config_file, model=model, port=args.port)
    launcher.validate(config)  # a bad value fails here, naming its YAML path, before Redis or Ray start
    from services.prefix_store.server import redis_for_serve

    store = config["applications"][0].get("args", {}).get("prefix_store") or {}  # password_env / _file kept
    redis, store_args, note = redis_for_serve(args.redis_url or store.get("url"), args.no_redis, args.redis_maxmemory,
                                              store)
    config = launcher.patch_config(config, overrides={"prefix_store": store_args})
    print(f"tandem serve: {note}", flush=True)
    stop = threading.Event()

    def on_signal(*_):  # installed explicitly: a background job starts with SIGINT ignored
        if stop.is_set() or not serving.is_set():
            raise KeyboardInterrupt  # still deploying (or a second Ctrl-C): stop waiting now
        stop.set()

    serving = threading.Event()
    print(f"tandem serve: starting Ray ({args.node_ip_address}, token auth, no dashboard) and {config_file.name} ...",
          flush=True)
    try:
        launcher.start_local_ray(num_cpus=args.num_cpus, node_ip=args.node_ip_address)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, on_signal)
        address = launcher.deploy(config, timeout_s=args.timeout)
        serving.set()
        print(f"tandem serve: serving {Path(model).name} on {address} (Ctrl-C stops)", flush=True)
        print(f"  try: {_self_command()} {_try_command(model, address)}", flush=True)
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


def _try_command(model: str, address: str) -> str:
    """The client command printed once serving: a chat for a model with a chat template."""
    from services.engine.tokenizer import Tokenizer

    where = "" if address == DEFAULT_ADDRESS else f" --address {address}"
    if Tokenizer(model).chat_template is not None:
        return f"generate{where} --chat \"What is the capital of France?\"   (or: chat{where})"
    return f"generate{where} \"The for statement\""


def _self_command() -> str:
    """How to run this CLI again from the user's shell ("tandem" when it is on PATH)."""
    import shutil

    exe = Path(sys.argv[0])
    if exe.name == "tandem" and shutil.which("tandem") == str(exe.resolve()):
        return "tandem"
    return str(exe) if exe.name == "tandem" else "tandem"


def _sampling(args: argparse.Namespace):
    from protos.tandem.v1 import generation_pb2 as pb

    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        sampling.seed = args.seed
    return sampling


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from router.client import chat_once, stream_completion

    if (args.prompt is None) == (args.chat is None):
        raise ValueError("give exactly one of PROMPT (a completion) and --chat TEXT (a chat turn)")
    try:
        if args.chat is not None:
            chat_once(args.address, args.chat, _sampling(args), system=args.system, timeout=args.timeout)
        else:
            stream_completion(args.address, args.prompt, _sampling(args), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"\ntandem generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _chat(args: argparse.Namespace) -> int:
    """An interactive chat with the served model: one turn per line of stdin (piped works too)."""
    from router.client import chat_session

    return chat_session(args.address, _sampling(args), system=args.system, timeout=args.timeout,
                        show_usage=args.usage)


def command_entry_points(checkout: Path | None = CHECKOUT) -> list[metadata.EntryPoint]:
    """The ``tandem.commands`` entry points: installed metadata, then (winning on a shared name)
    the ones declared in ``checkout``'s pyproject.toml, if it is Tandem's source tree."""
    found = {ep.name: ep for ep in metadata.entry_points(group=COMMANDS_GROUP)}
    for name, value in _checkout_commands(checkout).items():
        found[name] = metadata.EntryPoint(name, value, COMMANDS_GROUP)
    return [found[name] for name in sorted(found)]


def _checkout_commands(checkout: Path | None) -> dict[str, str]:
    """name -> "module:function" from ``[project.entry-points."tandem.commands"]`` of the source
    tree's pyproject.toml ({} for an installed wheel, which has none beside its packages)."""
    pyproject = checkout / "pyproject.toml" if checkout else None
    if pyproject is None or not pyproject.is_file():
        return {}
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    if project.get("name") != "tandem":
        return {}
    return dict(project.get("entry-points", {}).get(COMMANDS_GROUP, {}))


def add_plugin_commands(commands: argparse._SubParsersAction, entry_points: list[metadata.EntryPoint]) -> None:
    """Let each entry point register its command; one that fails (import error, name taken, no
    parser of its name added) is reported on stderr and skipped."""
    for ep in entry_points:
        if ep.name in commands.choices:
            print(f"tandem: command plugin {ep.name} ({ep.value}) skipped: the name is taken", file=sys.stderr)
            continue
        try:
            ep.load()(commands)
        except Exception as exc:  # a broken plugin must not take the serving commands down
            commands.choices.pop(ep.name, None)
            print(f"tandem: command plugin {ep.name} ({ep.value}) failed to load: {exc!r}", file=sys.stderr)
            continue
        if ep.name not in commands.choices:
            print(f"tandem: command plugin {ep.name} ({ep.value}) added no command {ep.name!r}", file=sys.stderr)


def build_parser(entry_points: list[metadata.EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The ``tandem`` parser: the serving commands, then the plugins' (default: discovered)."""
    p = argparse.ArgumentParser(prog="tandem", description="Tandem: distributed LLM inference serving")
    sub = p.add_subparsers(dest="command", required=True)

    mm = sub.add_parser("make-model", help="write a random-weight checkpoint of a named shape")
    mm.add_argument("name", nargs="?")
    mm.add_argument("out_dir", nargs="?")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--list", action="store_true", help="list the known shapes")
    mm.set_defaults(handler=_make_model)

    gl = sub.add_parser("generate-local", help="generate in this process (no server)")
    gl.add_argument("prompt")
    gl.add_argument("--model", help="checkpoint folder or model name (default: smollm2 when installed, else the embedded model)")
    gl.add_argument("--max-tokens", type=int, default=64)
    gl.add_argument("--temperature", type=float, default=0.0)
    gl.add_argument("--top-p", type=float, default=1.0)
    gl.add_argument("--seed", type=int, default=None)
    gl.add_argument("--device", default=None)
    gl.add_argument("--dtype", default=None)
    gl.set_defaults(handler=_generate_local)

    sv = sub.add_parser("serve", help="start a local Ray head and serve a deploy config over gRPC")
    sv.add_argument("--config", help="Serve config YAML (default: deploy/local.yaml)")
    sv.add_argument("--model", help="checkpoint folder or model name (default: smollm2 when installed, else the embedded model)")
    sv.add_argument("--port", type=int, default=None, help="gRPC port (default: the config's, 50051)")
    sv.add_argument("--num-cpus", type=int, default=16, help="logical CPUs of the local Ray head")
    sv.add_argument("--node-ip-address", default="127.0.0.1", help="address every Ray process of the head listens "
                    "on (default: loopback; the router's own address is the config's args.host)")
    sv.add_argument("--timeout", type=float, default=600, help="seconds to wait for the app to be ready")
    sv.add_argument("--redis-url", help="Redis of the prefix cache: redis://[user@]host:port or rediss:// (TLS); "
                    "password from $TANDEM_REDIS_PASSWORD (default: start a local redis-server on 127.0.0.1, "
                    "which requires that password when it is set)")
    sv.add_argument("--no-redis", action="store_true", help="prefix cache in each worker's memory only")
    sv.add_argument("--redis-maxmemory", default="512mb", help="maxmemory of the local redis-server (allkeys-lru)")
    sv.set_defaults(handler=_serve)

    g = sub.add_parser("generate", help="stream a completion (or, with --chat, a chat answer) from a running server")
    g.add_argument("prompt", nargs="?", help="text to complete")
    g.add_argument("--chat", metavar="TEXT", help="a user message, answered with the model's chat template")
    _client_options(g, max_tokens=64)
    g.set_defaults(handler=_generate)

    ch = sub.add_parser("chat", help="chat with a running server in the terminal (Ctrl-C or EOF ends)")
    _client_options(ch, max_tokens=512)
    ch.add_argument("--usage", action="store_true", help="print each turn's token counts after the reply")
    ch.set_defaults(handler=_chat)

    add_plugin_commands(sub, command_entry_points() if entry_points is None else entry_points)
    return p


def _client_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument("--system", default="", help="system message of a chat (default: the template's own)")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="gRPC deadline in seconds (per turn)")


def main(argv: list[str] | None = None, entry_points: list[metadata.EntryPoint] | None = None) -> int:
    parser = build_parser(entry_points)
    args, extra = parser.parse_known_args(argv)
    forwards_extra = getattr(args, "forwards_extra", False)
    if extra and not forwards_extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args, extra) if forwards_extra else args.handler(args)
    except ValueError as exc:
        print(f"tandem {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
