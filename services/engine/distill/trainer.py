"""Training the student on stored teacher scores: batches, the loop, checkpoints and resuming.

Determinism: the batch of step s is a function of (seed, s) alone (epoch e = s // batches per
epoch is a permutation drawn from ``seed + e``), and the state saved every ``checkpoint_every``
steps holds the model, the optimizer and the step; so a run interrupted and restarted from its
last checkpoint does the same steps as an uninterrupted one, and ends with the same weights.
Checkpoints are written to a temporary file and renamed (a crash mid-write leaves the previous
one), and read back with ``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.distill.loss import topk_kl
from services.engine.distill.teacher import TeacherScores


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the student."""

    steps: int = 700  # optimizer steps in all
    batch_size: int = 16  # sequences per step (padded to the longest)
    lr: float = 3e-3  # peak learning rate (AdamW)
    warmup: float = 0.05  # fraction of the steps with a linear warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 0.01  # AdamW decay of the matrices (not of norms)
    checkpoint_every: int = 50  # steps between checkpoints (and at the end)
    seed: int = 0  # batch order (and, in distill, initialisation and sampling)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup: must be in [0, 1), got {self.warmup}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup * steps`` steps, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    progress = step / cfg.steps
    if progress < cfg.warmup:
        return cfg.lr * (step + 1) / max(1.0, cfg.warmup * cfg.steps)
    p = min(1.0, (progress - cfg.warmup) / (1.0 - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def batch_indices(num_sequences: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The sequences of step ``step``: epochs are seeded permutations, cut into batches (the last
    partial batch of an epoch is dropped unless an epoch is shorter than one batch)."""
    per_epoch = max(1, num_sequences // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[i * batch_size:(i + 1) * batch_size].tolist()


def make_batch(scores: TeacherScores, seqs: list[int], pad_id: int = 0):
    """Right-padded batch: (input [B, T] int64, top_ids [B*T, K], top_logprobs [B*T, K], mask [B*T]
    bool); padding rows have mask False (causal attention: padding never affects real rows)."""
    lengths = [int(scores.offsets[s + 1] - scores.offsets[s]) for s in seqs]
    t, k = max(lengths), scores.top_ids.shape[1]
    x = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    ids = torch.zeros(len(seqs), t, k, dtype=torch.long)
    logps = torch.zeros(len(seqs), t, k)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        a = int(scores.offsets[s])
        x[b, :n] = scores.tokens[a:a + n]
        ids[b, :n] = scores.top_ids[a:a + n]
        logps[b, :n] = scores.top_logprobs[a:a + n]
        mask[b, :n] = True
    return x, ids.view(-1, k), logps.view(-1, k), mask.view(-1)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def save_state(file: Path, model, optimizer, step: int, loss: float) -> None:
    """Atomically write the training state after ``step`` steps."""
    tmp = file.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "loss": loss}, tmp)
    os.replace(tmp, file)


def load_state(file: Path, model, optimizer) -> tuple[int, float]:
    """Restore model and optimizer from ``file`` -> (steps done, loss then); (0, nan) when absent."""
    if not file.is_file():
        return 0, float("nan")
    state = torch.load(file, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state["loss"])


def train(model, scores: TeacherScores, cfg: TrainConfig, state_file: Path,
          on_step: Callable[[int, float, float], None] = lambda step, loss, lr: None,
          stop_after: int | None = None) -> float:
    """Train ``model`` to ``cfg.steps`` steps, resuming from ``state_file`` when it exists;
    checkpoint every ``cfg.checkpoint_every`` steps and at the end. ``on_step(step, loss, lr)``
    after each step. ``stop_after``: return after that many steps of this call, as a crash would
    (tests of resuming). Returns the mean loss of the last (up to) 20 steps of this call, or the
    checkpoint's when no step was left to do."""
    optimizer = make_optimizer(model, cfg)
    step, last_loss = load_state(state_file, model, optimizer)
    num_seqs = len(scores.offsets) - 1
    recent: list[float] = []
    model.train()
    done_here = 0
    while step < cfg.steps and (stop_after is None or done_here < stop_after):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, ids, logps, mask = make_batch(scores, batch_indices(num_seqs, cfg.batch_size, cfg.seed, step))
        logits = model(x)  # [B, T, V]
        loss = topk_kl(logits.view(-1, logits.shape[-1]), ids, logps, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        done_here += 1
        recent = (recent + [loss.item()])[-20:]
        on_step(step, recent[-1], lr)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_state(state_file, model, optimizer, step, sum(recent) / len(recent))
    model.eval()
    return sum(recent) / len(recent) if recent else last_loss
