"""The generic plugin Registry, and a variant added by one registration (a test-only quantizer)."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest

from services.engine import LLM, SamplingParams
from services.engine.config_parse import ConfigError
from services.engine.make_model import make_model
from services.engine.plugins import HostDeps, NoOptions, PluginSection, Registry
from services.engine.quantization import QUANTIZERS


@dataclass(frozen=True)
class WindowOptions:
    width: int = 4  # a required-looking option with a default
    label: str = "w"


def test_register_parse_create():
    reg = Registry("widgets", name_key="kind")
    built = []

    @reg.register("window", options=WindowOptions)
    def make_window(options, deps):
        built.append((options, deps))
        return ("window", options.width)

    assert reg.names() == ["window"]
    short = reg.parse({"kind": "window", "width": 8}, "args.widgets")
    long = reg.parse({"name": "window", "options": {"width": 8}}, "args.widgets")
    assert short == long == PluginSection("window", WindowOptions(width=8))
    assert reg.parse("window", "w") == PluginSection("window", WindowOptions())
    deps = HostDeps(handles={"DraftWorker": object()})
    assert reg.create(short, deps) == ("window", 8) and built[-1] == (WindowOptions(width=8), deps)


def test_parse_errors_name_the_field():
    reg = Registry("widgets", name_key="kind")
    reg.register("window", options=WindowOptions)(lambda o, d: None)
    with pytest.raises(ConfigError, match=r"^args\.widgets\.kind: unknown widgets variant 'door'; available: \['window'\]"):
        reg.parse({"kind": "door"}, "args.widgets")
    with pytest.raises(ConfigError, match=r"^args\.widgets\.width: must be int, got str"):
        reg.parse({"kind": "window", "width": "wide"}, "args.widgets")
    with pytest.raises(ConfigError, match=r"^args\.widgets\.options: unknown key\(s\) \['height'\]"):
        reg.parse({"name": "window", "options": {"height": 1}}, "args.widgets")
    with pytest.raises(ConfigError, match=r"^args\.widgets: must be a variant name or a mapping"):
        reg.parse(7, "args.widgets")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("window")(lambda o, d: None)
    with pytest.raises(TypeError, match="must be a dataclass"):
        reg.register("bad", options=dict)


def test_discovery_imports_every_module_of_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_backends"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from services.engine.plugins import Registry
        BACKENDS = Registry("backends", discover=__name__)
    """))
    (pkg / "alpha.py").write_text(textwrap.dedent("""
        from fake_backends import BACKENDS
        BACKENDS.register("alpha")(lambda options, deps: "alpha")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from fake_backends import BACKENDS

        assert "fake_backends.alpha" not in sys.modules  # nothing imported it yet
        assert BACKENDS.names() == ["alpha"] and BACKENDS.create("alpha") == "alpha"
    finally:
        for name in [m for m in sys.modules if m.startswith("fake_backends")]:
            del sys.modules[name]


@dataclass(frozen=True)
class ScaleOptions:
    factor: float = 1.0  # multiplies the final norm's weight


@pytest.fixture
def scale_quantizer():
    """A test-only quantizer registered like a real one: one registration, no other edit."""
    calls = []

    @QUANTIZERS.register("test-scale-norm", options=ScaleOptions)
    def scale_norm(options: ScaleOptions, deps: HostDeps):
        def apply(model):
            calls.append(options.factor)
            model.norm.weight.mul_(options.factor)
            return model
        return apply

    yield calls
    QUANTIZERS.unregister("test-scale-norm")


def test_a_registered_variant_is_reachable_from_the_engine_config(scale_quantizer, tmp_path):
    path = str(make_model("tiny-llama", tmp_path / "m"))
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1)
    plain = LLM(path, device="cpu", num_kv_blocks=32).generate([[1, 2, 3, 4]], params)[0]
    same = LLM(path, device="cpu", num_kv_blocks=32,
               quantization={"name": "test-scale-norm", "options": {"factor": 1.0}}).generate([[1, 2, 3, 4]], params)[0]
    # scaling the final norm by 2 scales the logits before the softmax: other logprobs
    other = LLM(path, device="cpu", num_kv_blocks=32, quantization={"name": "test-scale-norm", "factor": 2.0})
    changed = other.generate([[1, 2, 3, 4]], params)[0]
    assert scale_quantizer == [1.0, 2.0]
    assert same.token_ids == plain.token_ids and same.logprobs == plain.logprobs
    assert changed.logprobs[0] != plain.logprobs[0]
    with pytest.raises(ValueError, match=r"^quantization\.factor: must be float, got str"):
        LLM(path, device="cpu", num_kv_blocks=32, quantization={"name": "test-scale-norm", "factor": "x"})
    assert QUANTIZERS.create("none", HostDeps())(other.engine.model) is other.engine.model
    assert NoOptions() == NoOptions()
