"""The model's tokenizer (via ``tokenizers``), its chat template, and incremental detokenization.

``Tokenizer(path)`` loads ``<folder>/tokenizer.json`` (+ ``tokenizer_config.json`` /
``chat_template.jinja`` for the special tokens and the chat template) for a Hugging Face
checkpoint folder, or rebuilds the tokenizer from the metadata of a ``.gguf`` file
(``services.engine.gguf_tokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from services.engine.chat_template import ChatTemplate
from services.engine.gguf_file import is_gguf_path, read_gguf
from services.engine.gguf_tokenizer import (END_OF_GENERATION_TEXTS, build_tokenizer, end_of_generation_ids,
                                            special_token_ids)
from services.engine.request import Request

REPLACEMENT = "\ufffd"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Thin wrapper around ``tokenizers.Tokenizer`` with the model's special tokens.

    Attributes: ``special_tokens`` ({"bos_token": text, ...}, what chat templates see),
    ``chat_template`` (a ``ChatTemplate`` or None when the model ships none) and
    ``stop_token_ids`` (end-of-turn ids that should end generation by default).
    """

    def __init__(self, path: str | Path):
        if is_gguf_path(path):
            self._tok, self.special_tokens, template, self.stop_token_ids = _load_gguf(Path(path))
        else:
            self._tok, self.special_tokens, template, self.stop_token_ids = _load_folder(Path(path))
        self.chat_template = ChatTemplate(template, self.special_tokens) if template else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the model's post-processor
        adds (e.g. BOS for GGUF files with ``tokenizer.ggml.add_bos_token``)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def vocab(self) -> dict[str, int]:
        """Every token string (added tokens included) and its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, file: str | Path) -> None:
        """Write the tokenizer as a ``tokenizer.json`` file (a GGUF file's rebuilt one included)."""
        self._tok.save(str(file))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation; ValueError when the model has no chat template."""
        if self.chat_template is None:
            raise ValueError("messages: this model has no chat template; send a prompt instead")
        return self.chat_template.render(messages, add_generation_prompt)


def _load_folder(path: Path) -> tuple[HFTokenizer, dict[str, str], str | None, tuple[int, ...]]:
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"tokenizer.json: not found in {path}")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"tokenizer.json: cannot be loaded from {file}: {exc}") from exc
    config = _read_tokenizer_config(path / "tokenizer_config.json")
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    template = _folder_chat_template(path, config)
    return tok, special, template, _template_stop_ids(tok, template)


def _read_tokenizer_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _folder_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja when present (transformers >= 4.43 saves it there), else
    tokenizer_config.json's ``chat_template`` (a string, or a list of named templates: "default")."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _template_stop_ids(tok: HFTokenizer, template: str | None) -> tuple[int, ...]:
    """Special tokens that end a turn (``<|im_end|>``, ``<|eot_id|>``, ...) and that the chat
    template writes: the model emits them when its answer is complete."""
    if not template:
        return ()
    ids = [tok.token_to_id(t) for t in END_OF_GENERATION_TEXTS if t in template]
    return tuple(i for i in ids if i is not None)


def _load_gguf(path: Path) -> tuple[HFTokenizer, dict[str, str], str | None, tuple[int, ...]]:
    file = read_gguf(path)
    tok = build_tokenizer(file)
    tokens = file.get("tokenizer.ggml.tokens")
    ids = special_token_ids(file)
    special = {name: tokens[i] for name, i in ids.items()}
    if file.get("tokenizer.ggml.add_bos_token", False) and "bos_token" in ids:
        bos = (special["bos_token"], ids["bos_token"])
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B",
                                                           special_tokens=[bos])
    template = file.get("tokenizer.chat_template")
    return tok, special, template if isinstance(template, str) else None, tuple(end_of_generation_ids(file))


class Detokenizer:
    """Turns a request's growing output ids into text deltas.

    Decodes a short window ``ids[prefix_offset:]`` and emits only what extends the text of
    ``ids[prefix_offset:read_offset]``, holding back text that ends in an incomplete UTF-8
    sequence (the replacement character). Cost per token is O(window), not O(output).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def step(self, req: Request) -> str:
        """Append the text of newly generated tokens to ``req.text``; return the delta."""
        ids = req.output_token_ids
        skip = req.params.skip_special_tokens
        prefix = self.tokenizer.decode(ids[req.prefix_offset:req.read_offset], skip)
        full = self.tokenizer.decode(ids[req.prefix_offset:], skip)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        delta = full[len(prefix):]
        req.prefix_offset = req.read_offset
        req.read_offset = len(ids)
        req.text += delta
        return delta

    def flush(self, req: Request) -> str:
        """At the end of a request, append text still held back (an incomplete UTF-8 tail
        decodes to replacement characters, as a full ``decode`` would)."""
        ids = req.output_token_ids
        if req.read_offset >= len(ids):
            return ""
        skip = req.params.skip_special_tokens
        prefix = self.tokenizer.decode(ids[req.prefix_offset:req.read_offset], skip)
        full = self.tokenizer.decode(ids[req.prefix_offset:], skip)
        delta = full[len(prefix):]
        req.prefix_offset = req.read_offset = len(ids)
        req.text += delta
        return delta
