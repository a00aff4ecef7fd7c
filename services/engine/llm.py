"""Offline API: ``LLM(model=path).generate(prompts, sampling_params)`` and
``LLM(model=path).chat(conversations, sampling_params)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tqdm import tqdm

from services.engine.chat_prompt import Conversation, chat_prompt_ids, with_end_of_turn
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.model_catalog import NAMED_MODELS, resolve_model
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams

Prompt = str | list[int]


def build_engine_config(model: str, **options) -> EngineConfig:
    """``EngineConfig.from_options`` for keyword options (vLLM-style names; see
    services/engine/config.py); ``device=None`` / ``dtype=None`` mean ``auto``. ``model`` is a
    path or a name of services/engine/model_catalog.py (``smollm2``, ``embedded``)."""
    if model in NAMED_MODELS:
        model = resolve_model(model)
    for key in ("device", "dtype"):
        if key in options and options[key] is None:
            options[key] = "auto"
    return EngineConfig.from_options(model, options)


class LLM:
    """Runs the engine in this process until every prompt is finished.

    ``options`` are the engine's (services/engine/config.py), by their vLLM names where vLLM has
    one: ``LLM(model, dtype="float32", block_size=16, num_kv_blocks=256, max_num_seqs=64,
    speculative_config={...}, experts={"backend": "local"}, quantization="none")``. A bad option
    raises ValueError naming it.
    """

    def __init__(self, model: str, **options):
        self.engine = LLMEngine(build_engine_config(model, **options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in input order. Prompts are text or token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        sampling_params = per_prompt(sampling_params, len(prompts), "prompts")
        reqs = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                reqs.append(self.engine.add_request(prompt, params, priority=priority[i] if priority else 0))
        except Exception:
            for r in reqs:
                self.engine.abort(r.request_id)
            raise
        bar = tqdm(total=len(reqs), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for chunk in self.engine.step():
                if chunk.finished:
                    bar.update(1)
        bar.close()
        return [to_output(r, p) for r, p in zip(reqs, prompts)]

    def chat(self, conversations: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """One ``RequestOutput`` per conversation (a list of ``{role, content}`` messages; or a
        list of them). Each is rendered with the model's chat template and generated like
        ``generate`` would the rendered text's token ids, stopping also at the template's
        end-of-turn tokens (``<|im_end|>``, ...). ValueError when the model has no chat template
        or a message is malformed (naming ``messages[i].field``)."""
        if isinstance(conversations, Sequence) and conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        conversations = list(conversations)
        sampling_params = per_prompt(sampling_params, len(conversations), "conversations")
        prompts = [chat_prompt_ids(self.tokenizer, c, add_generation_prompt) for c in conversations]
        params = [with_end_of_turn(p, self.tokenizer.stop_token_ids) for p in sampling_params]
        return self.generate(prompts, params, use_tqdm=use_tqdm)


def per_prompt(sampling_params, n: int, what: str) -> list[SamplingParams]:
    """One ``SamplingParams`` per input: None (the defaults) or one set broadcast, or a list of ``n``."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * n
    sampling_params = list(sampling_params)
    if len(sampling_params) != n:
        raise ValueError(f"sampling_params: got {len(sampling_params)} for {n} {what}")
    return sampling_params


def to_output(req, prompt: Prompt) -> RequestOutput:
    return RequestOutput(
        request_id=req.request_id, prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=req.prompt_token_ids, token_ids=list(req.output_token_ids), text=req.text,
        finish_reason=req.finish_reason, stop_reason=req.stop_reason, logprobs=req.logprobs,
        num_cached_tokens=max(req.num_cached_tokens, 0))
