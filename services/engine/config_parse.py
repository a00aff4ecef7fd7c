"""Frozen config dataclasses from plain data (a Serve YAML's args, ``LLM(**kwargs)``), checked once.

Every error is a ``ConfigError`` whose message starts with the field's path, as the user wrote
it (``applications[0].args.engine.block_size: must be a power of two >= 1, got 3``):
- an unknown key names itself and lists the known ones;
- a wrong type says what was expected (``bool`` is not an ``int``; an ``int`` is a fine ``float``);
- a value out of range is reported by the dataclass's own ``__post_init__``, which raises
  ``ConfigError(field, message)``; the parser puts the path in front.

Field types understood: ``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[...]``,
nested frozen dataclasses, ``Mapping``/``Any`` (passed through), and fields whose metadata holds a
``parse`` function (plugin sections: ``field(metadata={"parse": registry.parse})``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A bad config value; ``path`` names the field, ``reason`` says what is wrong with it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` in front of its path."""
        return ConfigError(join(prefix, self.path), self.reason)


def join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name:
        return prefix
    return f"{prefix}{name}" if name.startswith("[") else f"{prefix}.{name}"


def parse_dataclass(cls: type, data: Any, path: str, base: Any = None) -> Any:
    """An instance of dataclass ``cls`` from a mapping (or an instance of ``cls``). With ``base``
    (an instance), keys in ``data`` override its values and the rest are kept."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(path, f"unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        f = fields[name]
        current = getattr(base, name) if base is not None else None
        values[name] = parse_field(hints[name], value, join(path, name), f.metadata, current)
    return construct(cls, values, path, base)


def construct(cls: type, values: dict, path: str, base: Any = None) -> Any:
    """``cls(**values)`` (or ``replace(base, **values)``) with range errors placed under ``path``."""
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as exc:
        raise exc.under(path) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, str(exc)) from None


def parse_field(tp: Any, value: Any, path: str, metadata: Mapping = {}, current: Any = None) -> Any:
    """One value of declared type ``tp``."""
    if "parse" in metadata:
        return metadata["parse"](value, path)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return parse_field(option, value, path, {}, current)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"must be {' or '.join(_name(a) for a in args)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        base = current if dataclasses.is_dataclass(current) else None
        return parse_dataclass(tp, value, path, base)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(parse_field(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is Any or tp is object or origin in (Mapping, dict, typing.Mapping):
        return value
    return _scalar(tp, value, path)


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"must be {_name(tp)}, got {_describe(value)}")


def _name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
