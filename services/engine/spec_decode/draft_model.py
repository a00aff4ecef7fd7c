"""``draft_model``: a small model with the target's tokenizer proposes k tokens autoregressively.

It runs in the engine's process, on the target's device and dtype, with its own paged KV
cache (its own ``KVCacheManager`` and ``ModelRunner``, with prefix reuse of the target's
verified tokens across requests). Each request has a shadow
``Request`` here whose tokens are the target request's tokens plus the last draft; at every
``propose`` the shadow is reconciled with the target: the KV of draft tokens the target did
not keep is rolled back (``KVCacheManager.rollback``), the tokens the draft has not seen are
run as one chunk, then k - 1 single-token steps follow, batched over the requests.

With ``deployment: NAME`` the same draft runs in a ``DraftWorker`` Serve deployment instead,
shared by many engines (services/draft_worker.py, which runs ``DraftModelProposer`` itself):
the host process injects the proposer that calls it (``HostDeps.proposers[NAME]``), since the
engine imports no ray.

Greedy requests get the draft's argmax (q one-hot); sampled requests draw each draft token from
the draft's distribution filtered by the request's own parameters, and that q goes to the
verifier. When the draft's pool is full the drafts of requests not in this call are dropped
first; a request that still does not fit gets no draft this step (never an error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.engine.config_parse import ConfigError
from services.engine.checkpoint import checkpoint_fingerprint
from services.engine.kv_cache import KVCacheManager, hash_seed
from services.engine.model.cpu_backend import use_cpu_backend
from services.engine.model.registry import load_model
from services.engine.model_catalog import NAMED_MODELS, resolve_model
from services.engine.plugins import HostDeps
from services.engine.request import Request
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler, argmax_rows, filtered_probs
from services.engine.spec_decode import PROPOSERS
from services.engine.spec_decode.base import NO_DRAFT, Draft, Proposer, SpeculativeOptions, TargetInfo
from services.engine.spec_decode.vocab_check import Vocabulary, check_same_vocabulary
from services.engine.tokenizer import Tokenizer

TRANSPORTS = ("direct", "handle")  # DraftModelOptions.deployment_transport


@dataclass(frozen=True)
class DraftModelOptions(SpeculativeOptions):
    """``speculative: {method: draft_model, model: PATH, ...}`` (and ``adaptive``, SpeculativeOptions)."""

    model: str = ""  # the draft's checkpoint folder or .gguf file (or a model name: smollm2, embedded)
    num_speculative_tokens: int = 3  # k: tokens proposed per step at most
    num_kv_blocks: int | None = None  # the draft's KV pool in blocks; None = as many as the target's
    # the draft hosted in a DraftWorker deployment of this name ("" = in this process)
    deployment: str = ""
    deployment_timeout_s: float = 0.1  # per engine step: a slower (or dead) DraftWorker = no draft that step
    deployment_retry_s: float = 1.0  # after a failed call, steps run without asking it for this long
    # how the calls travel: "direct" = plain Ray actor calls to the replica that holds this engine's
    # sequences (found through the Serve handle, which is used again whenever that replica fails);
    # "handle" = every call through the Serve handle (measured 2026-12-03: ~3-6 ms more per call)
    deployment_transport: str = "direct"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model", "the draft model's path is required")
        if not isinstance(self.deployment, str) or (self.deployment and not self.deployment.isidentifier()):
            raise ConfigError("deployment", f"must be a deployment name (letters, digits, _), got {self.deployment!r}")
        for name in ("deployment_timeout_s", "deployment_retry_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 60:
                raise ConfigError(name, f"must be a number of seconds in (0, 60], got {value!r}")
        if self.deployment_transport not in TRANSPORTS:
            raise ConfigError("deployment_transport", f"must be one of {list(TRANSPORTS)}, got "
                                                      f"{self.deployment_transport!r}")
        if self.num_speculative_tokens < 1:
            raise ConfigError("num_speculative_tokens", f"must be >= 1, got {self.num_speculative_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks", f"must be >= 1, got {self.num_kv_blocks}")


def check_draft_vocabulary(draft: Tokenizer, draft_vocab_size: int, target: TargetInfo) -> None:
    """ValueError saying how the draft's vocabulary differs from the target's (size, first
    differing ids, tokens mapped elsewhere, special tokens), if it does (vocab_check.py)."""
    check_same_vocabulary(Vocabulary.of(draft, draft_vocab_size),
                          Vocabulary.of(target.tokenizer, target.model_config.vocab_size))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DraftModelProposer(Proposer):
    def __init__(self, options: DraftModelOptions, target: TargetInfo):
        path = resolve_model(options.model) if options.model in NAMED_MODELS else options.model
        self.num_speculative_tokens = options.num_speculative_tokens
        self.model = load_model(path, device=target.device, dtype=target.dtype)
        check_draft_vocabulary(Tokenizer(path), self.model.config.vocab_size, target)
        use_cpu_backend(self.model)
        num_blocks = options.num_kv_blocks or target.num_kv_blocks
        seed = hash_seed(checkpoint_fingerprint(path), str(target.dtype).removeprefix("torch."), target.block_size)
        self.kv = KVCacheManager(num_blocks, target.block_size, seed)  # prefix reuse across requests
        self.generator = torch.Generator(device=target.device).manual_seed(target.seed + 1)
        self.runner = ModelRunner(self.model, self.kv, num_blocks, target.device, target.dtype, Sampler(self.generator))
        self.max_len = min(target.max_model_len, self.model.config.max_position_embeddings)
        self.shadows: dict[str, Request] = {}  # request id -> the draft's view of it
        self.known: dict[str, int] = {}  # request id -> target tokens the shadow had at the last propose

    def release(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        self.known.pop(request_id, None)
        if shadow is not None:
            self.kv.free(shadow)

    @torch.inference_mode()
    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> list[Draft]:
        keep = {r.request_id for r in requests}
        shadows = [self._sync(r, k) for r, k in zip(requests, max_tokens)]
        steps = {r.request_id: k for r, k, s in zip(requests, max_tokens, shadows) if s is not None}
        tokens: dict[str, list[int]] = {rid: [] for rid in steps}
        probs: dict[str, list[torch.Tensor]] = {rid: [] for rid in steps}
        by_id = {r.request_id: r for r in requests}
        while steps:
            schedule = {rid: self._reserve(self.shadows[rid], keep) for rid in steps}
            schedule = {rid: n for rid, n in schedule.items() if n}
            if not schedule:
                break
            batch = self.runner.prepare(schedule, self.shadows, {})
            logits = self.runner.logits(batch)
            for rid, n in schedule.items():
                shadow = self.shadows[rid]
                shadow.num_computed_tokens += n
                # only the target's own tokens are published: blocks holding drafts may roll back
                self.kv.cache_full_blocks(shadow, min(shadow.num_computed_tokens, self.known[rid]))
            self._choose(batch.sample_ids, logits, by_id, tokens, probs)
            steps = {rid: k for rid, k in steps.items() if rid in schedule and len(tokens[rid]) < k}
        return [self._draft(r.request_id, tokens, probs) for r in requests]

    def _sync(self, req: Request, k: int) -> Request | None:
        """The request's shadow, its tokens now the target's, its KV kept only where it was
        computed from the same tokens; None when the draft cannot propose for it."""
        if req.num_tokens + k > self.max_len:
            return None
        rid = req.request_id
        shadow = self.shadows.get(rid)
        if shadow is None:
            shadow = self.shadows[rid] = Request(rid, req.prompt_token_ids, req.params)
            self.known[rid] = 0
        else:  # tokens before known[rid] are the target's, then the last draft: keep what matches
            known = self.known[rid]
            same = known + common_prefix(shadow.token_at(known, shadow.num_tokens), req.token_at(known, req.num_tokens))
            keep = min(same, req.num_tokens - 1)  # at least the last token runs: its logits give d_1
            if shadow.num_computed_tokens > keep:
                shadow.num_computed_tokens = keep
                self.kv.rollback(shadow, keep)
        shadow.output_token_ids = list(req.output_token_ids)
        shadow.generator = req.generator
        self.known[rid] = req.num_tokens
        return shadow

    def _reserve(self, shadow: Request, keep: set[str]) -> int:
        """Reserve slots for the shadow's tokens not computed yet (a new shadow starts from its
        longest cached prefix); returns how many to run, 0 when there is no room even after
        freeing the shadows of requests not in ``keep``."""
        fresh = shadow.num_computed_tokens == 0 and shadow.request_id not in self.kv.block_tables
        cached = self.kv.find_cached_prefix(shadow) if fresh else []
        n = shadow.num_tokens - shadow.num_computed_tokens - len(cached) * self.kv.block_size
        if not self.kv.allocate(shadow, n, cached):
            for rid in [r for r in self.shadows if r not in keep]:
                self.release(rid)
            if not self.kv.allocate(shadow, n, cached):
                return 0
        shadow.num_computed_tokens += len(cached) * self.kv.block_size
        return n

    def _choose(self, ids: list[str], logits: torch.Tensor, by_id: dict[str, Request],
                tokens: dict[str, list[int]], probs: dict[str, list[torch.Tensor]]) -> None:
        """The next draft token of every request in ``ids`` (one logits row each), appended to
        its shadow; sampled requests keep the row's q (filtered by their own parameters)."""
        reqs = [by_id[rid] for rid in ids]
        picks = [0] * len(ids)
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
        if greedy:
            best = argmax_rows(logits[greedy] if len(greedy) < len(ids) else logits).tolist()
            for j, i in enumerate(greedy):
                picks[i] = best[j]
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            q = filtered_probs(logits[sampled], [reqs[i].params for i in sampled])  # [S, V]
            common = [j for j, i in enumerate(sampled) if reqs[i].generator is None]
            if common:
                drawn = torch.multinomial(q[common], 1, generator=self.generator)[:, 0].tolist()
                for j, t in zip(common, drawn):
                    picks[sampled[j]] = t
            for j, i in enumerate(sampled):
                if reqs[i].generator is not None:
                    picks[i] = int(torch.multinomial(q[j], 1, generator=reqs[i].generator)[0])
                probs[ids[i]].append(q[j])
        for i, rid in enumerate(ids):
            tokens[rid].append(picks[i])
            self.shadows[rid].output_token_ids.append(picks[i])

    def _draft(self, rid: str, tokens: dict[str, list[int]], probs: dict[str, list[torch.Tensor]]) -> Draft:
        if not tokens.get(rid):
            return NO_DRAFT
        q = probs[rid]
        return Draft(tokens[rid], torch.stack(q) if q else None)


@PROPOSERS.register("draft_model", options=DraftModelOptions)
def draft_model(options: DraftModelOptions, deps: HostDeps):
    if not options.deployment:
        return lambda target: DraftModelProposer(options, target)
    remote = deps.proposers.get(options.deployment)
    if remote is None:
        raise ValueError(f"speculative.deployment: no deployment {options.deployment!r} is wired to this engine "
                         f"(the Serve app builds it; in-process engines use the draft without deployment)")
    return lambda target: remote(options, target)
