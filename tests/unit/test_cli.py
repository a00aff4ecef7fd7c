"""router/cli.py as a dispatcher: plugin commands from entry points, bench owns its suites,
router/ and services/ import nothing from bench/, the default model comes from model_catalog."""

import argparse
import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from router import cli

ROOT = Path(__file__).resolve().parents[2]
BENCH = EntryPoint("bench", "bench.cli:register", cli.COMMANDS_GROUP)


def register_echo(commands: argparse._SubParsersAction) -> None:
    """A test-only plugin: ``echo [ARGS]`` returns how many arguments it was handed."""
    echo = commands.add_parser("echo", add_help=False)
    echo.set_defaults(handler=lambda args, extra: print("echo", *extra) or len(extra), forwards_extra=True)


def register_nothing(commands: argparse._SubParsersAction) -> None:
    pass


def plugin(name: str, value: str) -> EntryPoint:
    return EntryPoint(name, value, cli.COMMANDS_GROUP)


# ---- where the commands come from --------------------------------------------------------------
def test_pyproject_declares_the_script_and_the_bench_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"tandem": "router.cli:main"}
    want = {"bench": "bench.cli:register", "distill": "services.engine.distill.cli:register"}
    assert project["entry-points"][cli.COMMANDS_GROUP] == want
    assert cli._checkout_commands(ROOT) == want


def test_discovery_reads_the_checkout_even_when_the_installed_metadata_lacks_it():
    """The editable install's metadata is as old as its `pip install -e`; the checkout's pyproject
    still brings the command in (and wins on a shared name)."""
    found = {ep.name: ep.value for ep in cli.command_entry_points(ROOT)}
    assert found.get("bench") == "bench.cli:register"
    assert cli._checkout_commands(None) == {}


def test_discovery_reads_installed_metadata(tmp_path, monkeypatch, capsys):
    """An installed distribution (here a fake one on sys.path) adds its commands beside the checkout's."""
    info = tmp_path / "tandem_echo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tandem-echo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{cli.COMMANDS_GROUP}]\necho = tests.unit.test_cli:register_echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = {ep.name: ep.value for ep in cli.command_entry_points(ROOT)}
    assert found["echo"] == "tests.unit.test_cli:register_echo" and found["bench"] == "bench.cli:register"
    assert cli.main(["echo", "a", "b"]) == 2
    assert capsys.readouterr().out == "echo a b\n"


def test_discovery_ignores_a_pyproject_of_another_project(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n'
                                             '[project.entry-points."tandem.commands"]\nx = "x:register"\n')
    assert cli._checkout_commands(tmp_path) == {}
    assert cli._checkout_commands(tmp_path / "missing") == {}


def test_bench_is_a_command_of_the_default_parser():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"make-model", "generate-local", "serve", "generate", "chat", "bench",
                                     "distill"}


# ---- dispatching -------------------------------------------------------------------------------
@pytest.mark.parametrize("suite, prog", [("serve", "tandem bench serve"), ("offline", "tandem bench offline"),
                                         ("prefix", "tandem bench prefix"), ("grpc-floor", "tandem bench grpc-floor")])
def test_bench_suite_help_is_the_suites_own(suite, prog, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", suite, "--help"], entry_points=[BENCH])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ")
    assert "SUITE" not in out  # not the help of `tandem bench`


def test_bench_help_lists_its_suites(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"], entry_points=[BENCH])
    out = capsys.readouterr().out
    assert out.startswith("usage: tandem bench ")
    assert all(suite in out for suite in ("offline", "serve", "prefix", "grpc-floor"))


def test_unknown_suite_is_an_error(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "nosuch"], entry_points=[BENCH])
    assert done.value.code == 2 and "nosuch" in capsys.readouterr().err


def test_a_plugin_gets_every_argument_after_its_name_in_order(capsys):
    echo = plugin("echo", "tests.unit.test_cli:register_echo")
    assert cli.main(["echo", "--address", "a:1", "-n", "3", "--help", "x"], entry_points=[echo]) == 6
    assert capsys.readouterr().out == "echo --address a:1 -n 3 --help x\n"


def test_serving_commands_still_reject_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["make-model", "--list", "--bogus"], entry_points=[])
    assert done.value.code == 2 and "--bogus" in capsys.readouterr().err
    assert cli.main(["make-model", "--list"], entry_points=[]) == 0
    assert "tiny-llama" in capsys.readouterr().out


def test_a_broken_or_clashing_plugin_is_reported_and_skipped(capsys):
    eps = [plugin("broken", "tests.unit.no_such_module:register"), plugin("serve", "tests.unit.test_cli:register_echo"),
           plugin("empty", "tests.unit.test_cli:register_nothing"), BENCH]
    parser = cli.build_parser(eps)
    err = capsys.readouterr().err
    assert "broken (tests.unit.no_such_module:register) failed to load" in err
    assert "serve (tests.unit.test_cli:register_echo) skipped: the name is taken" in err
    assert "empty (tests.unit.test_cli:register_nothing) added no command 'empty'" in err
    assert parser.parse_args(["serve", "--port", "1"]).handler is cli._serve  # the real serve, untouched
    assert parser.parse_known_args(["bench", "serve", "--address", "x"])[1] == ["--address", "x"]


# ---- the import graph ---------------------------------------------------------------------------
def bench_references(source: str) -> list[str]:
    """Imports of bench and strings naming a bench module (``bench.x``, ``bench:x``) in ``source``."""
    found, named = [], re.compile(r"\bbench[.:][A-Za-z_]")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "bench"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bench":
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and named.search(node.value):
            found.append(repr(node.value[:60]))
    return found


def test_the_import_audit_finds_bench_references():
    for source in ("import bench.serve\n", "from bench import offline\n", "from bench.cli import register\n",
                   "import importlib\nimportlib.import_module('bench.prefix')\n", "x = 'bench.cli:register'\n"):
        assert bench_references(source), source
    assert bench_references("x = 'a benchmark, see tandem bench serve'\nimport benchmarks\n") == []


def test_router_and_services_do_not_reference_bench():
    files = sorted(p for d in ("router", "services") for p in (ROOT / d).rglob("*.py"))
    assert ROOT / "router" / "cli.py" in files
    offenders = {str(p.relative_to(ROOT)): refs for p in files for refs in [bench_references(p.read_text())] if refs}
    assert offenders == {}


def test_the_cli_loads_no_suite_until_one_runs():
    code = ("import sys, router.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bench'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['bench', 'bench.cli']"


# ---- the default model ------------------------------------------------------------------------
def test_the_default_model_has_one_home():
    from router.app import parse_args
    from services.engine.model_catalog import default_model_path

    assert not hasattr(cli, "default_model_path")
    assert parse_args({}).workers["unified"].model == str(default_model_path())  # the app's default: the catalog's
    assert (default_model_path() / "config.json").is_file() or str(default_model_path()).endswith(".gguf")


def test_serve_names_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path)], entry_points=[]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem serve: no checkpoint (config.json) in ") and str(tmp_path) in err
