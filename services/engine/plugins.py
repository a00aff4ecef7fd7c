"""Variants behind small interfaces: one generic ``Registry`` and the config sections that pick one.

Glossary
- variant: one implementation of an interface (a KV transfer backend, an expert backend, a
  proposer, a quantizer), registered under a name users type in a config.
- section: a ``PluginSection`` in a frozen config: the variant's name and its options, an
  instance of the options dataclass the variant registered (validated when the config is built).
- deps: a ``HostDeps``: what the process hosting the engine injects (Serve handles by name), so
  that the engine never imports ray; a variant that needs a handle finds it there.

Adding a variant is one new file: a factory ``(options, deps) -> T`` decorated with
``REGISTRY.register(name, options=OptionsDataclass)``. A registry with ``discover`` set imports
every module of that package the first time it is asked for its variants, so no import line
elsewhere is needed.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.engine.config_parse import ConfigError, parse_dataclass

T = TypeVar("T")


@dataclass(frozen=True)
class NoOptions:
    """The options of a variant that takes none."""


@dataclass(frozen=True)
class PluginSection:
    """Which variant a config picks, and its validated options."""

    name: str  # the registered variant name
    options: Any = field(default_factory=NoOptions)  # instance of the variant's options dataclass


@dataclass(frozen=True)
class HostDeps:
    """What a host process injects into variants (empty when the engine runs on its own)."""

    handles: Mapping[str, Any] = field(default_factory=dict)  # Serve deployment handles by deployment name
    # deployment name -> build(options, target) -> Proposer: a proposer that calls that deployment
    # (``speculative: {method: draft_model, deployment: NAME}``; services/draft_client.py)
    proposers: Mapping[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    # deployment name -> build(options) -> ExpertShards: the transport to the ExpertWorker shards
    # (``experts: {backend: remote, deployment: NAME}``; services/expert_client.py)
    expert_shards: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[Any, HostDeps], Any]  # (options, deps) -> the variant
    options: type  # its options dataclass


class Registry(Generic[T]):
    """Named variants of one interface, and the parsing of the config section that chooses one.

    ``section`` is the config key (``kv_transfer``, ``experts``, ...); ``name_key`` is the key a
    user writes the variant's name under in the short form (``{"method": "ngram", "k": 3}``);
    ``discover`` is a package whose modules register variants (imported on first use).
    """

    def __init__(self, section: str, name_key: str = "name", discover: str | None = None):
        self.section = section
        self.name_key = name_key
        self._discover = discover
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, options: type = NoOptions):
        """Decorator: make the factory (or class) ``(options, deps) -> T`` available under ``name``."""
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"{self.section}: options of {name!r} must be a dataclass")

        def wrap(factory):
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.section}: {name!r} is registered twice")
            self._entries[name] = _Entry(factory, options)
            return factory

        return wrap

    def unregister(self, name: str) -> None:
        """Remove a variant (tests register throw-away variants)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entry(self, name: str, path: str = "") -> _Entry:
        self._load()
        if name not in self._entries:
            raise ConfigError(path or self.section, f"unknown {self.section} variant {name!r}; available: {self.names()}")
        return self._entries[name]

    def parse(self, value: Any, path: str) -> PluginSection:
        """A section from config data: ``"name"``, ``{"name": n, "options": {...}}``, or the short
        form ``{name_key: n, option: value, ...}``; options are type-checked against the variant's
        options dataclass. Raises ``ConfigError`` naming the field by ``path``."""
        if isinstance(value, PluginSection):
            value = {"name": value.name, "options": value.options}
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be a variant name or a mapping, got {type(value).__name__}")
        data = dict(value)
        long_form = "options" in data or ("name" in data and self.name_key not in data)
        if long_form:
            name_field, options = "name", data.pop("options", {})
            if set(data) - {"name"}:
                raise ConfigError(path, f"unknown key(s) {sorted(set(data) - {'name'})}; use name and options")
        else:
            name_field, options = self.name_key, {k: v for k, v in data.items() if k != self.name_key}
        name = data.get(name_field)
        if not isinstance(name, str):
            raise ConfigError(f"{path}.{name_field}", f"must be a variant name, one of {self.names()}")
        entry = self.entry(name, f"{path}.{name_field}")
        if dataclasses.is_dataclass(options) and not isinstance(options, type):
            options = dataclasses.asdict(options)
        opts_path = f"{path}.options" if long_form else path
        return PluginSection(name, parse_dataclass(entry.options, options, opts_path))

    def create(self, section: PluginSection | str, deps: HostDeps | None = None) -> T:
        """The variant ``section`` names, built with its options and the host's ``deps``."""
        if isinstance(section, str):
            section = self.parse(section, self.section)
        return self.entry(section.name).factory(section.options, deps or HostDeps())

    def _load(self) -> None:
        if self._discover is None:
            return
        package, self._discover = importlib.import_module(self._discover), None
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
