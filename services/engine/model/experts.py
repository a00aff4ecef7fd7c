"""Mixture-of-Experts feed-forward: a router plus experts behind the ``ExpertBackend`` seam.

Glossary
- expert: one SwiGLU MLP ``down(silu(gate(x)) * up(x))`` with its own weights.
- router: a linear layer giving every token a logit per expert; softmax over experts, keep
  the top-k (``topk_ids``) and their probabilities (``topk_weights``), renormalized to sum
  to one when the model says so (Mixtral always; Qwen MoE when ``norm_topk_prob``).
- shared expert (Qwen2-MoE): a dense MLP every token goes through, scaled by
  ``sigmoid(shared_expert_gate(x))`` and added to the routed output.

Shapes: T tokens, D hidden size, E experts, k experts per token, I expert width.

Backends (where the expert weights live and run) are one class each, registered in
``EXPERT_BACKENDS`` (services/engine/model/expert_backends: one module each; the engine
config's ``experts`` section picks one); the MoE block and the weight loader only
use the abstract interface. The model builder gets an ``ExpertFactory``: ``ExpertSpec ->
ExpertBackend``, called once per MoE layer. The loader hands each expert over as an
``ExpertSource`` (``install_expert``): a backend that keeps its experts elsewhere (the
checkpoint file, another process) may keep only where they are instead of reading them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
import torch.nn.functional as F

from services.engine.model.layers import GatedMLP, silu_and_mul

if TYPE_CHECKING:
    from services.engine.checkpoint import TensorLocation

class ExpertsUnavailableError(RuntimeError):
    """The experts of a step could not be run: a remote expert shard died, failed or did not
    answer in time. The step's requests fail (UNAVAILABLE over gRPC); later steps try again."""


Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x [T, D] -> (topk_ids, topk_weights)


@dataclass(frozen=True)
class ExpertSpec:
    """What a backend needs to hold one MoE layer's experts."""

    layer: int  # decoder layer index (remote backends use it to address the experts)
    num_experts: int  # E
    hidden_size: int  # D
    intermediate_size: int  # I, width of one expert
    dtype: torch.dtype  # compute dtype of hidden states and weights
    num_moe_layers: int = 1  # MoE layers in the whole model (a budget for the model is split over them)


@dataclass(frozen=True)
class ExpertSource:
    """One expert as the checkpoint holds it, handed to ``ExpertBackend.install_expert``."""

    read: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # -> gate, up [I, D], down [D, I] (CPU); only while loading
    locations: "tuple[TensorLocation, ...] | None" = None  # (gate, up, down) byte ranges; None: not safetensors


@dataclass(frozen=True)
class ExpertLayerStats:
    """Counters of one MoE layer's expert backend since start (and gauges: now)."""

    layer: int  # decoder layer index
    backend: str  # the ``experts`` variant name
    hits: int = 0  # expert uses served from resident weights (prefetched ones included)
    misses: int = 0  # expert uses that had to load the expert first
    prefetch_loads: int = 0  # experts loaded ahead of use by the prefetcher
    prefetch_hits: int = 0  # hits on a prefetched expert before any other use of it
    bytes_loaded: int = 0  # expert weight bytes copied in from the slower tier (misses and prefetches)
    resident_bytes: int = 0  # gauge: expert weight bytes resident now
    capacity_bytes: int = 0  # gauge: the layer's share of the budget
    window_uses: int = 0  # expert uses in the recorded routing trace (the last ``trace_steps`` steps)
    window_hits: int = 0  # of those, hits (realised hit rate = window_hits / window_uses)
    window_oracle_hits: int = 0  # hits Belady's MIN would get on the same trace with the same slots


