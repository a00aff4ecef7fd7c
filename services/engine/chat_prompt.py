"""A conversation -> the prompt token ids and stop tokens of a chat request (``LLM.chat``, the
router's ``GenerateRequest.messages``): render the model's chat template, tokenize the text
without adding special tokens (the template writes them), and stop at the template's
end-of-turn tokens as well as at the model's EOS."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from services.engine.sampling_params import SamplingParams

Conversation = Sequence[Mapping[str, str]]  # [{"role": "user", "content": "..."}, ...]


def chat_prompt_ids(tokenizer, messages: Conversation, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a conversation rendered with the model's chat template (the template
    writes the special tokens itself, so none are added by the tokenizer)."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt))


def with_end_of_turn(params: SamplingParams, end_of_turn: Sequence[int]) -> SamplingParams:
    """``params`` that also stop at the chat template's end-of-turn token ids."""
    extra = tuple(t for t in end_of_turn if t not in params.stop_token_ids)
    if not extra:
        return params
    return dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids) + extra)

