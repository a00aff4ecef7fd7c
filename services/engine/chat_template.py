"""Chat templates: a conversation -> the prompt text the model was trained on.

A chat template is a Jinja2 program shipped with the model (``tokenizer.chat_template`` in a
GGUF file; ``chat_template`` in tokenizer_config.json or a ``chat_template.jinja`` file in a
Hugging Face folder). It is rendered the way transformers' ``apply_chat_template`` renders
it, so the same conversation gives the same text:
- a sandboxed environment (``ImmutableSandboxedEnvironment``: templates are untrusted code)
  with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and a
  ``{% generation %}`` block tag (rendered as its body);
- variables ``messages``, ``tools`` (None), ``documents`` (None), ``add_generation_prompt``
  and the special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``);
- ``raise_exception(msg)``, ``strftime_now(fmt)``, a ``namespace`` that refuses underscore
  attributes, and a ``tojson`` filter that does not HTML-escape (``json.dumps`` with
  ``ensure_ascii=False``).
Errors (a syntax error in the template, ``raise_exception``, a malformed message) are
ValueErrors naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that does not compile or refuses a conversation, or a malformed message."""


class ChatTemplate:
    """One compiled chat template and the special-token texts it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("chat template: must be a non-empty string")
        self.source = source
        self.special_tokens = dict(special_tokens or {})  # "bos_token" -> "<|im_start|>", ...
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: does not compile: {e}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (each ``{"role": str, "content": str, ...}``),
        ending with the assistant's turn header when ``add_generation_prompt``."""
        plain = check_messages(messages)
        try:
            return self._template.render(messages=plain, tools=None, documents=None,
                                         add_generation_prompt=bool(add_generation_prompt), **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain JSON copies of ``messages`` (keys whose value is None dropped, as transformers
    does); ChatTemplateError naming ``messages[i].field`` when one is malformed."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages: must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}]: must be an object with role and content, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ChatTemplateError(f"messages[{i}].{key}: must be a string, got {type(m.get(key)).__name__}")
        try:
            out.append(json.loads(json.dumps({k: v for k, v in m.items() if v is not None})))
        except (TypeError, ValueError) as e:
            raise ChatTemplateError(f"messages[{i}]: holds a value that is not plain JSON data ({e})") from None
    return out


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks in
    transformers): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` without underscore attributes (no reach into Python internals)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: names starting with '_' are refused")


def _raise_exception(message) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env
