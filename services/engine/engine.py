"""The synchronous engine core: admission, one scheduling step at a time, output processing.

``LLMEngine.step()`` runs one scheduler step and returns a ``TokenChunk`` for every request
that produced output (or finished) in that step. It is not thread-safe: the offline
``LLM`` drives it directly and ``AsyncEngine`` from its own engine thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.engine.assembly import assemble
from services.engine.config import EngineConfig
from services.engine.kv_cache import block_hash_chain
from services.engine.model.experts import ExpertLayerStats, expert_stats
from services.engine.outputs import TokenChunk
from services.engine.plugins import HostDeps
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.engine.spec_decode.base import RemoteProposerStats
from services.engine.spec_decode.policy import Ask, DraftOutcome, StepCost
from services.engine.tokenizer import Detokenizer


@dataclass
class EngineStats:
    """Counters since start (monotonic) and gauges (now)."""

    num_prompt_tokens_computed: int = 0  # prompt/recompute tokens run through the model
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests
    num_cached_prompt_tokens: int = 0  # of those, served from the local prefix cache
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    # speculative decoding, vLLM's meanings (tandem_spec_decode_*_total)
    spec_num_drafts: int = 0  # drafts verified (one per request and step with a draft)
    spec_num_draft_tokens: int = 0  # draft tokens verified
    spec_num_accepted_tokens: int = 0  # of those, accepted (bonus and correction tokens not counted)
    spec_num_accepted_per_pos: list[int] = field(default_factory=list)  # accepted drafts by position 0..k-1
    spec_remote: RemoteProposerStats | None = None  # a DraftWorker proposer's calls (None: drafts in this process)
    # MoE expert backends that keep counters (offload): one per MoE layer (tandem_expert_*)
    experts: list[ExpertLayerStats] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig, deps: HostDeps | None = None):
        self.config = config
        parts = assemble(config, deps or HostDeps(), before_free=self._before_free)
        self.device, self.dtype = parts.device, parts.dtype
        self.model, self.cpu_backend, self.model_config = parts.model, parts.cpu_backend, parts.model.config
        self.tokenizer, self.fingerprint, self.max_model_len = parts.tokenizer, parts.fingerprint, parts.max_model_len
        self.kv, self.scheduler, self.runner, self.proposer = parts.kv, parts.scheduler, parts.runner, parts.proposer
        self.policy = parts.policy
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.stats = EngineStats(kv_blocks_total=self.kv.pool.num_blocks)
        self._ids = itertools.count()
        self._finish_hooks: list[Callable[[Request, str], None]] = []
        if self.proposer is not None:
            self.stats.spec_num_accepted_per_pos = [0] * self.proposer.num_speculative_tokens
            self._finish_hooks.append(lambda req, reason: self.proposer.release(req.request_id))
            self._finish_hooks.append(lambda req, reason: self.policy.release(req.request_id))

    def add_finish_hook(self, hook: Callable[[Request, str], None]) -> None:
        """Call ``hook(req, reason)`` whenever a request finishes (stop, length, abort), in the
        thread that steps the engine, while its blocks are still held (their KV can be read)."""
        self._finish_hooks.append(hook)

    def _before_free(self, req: Request, reason: str) -> None:
        for hook in self._finish_hooks:
            hook(req, reason)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    arrival_time: float | None = None, resume_token_ids: list[int] | None = None) -> Request:
        """Validate and queue a request. ValueError names the bad field; overload raises
        ``EngineOverloadedError``.

        ``resume_token_ids``: output tokens the request already produced elsewhere and sent to its
        client (a request migrated from a replica that died). They are recomputed with the prompt
        (as after a preemption; the prefix cache applies), count against ``max_tokens``, and the
        output continues after them: the next chunk's text starts where the text already sent
        ends, and a seeded request samples from position ``len(resume_token_ids)`` on."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id: must be a non-empty string")
        if self.has_request(request_id):
            raise ValueError(f"request_id: {request_id!r} is already in use")
        token_ids = self._prompt_ids(prompt)
        self.check_lengths(len(token_ids), params)
        req = Request(request_id, token_ids, params, priority=priority,
                      arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.logprobs is not None:
            req.logprobs = []
        if resume_token_ids:
            self._resume(req, resume_token_ids)
        self.scheduler.add(req)
        return req

    def _resume(self, req: Request, token_ids: list[int]) -> None:
        """Put ``token_ids`` in as ``req``'s output so far, with the detokenizer state and the sent
        text length the original engine had after them (the detokenizer replayed token by token)."""
        p = req.params
        if not isinstance(token_ids, (list, tuple)) or not all(_is_token(t, self.model_config.vocab_size)
                                                               for t in token_ids):
            raise ValueError("resume_token_ids: must be token ids inside the vocabulary")
        if len(token_ids) >= p.max_tokens or req.num_prompt_tokens + len(token_ids) >= self.max_model_len:
            raise ValueError(f"resume_token_ids: {len(token_ids)} tokens leave nothing to generate")
        for t in token_ids:
            req.output_token_ids.append(t)
            self.detokenizer.step(req)
        if req.logprobs is not None:
            req.logprobs = [None] * len(token_ids)  # sent with the tokens by the engine that sampled them
        req.sent_text_len = max(len(req.text) - max(p.max_stop_len - 1, 0), 0)  # as _chunk held back

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError("prompt: tokenizes to zero tokens")
            return ids
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt_token_ids: must be a list of integers")
        if not prompt:
            raise ValueError("prompt_token_ids: must not be empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def check_lengths(self, num_prompt: int, params: SamplingParams) -> None:
        """ValueError naming the field when a prompt of ``num_prompt`` tokens with ``params``
        cannot be served here (context length, KV pool size, stop token ids)."""
        if num_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context length of {self.max_model_len} tokens")
        need = self.kv.blocks_needed(num_prompt + params.max_tokens)
        if need > self.kv.pool.num_blocks:
            raise ValueError(
                f"max_tokens: prompt + max_tokens needs {need} KV blocks but the cache holds only "
                f"{self.kv.pool.num_blocks}")
        bad = next((t for t in params.stop_token_ids if t >= self.model_config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: token id {bad} is outside the vocabulary")

    def abort(self, request_id: str) -> TokenChunk | None:
        """Finish a request now and free all its blocks; returns its last chunk (None if unknown)."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish(req, "abort")
        return self._chunk(req, [], None, flush=True)

    def has_request(self, request_id: str) -> bool:
        """True while ``request_id`` is queued or running here."""
        return request_id in self.scheduler.requests

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- external prefix tier (e.g. the Redis prefix store) ------------------------------
    def prompt_block_hashes(self, token_ids: list[int]) -> list[bytes]:
        """Hash chain of the prompt's full blocks (``len(token_ids) // block_size`` hashes)."""
        return block_hash_chain(self.kv.seed, token_ids, self.kv.block_size)

    def max_prefix_blocks(self, num_prompt_tokens: int) -> int:
        """Blocks a prefix match may cover: one token is always left to compute."""
        return (num_prompt_tokens - 1) // self.kv.block_size if self.kv.enable_prefix_caching else 0

    def pin_cached_prefix(self, request_id: str, hashes: list[bytes]) -> int:
        """Pin the leading locally cached blocks of ``hashes`` for a request about to be added;
        returns their number. The pins go when the request is admitted, freed, or
        ``release_prefix_pins`` is called."""
        return self.kv.pin_cached_prefix(request_id, hashes) if self.kv.enable_prefix_caching else 0

    def import_prefix_blocks(self, request_id: str, hashes: list[bytes], kv: torch.Tensor,
                             num_prompt_tokens: int) -> int:
        """Put KV loaded from elsewhere into the pool as cached blocks, pinned for ``request_id``.

        ``hashes`` continue the request's locally pinned prefix; ``kv`` is
        ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]`` (K then V), block i under
        ``hashes[i]``. Imports nothing (returns 0) when the free blocks could not also hold the
        rest of the prompt. The normal prefix match then finds the blocks at admission.
        """
        n = min(len(hashes), kv.shape[2])
        need = self.kv.blocks_needed(num_prompt_tokens) - self.kv.num_pinned(request_id)
        if n == 0 or not self.kv.enable_prefix_caching or need > self.kv.num_free_blocks:
            return 0
        blocks = self.kv.import_blocks(request_id, hashes[:n])
        if blocks:  # the leading hashes another request imported meanwhile are only pinned
            self.runner.write_kv(blocks, kv[:, :, n - len(blocks):n])
        return n

    def release_prefix_pins(self, request_id: str) -> None:
        """Drop the pins of a request that will not be added after all."""
        self.kv.unpin(request_id)

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of blocks ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]`` (transfer layout)."""
        return self.runner.read_kv(block_ids)

    def kv_block_shape(self) -> tuple[str, tuple[int, ...]]:
        """(dtype name, shape of one block ``[num_layers, 2, block_size, num_kv_heads, head_dim]``)."""
        mc = self.model_config
        shape = (mc.num_layers, 2, self.kv.block_size, mc.num_kv_heads, mc.head_dim)
        return str(self.runner.kv_caches[0].dtype).removeprefix("torch."), shape

    # ---- requests prefilled elsewhere (P/D hand-off) -------------------------------------
    def request_block_ids(self, request_id: str) -> list[int]:
        """The block table of a request in the engine (empty when it holds none)."""
        return list(self.kv.block_tables.get(request_id, []))

    def check_adoptable(self, num_prompt: int, params: SamplingParams, kv_shape: tuple[int, ...],
                        kv_block_size: int, kv_num_tokens: int) -> None:
        """ValueError unless a prompt KV of ``kv_shape`` (transfer layout, see ``read_kv_blocks``)
        covering ``kv_num_tokens`` tokens can continue here as a request of ``num_prompt`` tokens."""
        if kv_num_tokens != num_prompt or kv_block_size != self.kv.block_size:
            raise ValueError(f"kv: covers {kv_num_tokens} tokens in blocks of {kv_block_size}; expected "
                             f"{num_prompt} tokens in blocks of {self.kv.block_size}")
        if kv_shape[2] != self.kv.blocks_needed(num_prompt) or kv_shape[0] != self.runner.num_layers:
            raise ValueError(f"kv: shape {tuple(kv_shape)} does not fit this engine")
        self.check_lengths(num_prompt, params)

    def adopt_request(self, req: Request, kv: torch.Tensor) -> bool:
        """Put ``req`` (prompt computed elsewhere, its output so far in ``output_token_ids``)
        straight into the running batch with its prompt KV ``kv`` copied into fresh blocks, so the
        next step decodes it; nothing is recomputed. False when the pool lacks free blocks now."""
        if self.has_request(req.request_id):
            raise ValueError(f"request_id: {req.request_id!r} is already in use")
        num_prompt = req.num_prompt_tokens
        if not self.kv.allocate(req, num_prompt):
            return False
        self.runner.write_kv(self.kv.block_tables[req.request_id], kv)
        req.num_computed_tokens = num_prompt
        self.kv.cache_full_blocks(req, num_prompt)
        self.scheduler.add_running(req)
        return True

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[TokenChunk]:
        """Schedule and run one batch; return the output of every request that made progress."""
        t0 = time.perf_counter()
        if self.proposer is not None:
            self._propose()
        t1 = time.perf_counter()
        out = self.scheduler.schedule()
        self.stats.num_preemptions += len(out.preempted_request_ids)
        if out.is_empty:
            return []
        for rid in out.new_request_ids:
            req = self.scheduler.requests[rid]
            if req.num_preemptions == 0:
                self.stats.num_prompt_tokens += req.num_prompt_tokens
                self.stats.num_cached_prompt_tokens += out.num_cached_tokens[rid]
        requests = self.scheduler.requests
        drafts = out.scheduled_spec_decode_tokens
        result = self.runner.execute(out.num_scheduled_tokens, requests, drafts)
        self.scheduler.update_after_step(out, {rid: len(d) - result.num_accepted[rid] for rid, d in drafts.items()})
        if self.policy is not None:
            self._observe_step(out, result, t1 - t0, time.perf_counter() - t1)
        self._count_drafts(drafts, result.num_accepted, requests)
        self.stats.num_prompt_tokens_computed += result.num_prompt_tokens_computed
        self.stats.num_steps += 1
        chunks = []
        for i, rid in enumerate(result.request_ids):
            chunks.append(self._append_tokens(requests[rid], result.token_ids[i], result.logprobs[i]))
        emitted_at = time.time()  # the step's output is ready (wall clock: compared in other processes)
        for c in chunks:
            c.emitted_at = emitted_at
        return chunks

    def _propose(self) -> None:
        """Ask the proposer for the next step's drafts of the running requests in decode state
        that speculate, each as long as the policy chose (spec_decode/policy.py) and at most as
        long as its remaining max_tokens / context allow. A seeded sampled request always gets
        its whole limit: its tokens must not depend on the timings the policy measures."""
        k = self.proposer.num_speculative_tokens
        asks, reqs, num_decodes = [], [], 0
        for req in self.scheduler.running:
            req.spec_token_ids, req.spec_probs = [], None
            if req.num_tokens - req.num_computed_tokens != 1:
                continue
            num_decodes += 1
            # the step emits up to limit + 1 tokens: no more than max_tokens or the context allow
            limit = min(k, req.params.max_tokens - len(req.output_token_ids) - 1,
                        self.max_model_len - req.num_tokens - 1)
            if limit > 0 and req.params.speculative:
                reqs.append(req)
                asks.append(Ask(req.request_id, limit, fixed=req.generator is not None and not req.params.greedy))
        chosen = [(req, n) for req, n in zip(reqs, self.policy.plan(asks, num_decodes)) if n]
        if not chosen:
            return
        for (req, n), draft in zip(chosen, self.proposer.propose([r for r, _ in chosen], [n for _, n in chosen])):
            req.spec_token_ids = list(draft.token_ids[:n])
            req.spec_probs = draft.probs

    def _observe_step(self, out, result, propose_s: float, step_s: float) -> None:
        """Tell the policy what the step cost and what became of the drafts it asked for."""
        drafts = out.scheduled_spec_decode_tokens
        asked = {rid: n for rid, n in self.policy.last_asked.items() if rid in out.num_scheduled_tokens}
        outcomes = tuple(DraftOutcome(rid, n, len(drafts.get(rid, ())), result.num_accepted.get(rid, 0))
                         for rid, n in asked.items())
        num_draft_rows = sum(len(d) for d in drafts.values())
        self.policy.observe(StepCost(result.num_decode_tokens - num_draft_rows, num_draft_rows,
                                     result.num_prompt_tokens_computed, step_s, propose_s,
                                     sum(self.policy.last_asked.values()), outcomes))

    def _count_drafts(self, drafts: dict[str, list[int]], accepted: dict[str, int],
                      requests: dict[str, Request]) -> None:
        s = self.stats
        for rid, draft in drafts.items():
            req = requests[rid]
            req.num_drafts += 1
            req.num_draft_tokens += len(draft)
            req.num_accepted_draft_tokens += accepted[rid]
            s.spec_num_drafts += 1
            s.spec_num_draft_tokens += len(draft)
            s.spec_num_accepted_tokens += accepted[rid]
            for pos in range(accepted[rid]):
                s.spec_num_accepted_per_pos[pos] += 1

    def _append_tokens(self, req: Request, tokens: list[int], logprobs: list | None) -> TokenChunk:
        """Append a step's new tokens one by one, with the stop checks decoding without
        speculation makes after each; tokens after the one that finishes the request are
        dropped. Returns one chunk for all of them."""
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        reason, kept = None, 0
        for j, token in enumerate(tokens):
            req.output_token_ids.append(token)
            if req.logprobs is not None:
                req.logprobs.append(logprobs[j] if logprobs is not None else None)
            self.stats.num_generated_tokens += 1
            kept += 1
            delta = self.detokenizer.step(req)
            reason = self._stop_reason(req, token, len(delta))
            if reason is not None:
                break
        req.spec_token_ids, req.spec_probs = [], None
        if len(tokens) > 1:  # accepted drafts are computed: publish the blocks they filled
            self.kv.cache_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))
        if reason is not None:
            if not (reason == "stop" and isinstance(req.stop_reason, str)):
                self.detokenizer.flush(req)
            self.scheduler.finish(req, reason)
        return self._chunk(req, tokens[:kept], None if logprobs is None else logprobs[:kept], flush=reason is not None)

    def _stop_reason(self, req: Request, token: int, delta_len: int) -> str | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            req.stop_reason = token
            return "stop"
        if p.stop:
            start = max(0, len(req.text) - delta_len - p.max_stop_len + 1)
            hits = [(req.text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                req.text = req.text[:i]
                req.stop_reason = s
                return "stop"
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _chunk(self, req: Request, tokens: list[int], logprobs, flush: bool) -> TokenChunk:
        hold = 0 if flush else max(req.params.max_stop_len - 1, 0)
        upto = max(req.sent_text_len, len(req.text) - hold)
        text = req.text[req.sent_text_len:upto]
        req.sent_text_len = upto
        return TokenChunk(request_id=req.request_id, token_ids=tokens, text=text, logprobs=logprobs,
                          finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                          num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=max(req.num_cached_tokens, 0),
                          num_output_tokens=len(req.output_token_ids), queue_time_s=req.queue_time,
                          num_imported_cached_tokens=req.num_imported_cached_tokens, num_drafts=req.num_drafts,
                          num_draft_tokens=req.num_draft_tokens,
                          num_accepted_draft_tokens=req.num_accepted_draft_tokens)

    def snapshot_stats(self) -> EngineStats:
        s = self.stats
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_blocks_free = self.kv.num_free_blocks
        return EngineStats(**{**vars(s), "spec_num_accepted_per_pos": list(s.spec_num_accepted_per_pos),
                              "experts": expert_stats(self.model),
                              "spec_remote": self.proposer.remote_stats() if self.proposer is not None else None})

    def cached_block_hashes(self, limit: int) -> list[bytes]:
        """Hashes of the newest ``limit`` full blocks in the local prefix cache, oldest first
        (the order they were cached in). Not thread-safe: call under the step lock."""
        if limit <= 0:
            return []
        newest = list(itertools.islice(reversed(self.kv.pool.cached), limit))
        newest.reverse()
        return newest


def _is_token(t, vocab_size: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
