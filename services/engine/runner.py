"""Model runner: turns a ``SchedulerOutput`` into one forward pass and sampled tokens.

The batch is flattened (no padding): rows of decode requests first (one token each),
then the prompt chunks. Per-step metadata is built once and passed to every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.engine.kv_cache import KVCacheManager
from services.engine.malloc import huge_page_empty
from services.engine.model.attention import (AttentionMetadata, PrefillSlice, causal_mask, decode_mask,
                                             kv_cache_shape, read_blocks, write_blocks)
from services.engine.request import Request
from services.engine.sampler import SampleResult, Sampler


@dataclass
class StepResult:
    """Sampled tokens of the requests that reached the end of their known tokens this step."""

    request_ids: list[str]  # requests that produced a token, in sampling-row order
    sample: SampleResult  # one row per request id
    num_prompt_tokens_computed: int  # prompt (or recomputed) tokens run through the model
    num_decode_tokens: int  # decode rows in the batch


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
    def execute(self, schedule: dict[str, int], requests: dict[str, Request]) -> StepResult:
        """Run ``{request_id: num_tokens}`` and sample for requests whose tokens are all computed."""
        decodes = [rid for rid, n in schedule.items() if n == 1 and requests[rid].num_computed_tokens > 0]
        decode_set = set(decodes)
        prefills = [rid for rid in schedule if rid not in decode_set]
        order = decodes + prefills
        ids, pos, slots, sample_rows, sample_ids = [], [], [], [], []
        row = 0
        for rid in order:
            req, n = requests[rid], schedule[rid]
            start = req.num_computed_tokens
            ids.extend(req.token_at(start, start + n))
            pos.append(np.arange(start, start + n))
            slots.append(self._slots(self.kv.block_tables[rid], start, start + n))
            row += n
            if start + n == req.num_tokens:
                sample_rows.append(row - 1)
                sample_ids.append(rid)
        meta = self._metadata(decodes, prefills, schedule, requests, np.concatenate(slots))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.from_numpy(np.concatenate(pos)).to(self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if sample_rows:
            if len(sample_rows) < hidden.shape[0]:  # else every row, in order (rows are increasing)
                hidden = hidden[torch.tensor(sample_rows, device=self.device)]
            logits = self.model.compute_logits(hidden)
            sample = self.sampler(logits, [requests[r].params for r in sample_ids],
                                  [requests[r].sampling_generator() for r in sample_ids])
        else:
            sample = SampleResult([], [])
        computed = sum(schedule[r] for r in prefills)
        return StepResult(sample_ids, sample, computed, len(decodes))

    def _slots(self, table: list[int], start: int, end: int) -> np.ndarray:
        p = np.arange(start, end)
        return np.asarray(table, dtype=np.int64)[p // self.block_size] * self.block_size + p % self.block_size

    def _metadata(self, decodes, prefills, schedule, requests, slots: np.ndarray) -> AttentionMetadata:
        bs, dev = self.block_size, self.device
        tables = self.kv.block_tables
        if decodes:
            seq_lens = [requests[r].num_computed_tokens + 1 for r in decodes]
            width = -(-max(seq_lens) // bs)
            bt = np.zeros((len(decodes), width), dtype=np.int64)
            for i, r in enumerate(decodes):
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
        slices, row = [], len(decodes)
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
            num_decodes=len(decodes), decode_block_tables=dec_tables, decode_mask=dec_mask, decode_seq_lens=dec_lens,
            prefills=tuple(slices))
