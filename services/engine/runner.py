"""Model runner: turns a ``SchedulerOutput`` into one forward pass and sampled tokens.

The batch is flattened (no padding): rows of decode requests first (one token each, or
1 + k for a request verifying a k-token draft), then the prompt chunks. Per-step metadata is
built once and passed to every layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from services.engine.kv_cache import KVCacheManager
from services.engine.malloc import huge_page_empty
from services.engine.model.attention import (AttentionMetadata, PrefillSlice, causal_mask, decode_mask,
                                             kv_cache_shape, read_blocks, write_blocks)
from services.engine.request import Request
from services.engine.sampler import Sampler
from services.engine.spec_decode.rejection import verify


@dataclass
class StepResult:
    """New tokens of the requests that reached the end of their known tokens this step."""

    request_ids: list[str]  # requests that produced tokens, in sampling-row order
    token_ids: list[list[int]]  # per request: one sampled token, or accepted drafts + one (speculation)
    logprobs: list[list[dict[int, float]] | None]  # per request, one entry per new token; None if not asked
    num_prompt_tokens_computed: int  # prompt (or recomputed) tokens run through the model
    num_decode_tokens: int  # decode rows in the batch (verified drafts included)
    num_accepted: dict[str, int] = field(default_factory=dict)  # drafts accepted, per request that verified one


@dataclass(frozen=True)
class Batch:
    """The flat token batch of one step and where its sampled rows are."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata  # shared by every layer
    sample_rows: list[int]  # rows whose logits are sampled, increasing
    sample_ids: list[str]  # request of each run of sample rows, in order
    sample_counts: list[int]  # rows per sampled request (1, or 1 + k with a draft)
    num_prefill_tokens: int  # rows of prompt chunks
    num_decode_rows: int  # rows of decodes (each draft token is one)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def kv_cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One layer's zeroed KV cache; on CPU on 2 MiB pages (malloc.huge_page_empty): a decode step
    reads every sequence's blocks from all over the pool, and on 4 KiB pages each block is a TLB
    miss. Measured, decode attention of 32 sequences of 150-200 tokens over SmolLM2's 30 layers
    (9 / 3 heads, head_dim 64, 1,024-block pools; /tmp/p15/att.py, AMD EPYC Zen 4, 2 cores, quiet,
    2026-12-03 01:11 UTC, best of 15, two alternating pairs): 24.9 / 24.7 ms -> 22.0 / 21.8 ms."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return huge_page_empty(shape, dtype).zero_()


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: KVCacheManager, num_blocks: int,
                 device: torch.device, dtype: torch.dtype, sampler: Sampler):
        cfg = model.config
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        self.sliding_window = cfg.sliding_window
        self.num_kv_heads = cfg.num_kv_heads
        self.sampler = sampler
        shape = kv_cache_shape(num_blocks, kv.block_size, cfg.num_kv_heads, cfg.head_dim)
        # zeros, not empty: masked decode reads padding blocks, which must hold finite values
        self.kv_caches = [kv_cache_zeros(shape, dtype, device) for _ in range(cfg.num_layers)]
        self.mask_dtype = dtype
        # the CPU kernels' decode attention reads seq_lens, not the additive mask (use_cpu_kernels)
        self.decode_mask_needed = getattr(model, "decode_mask_needed", True)

    @property
    def num_layers(self) -> int:
        return len(self.kv_caches)

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of blocks ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]`` (transfer layout)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return torch.stack([read_blocks(c, idx) for c in self.kv_caches])

    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Fill blocks ``block_ids`` from ``kv`` ``[num_layers, 2, n, block_size, num_kv_heads,
        head_dim]`` (n = len(block_ids); any device, converted to the cache's dtype)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        src = kv.to(self.device)
        for layer, cache in enumerate(self.kv_caches):
            write_blocks(cache, idx, src[layer])

    @torch.inference_mode()
    def execute(self, schedule: dict[str, int], requests: dict[str, Request],
                drafts: Mapping[str, list[int]] | None = None) -> StepResult:
        """Run ``{request_id: num_tokens}`` and sample for requests whose tokens are all computed.

        ``drafts[rid]``: k draft tokens of a decode-state request (``schedule[rid] == 1 + k``),
        verified by the rejection rule (services/engine/spec_decode/rejection.py) against the
        request's ``spec_probs``."""
        drafts = drafts or {}
        batch = self.prepare(schedule, requests, drafts)
        logits = self.logits(batch)
        if not drafts:
            return self._sample(batch, logits, requests)
        return self._verify(batch, logits, requests, drafts)

    def prepare(self, schedule: dict[str, int], requests: dict[str, Request],
                drafts: Mapping[str, list[int]]) -> Batch:
        """The step's flat batch. Decode rows come first: one per plain decode and ``1 + k`` per
        request with a draft (its last known token, then each draft token, at consecutive
        positions, every row a decode query with its own sequence length: the same attention
        path, and so the same numbers, as decoding those tokens one step at a time); then the
        prompt chunks."""
        decodes = [rid for rid, n in schedule.items()
                   if rid in drafts or (n == 1 and requests[rid].num_computed_tokens > 0)]
        decode_set = set(decodes)
        prefills = [rid for rid in schedule if rid not in decode_set]
        ids, pos, slots, sample_rows, sample_ids, counts, dec_rows = [], [], [], [], [], [], []
        row = 0
        for rid in decodes + prefills:
            req, n = requests[rid], schedule[rid]
            start = req.num_computed_tokens
            ids.extend(req.token_at(start, start + 1) + list(drafts[rid]) if rid in drafts else
                       req.token_at(start, start + n))
            pos.append(np.arange(start, start + n))
            slots.append(self._slots(self.kv.block_tables[rid], start, start + n))
            if rid in decode_set:
                dec_rows.extend((rid, start + j + 1) for j in range(n))
            if rid in drafts:
                sample_rows.extend(range(row, row + n))
                sample_ids.append(rid)
                counts.append(n)
            elif start + n == req.num_tokens:
                sample_rows.append(row + n - 1)
                sample_ids.append(rid)
                counts.append(1)
            row += n
        meta = self._metadata(dec_rows, prefills, schedule, requests, np.concatenate(slots))
        return Batch(torch.tensor(ids, dtype=torch.long, device=self.device),
                     torch.from_numpy(np.concatenate(pos)).to(self.device), meta, sample_rows, sample_ids, counts,
                     sum(schedule[r] for r in prefills), len(dec_rows))

    def logits(self, batch: Batch) -> torch.Tensor | None:
        """One forward pass -> logits [len(batch.sample_rows), V] float32 (None when none is sampled)."""
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        if not batch.sample_rows:
            return None
        if len(batch.sample_rows) < hidden.shape[0]:  # else every row, in order (rows are increasing)
            hidden = hidden[torch.tensor(batch.sample_rows, device=self.device)]
        return self.model.compute_logits(hidden)

    def _sample(self, batch: Batch, logits: torch.Tensor | None, requests: dict[str, Request]) -> StepResult:
        ids = batch.sample_ids
        if logits is None:
            return StepResult([], [], [], batch.num_prefill_tokens, batch.num_decode_rows)
        sample = self.sampler(logits, [requests[r].params for r in ids],
                              [requests[r].sampling_generator() for r in ids])
        lps = [None if lp is None else [lp] for lp in sample.logprobs]
        return StepResult(ids, [[t] for t in sample.token_ids], lps, batch.num_prefill_tokens, batch.num_decode_rows)

    def _verify(self, batch: Batch, logits: torch.Tensor, requests: dict[str, Request],
                drafts: Mapping[str, list[int]]) -> StepResult:
        """Plain rows through the sampler, drafted requests through the rejection rule."""
        starts = np.concatenate([[0], np.cumsum(batch.sample_counts)[:-1]]).tolist()
        plain = [i for i, rid in enumerate(batch.sample_ids) if rid not in drafts]
        spec = [i for i, rid in enumerate(batch.sample_ids) if rid in drafts]
        tokens: list[list[int]] = [[] for _ in batch.sample_ids]
        lps: list = [None] * len(batch.sample_ids)
        if plain:
            rows = torch.tensor([starts[i] for i in plain], device=logits.device)
            reqs = [requests[batch.sample_ids[i]] for i in plain]
            sample = self.sampler(logits[rows], [r.params for r in reqs], [r.sampling_generator() for r in reqs])
            for j, i in enumerate(plain):
                tokens[i] = [sample.token_ids[j]]
                lps[i] = None if sample.logprobs[j] is None else [sample.logprobs[j]]
        reqs = [requests[batch.sample_ids[i]] for i in spec]
        rows = torch.tensor([r for i in spec for r in range(starts[i], starts[i] + batch.sample_counts[i])],
                            device=logits.device)
        spec_logits = logits[rows]
        k = [batch.sample_counts[i] - 1 for i in spec]
        probs = [None if r.spec_probs is None else r.spec_probs[:n] for r, n in zip(reqs, k)]
        verified = verify(spec_logits, [drafts[r.request_id] for r in reqs], probs, [r.params for r in reqs],
                          [r.sampling_generator() for r in reqs], self.sampler.generator)
        accepted, row = {}, 0
        for i, req, v, n in zip(spec, reqs, verified, k):
            tokens[i] = v.token_ids
            accepted[req.request_id] = v.num_accepted
            if req.params.logprobs is not None:
                emitted = spec_logits[row:row + len(v.token_ids)]
                lps[i] = self.sampler.token_logprobs(emitted, [req.params] * len(v.token_ids), v.token_ids)
            row += n + 1
        return StepResult(batch.sample_ids, tokens, lps, batch.num_prefill_tokens, batch.num_decode_rows, accepted)

    def _slots(self, table: list[int], start: int, end: int) -> np.ndarray:
        p = np.arange(start, end)
        return np.asarray(table, dtype=np.int64)[p // self.block_size] * self.block_size + p % self.block_size

    def _metadata(self, decode_rows: list[tuple[str, int]], prefills, schedule, requests,
                  slots: np.ndarray) -> AttentionMetadata:
        """``decode_rows``: (request id, sequence length) of each decode query row, in row order."""
        bs, dev = self.block_size, self.device
        tables = self.kv.block_tables
        if decode_rows:
            seq_lens = [n for _, n in decode_rows]
            width = -(-max(seq_lens) // bs)
            bt = np.zeros((len(decode_rows), width), dtype=np.int64)
            for i, (r, _) in enumerate(decode_rows):
                t = tables[r][:width]
                bt[i, :len(t)] = t
            dec_tables = torch.from_numpy(bt).to(dev)
            dec_lens = torch.tensor(seq_lens, dtype=torch.long, device=dev)
            dec_mask = decode_mask(dec_lens, width * bs, self.sliding_window, self.mask_dtype,
                                   self.num_kv_heads) if self.decode_mask_needed else None
        else:
            dec_tables = torch.zeros((0, 1), dtype=torch.long, device=dev)
            dec_lens = torch.zeros(0, dtype=torch.long, device=dev)
            dec_mask = torch.zeros((0, 1, bs), dtype=self.mask_dtype, device=dev) if self.decode_mask_needed else None
        slices, row = [], len(decode_rows)
        for r in prefills:
            n = schedule[r]
            seq_len = requests[r].num_computed_tokens + n
            nblk = -(-seq_len // bs)
            slices.append(PrefillSlice(
                q_start=row, q_end=row + n, seq_len=seq_len,
                block_ids=torch.tensor(tables[r][:nblk], dtype=torch.long, device=dev),
                mask=causal_mask(n, seq_len, self.sliding_window, dev)))
            row += n
        return AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            num_decodes=len(decode_rows), decode_block_tables=dec_tables, decode_mask=dec_mask,
            decode_seq_lens=dec_lens, prefills=tuple(slices))
