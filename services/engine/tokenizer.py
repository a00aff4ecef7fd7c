"""The model's own tokenizer.json (via ``tokenizers``) and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from services.engine.request import Request

REPLACEMENT = "\ufffd"


class Tokenizer:
    """Thin wrapper around ``tokenizers.Tokenizer`` loaded from ``<model>/tokenizer.json``."""

    def __init__(self, path: str | Path):
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"tokenizer.json: not found in {path}")
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer.json: cannot be loaded from {file}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


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
