"""``experts: remote``: the routed experts run in ``ExpertWorker`` deployments, one per shard.

    experts: {backend: remote, deployment: ExpertWorker, num_shards: 2, call_timeout_s: 10}

Sharding is by expert range (expert parallelism): shard s of N holds experts
``shard_ranges(E, N)[s]`` (a contiguous range) of every MoE layer and runs in the Serve
deployment ``shard_names(options)[s]`` (``ExpertWorker0``, ``ExpertWorker1``, ...;
services/expert_worker.py). The router (gate), attention, the shared expert and the weighted
sum stay in this process.

One step of one MoE layer: the tokens are grouped by expert (``ExpertGroups``: rows sorted by
expert). Because a shard's experts are a contiguous range, its rows are one contiguous slice of
the sorted rows; every shard that got rows gets ONE call with that slice and the row count of
each of its experts, all shards at once (``ExpertShards.run``). A shard answers ``run_expert``
of each of its experts' rows; the answers are written back into ``y`` at the same rows and
``ExpertGroups.combine`` does the weighted sum here, in ``local``'s order.

Exactness: each expert's rows go through the same two GEMMs on weights of the same layout and
dtype as ``LocalExperts`` (``run_expert``), so with the same torch build, device and dtype the
output is bit-identical to ``local`` (tests/unit/test_expert_remote.py checks ``torch.equal``).

The transport is the host's (the engine imports no ray): ``HostDeps.expert_shards[deployment]``
builds an ``ExpertShards`` for these options (services/expert_client.py calls the Serve
handles). A call that fails or is not answered within ``call_timeout_s`` raises
``ExpertsUnavailableError``: the step's requests fail (UNAVAILABLE over gRPC); the next step
calls again (a replacement replica serves it once Serve has started it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from services.engine.config_parse import ConfigError
from services.engine.model.expert_backends import EXPERT_BACKENDS
from services.engine.model.experts import ExpertBackend, ExpertGroups, ExpertSource, ExpertSpec
from services.engine.plugins import HostDeps


@dataclass(frozen=True)
class RemoteOptions:
    """Where the shards are and how long a step waits for them."""

    deployment: str = "ExpertWorker"  # shard s is the Serve deployment f"{deployment}{s}"
    num_shards: int = 2  # expert ranges (each a deployment); at most the model's experts per layer
    call_timeout_s: float = 10.0  # a step's shard calls not all answered by then: its requests fail UNAVAILABLE

    def __post_init__(self) -> None:
        if not isinstance(self.deployment, str) or not self.deployment.isidentifier():
            raise ConfigError("deployment", f"must be a deployment name (letters, digits, _), got {self.deployment!r}")
        if isinstance(self.num_shards, bool) or not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ConfigError("num_shards", f"must be an integer >= 1, got {self.num_shards!r}")
        if not 0 < self.call_timeout_s <= 600:
            raise ConfigError("call_timeout_s", f"must be in (0, 600] seconds, got {self.call_timeout_s!r}")


def shard_names(options: RemoteOptions) -> list[str]:
    """The Serve deployment of each shard, by shard index."""
    return [f"{options.deployment}{s}" for s in range(options.num_shards)]


def shard_ranges(num_experts: int, num_shards: int) -> list[range]:
    """Shard s holds experts ``[s*E//N, (s+1)*E//N)``: contiguous, sizes differ by at most one.
    ValueError when there are more shards than experts (a shard would hold none)."""
    if not 1 <= num_shards <= num_experts:
        raise ValueError(f"experts.num_shards: {num_shards} shards for {num_experts} experts per layer; "
                         f"use 1..{num_experts}")
    return [range(s * num_experts // num_shards, (s + 1) * num_experts // num_shards) for s in range(num_shards)]


@dataclass(frozen=True)
class ShardWork:
    """One shard's part of one MoE layer's step (engine-side; the transport turns it into a call)."""

    shard: int  # shard index
    layer: int  # decoder layer index
    experts: tuple[int, ...]  # the shard's experts that got rows, ascending
    counts: tuple[int, ...]  # rows of each of them (>= 1), in that order
    x: torch.Tensor  # [sum(counts), D] the rows, grouped by expert in that order (the model's dtype)


class ExpertShards(ABC):
    """The host's transport to the shards of one model."""

    @abstractmethod
    def run(self, work: list[ShardWork]) -> list[torch.Tensor]:
        """Run every item, all shards in parallel; the output of each, in order, as [n, D] in
        the rows' dtype (any device). Raises ``ExpertsUnavailableError`` when any shard fails
        or is late (``call_timeout_s``)."""


class RemoteRuntime:
    """The ``ExpertFactory`` of one model under ``remote``: every MoE layer shares the transport."""

    def __init__(self, options: RemoteOptions, shards: ExpertShards):
        self.options = options
        self.shards = shards

    def __call__(self, spec: ExpertSpec) -> "RemoteExperts":
        return RemoteExperts(spec, self)


class RemoteExperts(ExpertBackend):
    """One MoE layer whose experts live in the shards (module docstring). Holds no weights."""

    name = "remote"

    def __init__(self, spec: ExpertSpec, runtime: RemoteRuntime):
        super().__init__(spec)
        self.runtime = runtime
        self.ranges = shard_ranges(spec.num_experts, runtime.options.num_shards)

    def install_expert(self, expert: int, source: ExpertSource) -> None:
        """Nothing to read: the shard that holds ``expert`` loads it from the checkpoint itself."""

    def load_expert(self, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        raise ValueError("experts.backend: remote experts are loaded by their ExpertWorker shards, not here")

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        groups = ExpertGroups.of(hidden, topk_ids, self.spec.num_experts)
        work, rows = [], []
        for shard, experts in enumerate(self.ranges):
            mine = [e for e in experts if e in groups.rows]
            if not mine:
                continue
            span = slice(groups.rows[mine[0]].start, groups.rows[mine[-1]].stop)
            counts = tuple(groups.rows[e].stop - groups.rows[e].start for e in mine)
            work.append(ShardWork(shard, self.spec.layer, tuple(mine), counts, groups.x[span]))
            rows.append(span)
        for span, y in zip(rows, self.runtime.shards.run(work)):
            groups.y[span].copy_(y)
        return groups.combine(hidden, topk_weights)


@EXPERT_BACKENDS.register("remote", options=RemoteOptions)
def remote_experts(options: RemoteOptions, deps: HostDeps) -> RemoteRuntime:
    build = deps.expert_shards.get(options.deployment)
    if build is None:
        raise ValueError(f"experts.deployment: no ExpertWorker deployments {options.deployment!r} here; remote "
                         f"experts run in a Serve app that deploys them (router/app.py, deploy/moe.yaml)")
    return RemoteRuntime(options, build(options))
