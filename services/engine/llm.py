"""Offline API: ``LLM(model=path).generate(prompts, sampling_params)``."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig, parse_dtype
from services.engine.engine import LLMEngine
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams

Prompt = str | list[int]


def build_engine_config(model: str, *, device: str | None = None, dtype=None, max_model_len: int | None = None,
                        seed: int = 0, block_size: int = 16, num_kv_blocks: int | None = None,
                        kv_cache_memory_gb: float = 2.0, enable_prefix_caching: bool = True,
                        max_num_batched_tokens: int = 2048, max_num_seqs: int = 128,
                        max_waiting_requests: int = 4096, max_waiting_tokens: int = 1 << 22,
                        enable_chunked_prefill: bool = True) -> EngineConfig:
    """Validate keyword options (vLLM-style names) into the per-concern frozen configs."""
    if device is None:
        device, _ = EngineConfig.default_device()
    cache = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                        memory_bytes=int(kv_cache_memory_gb * (1 << 30)),
                        enable_prefix_caching=enable_prefix_caching)
    sched = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                            max_waiting_requests=max_waiting_requests, max_waiting_tokens=max_waiting_tokens,
                            enable_chunked_prefill=enable_chunked_prefill)
    return EngineConfig(model=str(model), device=device, dtype=parse_dtype(dtype, device),
                        max_model_len=max_model_len, seed=seed, cache=cache, scheduler=sched)


class LLM:
    """Runs the engine in this process until every prompt is finished."""

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
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(sampling_params)} for {len(prompts)} prompts")
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


def to_output(req, prompt: Prompt) -> RequestOutput:
    return RequestOutput(
        request_id=req.request_id, prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=req.prompt_token_ids, token_ids=list(req.output_token_ids), text=req.text,
        finish_reason=req.finish_reason, stop_reason=req.stop_reason, logprobs=req.logprobs,
        num_cached_tokens=max(req.num_cached_tokens, 0))