class ExpertBackend(nn.Module, ABC):
    """Runs the routed experts of one MoE layer."""

    name = "local"  # the variant's registered name (metrics labels)

    def __init__(self, spec: ExpertSpec):
        super().__init__()
        self.spec = spec

    def install_expert(self, expert: int, source: ExpertSource) -> None:
        """Take one expert from the checkpoint; the default reads it and calls ``load_expert``."""
        self.load_expert(expert, *source.read())

    def attach_router(self, route: Router) -> None:
        """Called by the MoE block with its router (backends that prefetch use the next layer's)."""

    def stats(self) -> ExpertLayerStats | None:
        """This layer's counters, or None for a backend that keeps none."""
        return None

    @abstractmethod
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], topk_ids [T, k] int64, topk_weights [T, k] (hidden's dtype) ->
        ``sum_j topk_weights[t, j] * expert[topk_ids[t, j]](hidden[t])`` as [T, D]."""

    @abstractmethod
    def load_expert(self, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Install one expert's weights: gate, up [I, D] and down [D, I] (any dtype, CPU ok)."""


class LocalExperts(ExpertBackend):
    """All experts in this process, stacked: ``gate_up_proj`` [E, 2I, D], ``down_proj`` [E, D, I].

    Tokens are sorted by expert once; the loop runs only over experts that got tokens,
    each as two GEMMs on its contiguous group of rows.
    """

    def __init__(self, spec: ExpertSpec):
        super().__init__(spec)
        e, d, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d, dtype=spec.dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, d, i, dtype=spec.dtype), requires_grad=False)

    @torch.no_grad()
    def load_expert(self, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        i = self.spec.intermediate_size
        self.gate_up_proj[expert, :i].copy_(gate)
        self.gate_up_proj[expert, i:].copy_(up)
        self.down_proj[expert].copy_(down)

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        groups = ExpertGroups.of(hidden, topk_ids, self.spec.num_experts)
        for expert, rows in groups.rows.items():
            run_expert(groups.x, groups.y, rows, self.gate_up_proj[expert], self.down_proj[expert])
        return groups.combine(hidden, topk_weights)


@dataclass
class ExpertGroups:
    """A step's token rows grouped by expert: ``x`` [T*k, D] holds ``hidden[tokens]`` sorted by
    expert (stable), ``rows[e]`` is expert e's contiguous slice of it (experts with tokens only,
    ascending), and each backend writes expert e's output for those rows into ``y`` [T*k, D].
    Every backend computes an expert's rows the same way (``run_expert``), so where the
    weights live changes no bit of the result."""

    order: torch.Tensor  # [T*k] positions in topk_ids.flatten(), grouped by expert
    tokens: torch.Tensor  # [T*k] token row of each sorted entry
    x: torch.Tensor  # [T*k, D] inputs
    y: torch.Tensor  # [T*k, D] outputs, filled by the backend
    rows: dict[int, slice]  # expert -> its rows of x / y

    @classmethod
    def of(cls, hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> "ExpertGroups":
        k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()  # [T*k], entry j belongs to token j // k
        order = torch.argsort(flat_ids, stable=True)  # [T*k] grouped by expert
        counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
        tokens = order // k
        x = hidden[tokens]  # [T*k, D]
        rows, start = {}, 0
        for expert, n in enumerate(counts):
            if n:
                rows[expert] = slice(start, start + n)
                start += n
        return cls(order, tokens, x, torch.empty_like(x), rows)

    def combine(self, hidden: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """``sum_j topk_weights[t, j] * y[row of (t, j)]`` as [T, D]."""
        self.y.mul_(topk_weights.flatten()[self.order].unsqueeze(1))
        out = torch.zeros_like(hidden)
        return out.index_add_(0, self.tokens, self.y)


def run_expert(x: torch.Tensor, y: torch.Tensor, rows: slice, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """``y[rows] = down(silu(gate(x[rows])) * up(x[rows]))``; gate_up [2I, D], down [D, I]."""
    act = silu_and_mul(F.linear(x[rows], gate_up))  # [n, I]
    torch.matmul(act, down.t(), out=y[rows])  # [n, D]


ExpertFactory = Callable[[ExpertSpec], ExpertBackend]  # builds one MoE layer's backend


class MoEBlock(nn.Module):
    """Router + routed experts (+ optional gated shared expert). x [T, D] -> [T, D]."""

    def __init__(self, spec: ExpertSpec, top_k: int, renormalize: bool,
                 shared_intermediate_size: int = 0, backend: ExpertFactory = LocalExperts):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False, dtype=spec.dtype)  # router
        self.experts = backend(spec)
        self.experts.attach_router(self.route)
        self.shared_expert = None
        self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(spec.hidden_size, shared_intermediate_size, spec.dtype)
            self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False, dtype=spec.dtype)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] in x's dtype)."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        out = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [T, D]
            out.addcmul_(torch.sigmoid(self.shared_expert_gate(x)), shared)
        return out


def expert_stats(model: nn.Module) -> list[ExpertLayerStats]:
    """The counters of every MoE layer of ``model`` whose backend keeps them, by layer."""
    found = (m.experts.stats() for m in model.modules() if isinstance(m, MoEBlock))
    return sorted((s for s in found if s is not None), key=lambda s: s.layer)
