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
ExpertBackend``, called once per MoE layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from services.engine.model.layers import GatedMLP, silu_and_mul


@dataclass(frozen=True)
class ExpertSpec:
    """What a backend needs to hold one MoE layer's experts."""

    layer: int  # decoder layer index (remote backends use it to address the experts)
    num_experts: int  # E
    hidden_size: int  # D
    intermediate_size: int  # I, width of one expert
    dtype: torch.dtype  # compute dtype of hidden states and weights


class ExpertBackend(nn.Module, ABC):
    """Runs the routed experts of one MoE layer."""

    def __init__(self, spec: ExpertSpec):
        super().__init__()
        self.spec = spec

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
        k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()  # [T*k], entry j belongs to token j // k
        order = torch.argsort(flat_ids, stable=True)  # [T*k] grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.spec.num_experts).tolist()
        tokens = order // k  # [T*k] token row of each sorted entry
        x = hidden[tokens]  # [T*k, D]
        y = torch.empty_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            act = silu_and_mul(F.linear(x[rows], self.gate_up_proj[expert]))  # [n, I]
            torch.matmul(act, self.down_proj[expert].t(), out=y[rows])  # [n, D]
            start += n
        y.mul_(topk_weights.flatten()[order].unsqueeze(1))
        out = torch.zeros_like(hidden)
        return out.index_add_(0, tokens, y)


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
