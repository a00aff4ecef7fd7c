"""``distill(config)``: target -> corpus -> student -> draft checkpoint, resumable at every stage.

OUT_DIR layout:
- ``work/run.json``: the run's options (``DistillConfig.identity``); a rerun with other options
  is refused (ValueError naming them) instead of mixing two runs;
- ``work/shard-NNNN.safetensors``: the corpus, ``shard_size`` prompts per file (token ids, offsets,
  prompt lengths, teacher top-K); a rerun generates only the missing shards;
- ``work/train_state.pt``: model + optimizer + step every ``checkpoint_every`` steps;
- the draft itself (config.json, model.safetensors, tokenizer files) and README.md, at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from services.engine.distill.config import DistillConfig, identity_differences
from services.engine.distill.prompts import choose_prompts, render_prompt
from services.engine.distill.student import build_student, write_draft
from services.engine.distill.teacher import TeacherScores, generate, score_topk
from services.engine.distill.trainer import train
from services.engine.sampling_params import SamplingParams
from services.engine.spec_decode.vocab_check import Vocabulary, check_same_vocabulary
from services.engine.tokenizer import Tokenizer


@dataclass
class RunReport:
    """What one invocation did (a resumed one reports only its own part)."""

    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage of this call
    load_average: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)  # (moment, 1/5/15 min)
    num_sequences: int = 0  # corpus sequences (train + held out)
    num_tokens: int = 0  # corpus tokens
    train_loss: float = float("nan")  # mean KL of the last steps
    eval_agreement: float = float("nan")  # held-out answer positions where student argmax == teacher's
    draft_bytes: int = 0  # size of model.safetensors

    def mark(self, moment: str) -> None:
        self.load_average.append((moment, tuple(round(x, 2) for x in os.getloadavg())))


def distill(config: DistillConfig, progress: bool = True, stop_after_steps: int | None = None) -> RunReport:
    """Run (or resume) ``config``; returns what this call did. ``stop_after_steps``: stop training
    after that many steps of this call without writing the draft (tests of resuming)."""
    from services.engine.engine import LLMEngine
    from services.engine.llm import build_engine_config

    report, t0 = RunReport(), time.time()
    report.mark("start")
    torch.set_num_threads(config.threads)
    work = config.out_dir / "work"
    _claim(work, config)
    engine = LLMEngine(build_engine_config(config.target, device="cpu", dtype=config.dtype,
                                           max_num_seqs=config.corpus.concurrency, kv_cache_memory_gb=1.0,
                                           enable_prefix_caching=False))
    target_config, target_tok = engine.model_config, engine.tokenizer
    target_vocab = Vocabulary.of(target_tok, target_config.vocab_size)
    _check_existing_draft(config.out_dir, target_vocab)
    report.stage_seconds["load target"] = time.time() - t0
    tick = time.time()
    corpus, prompt_lens = _corpus(engine, config, work, progress)
    report.stage_seconds["corpus"] = time.time() - tick
    report.mark("corpus done")
    num_eval = int(round(config.corpus.eval_fraction * len(prompt_lens)))
    train_part = subset(corpus, 0, len(prompt_lens) - num_eval)
    report.num_sequences, report.num_tokens = len(prompt_lens), len(corpus.tokens)
    tick = time.time()
    student = build_student(config.shape, target_config, engine.model.embed_tokens.weight.detach(),
                            config.train.seed)
    del engine  # the target's weights and KV pool are not needed past this point
    state = work / "train_state.pt"
    report.train_loss = _train(student, train_part, config, state, report, progress, stop_after_steps)
    report.stage_seconds["train"] = time.time() - tick
    if stop_after_steps is not None and _steps_done(state) < config.train.steps:
        return report
    if num_eval:
        first = len(prompt_lens) - num_eval
        report.eval_agreement = agreement(student, subset(corpus, first, len(prompt_lens)), prompt_lens[first:])
    write_draft(config.out_dir, student, target_config, target_tok)
    check_same_vocabulary(Vocabulary.of(Tokenizer(config.out_dir), student.cfg.vocab_size), target_vocab,
                          field="distill")
    report.draft_bytes = (config.out_dir / "model.safetensors").stat().st_size
    report.stage_seconds["total"] = time.time() - t0
    report.mark("end")
    return report


def _claim(work: Path, config: DistillConfig) -> None:
    """Create ``work/run.json``, or check that the run there had the same options."""
    work.mkdir(parents=True, exist_ok=True)
    run_file = work / "run.json"
    if run_file.is_file():
        diffs = identity_differences(json.loads(run_file.read_text()), config.identity())
        if diffs:
            raise ValueError(f"out_dir: {config.out_dir} holds a distill run with other options ("
                             + "; ".join(diffs) + "); rerun with the same options to resume, or use a new OUT_DIR")
    else:
        run_file.write_text(json.dumps(config.identity(), indent=2) + "\n")


def _check_existing_draft(out_dir: Path, target: Vocabulary) -> None:
    """A checkpoint already in OUT_DIR (an earlier run's draft) must have the target's vocabulary."""
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file():
        size = json.loads((out_dir / "config.json").read_text()).get("vocab_size", -1)
        check_same_vocabulary(Vocabulary.of(Tokenizer(out_dir), size), target, field="out_dir")


def _train(student, scores: TeacherScores, config: DistillConfig, state: Path, report: RunReport,
           progress: bool, stop_after_steps: int | None) -> float:
    bar = tqdm(total=config.train.steps, initial=_steps_done(state), desc="distill: train", unit="step",
               disable=not progress, mininterval=1.0)

    def on_step(step: int, loss: float, lr: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(kl=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)
        if step % config.train.checkpoint_every == 0:
            report.mark(f"step {step}")

    try:
        return train(student, scores, config.train, state, on_step, stop_after_steps)
    finally:
        bar.close()


def _steps_done(state: Path) -> int:
    return int(torch.load(state, weights_only=True)["step"]) if state.is_file() else 0


def _corpus(engine, config: DistillConfig, work: Path, progress: bool) -> tuple[TeacherScores, list[int]]:
    """Every shard of the corpus (generating and scoring the missing ones) -> (scores of all
    sequences in prompt order, prompt length of each sequence)."""
    c = config.corpus
    texts = choose_prompts(c.num_prompts, config.train.seed)
    starts = list(range(0, c.num_prompts, c.shard_size))
    files = [work / f"shard-{i // c.shard_size:04d}.safetensors" for i in starts]
    missing = sum(1 for f in files if not f.is_file())
    bar = tqdm(total=missing * 2, desc="distill: corpus (generate, score)", unit="shard-stage",
               disable=not progress or not missing)
    parts = []
    for start, file in zip(starts, files):
        if not file.is_file():
            ids = [render_prompt(engine.tokenizer, t) for t in texts[start:start + c.shard_size]]
            params = [_sampling(c, config.train.seed, start + j) for j in range(len(ids))]
            sequences = generate(engine, ids, params)
            bar.update()
            scores = score_topk(engine, sequences, c.top_k)
            bar.update()
            _save_shard(file, scores, [len(p) for p in ids])
        parts.append(_load_shard(file))
    bar.close()
    return concat([p for p, _ in parts]), [n for _, lens in parts for n in lens]


def _sampling(c, seed: int, i: int) -> SamplingParams:
    """Prompt ``i``'s sampling: temperature ``temperatures[i % n]``, its own seed."""
    return SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperatures[i % len(c.temperatures)],
                          seed=seed * 1_000_003 + i)


def _save_shard(file: Path, scores: TeacherScores, prompt_lens: list[int]) -> None:
    from safetensors.torch import save_file

    tmp = file.with_suffix(".tmp")
    save_file({"tokens": scores.tokens, "offsets": scores.offsets, "top_ids": scores.top_ids.to(torch.int32),
               "top_logprobs": scores.top_logprobs, "prompt_lens": torch.tensor(prompt_lens, dtype=torch.long)},
              str(tmp))
    os.replace(tmp, file)


def _load_shard(file: Path) -> tuple[TeacherScores, list[int]]:
    from safetensors.torch import load_file

    t = load_file(str(file))
    return TeacherScores(t["tokens"], t["offsets"], t["top_ids"].long(), t["top_logprobs"]), t["prompt_lens"].tolist()


def concat(parts: list[TeacherScores]) -> TeacherScores:
    """The sequences of every part, in order, as one corpus."""
    offsets, base = [torch.zeros(1, dtype=torch.long)], 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return TeacherScores(torch.cat([p.tokens for p in parts]), torch.cat(offsets),
                         torch.cat([p.top_ids for p in parts]), torch.cat([p.top_logprobs for p in parts]))


def subset(scores: TeacherScores, first: int, end: int) -> TeacherScores:
    """Sequences [first, end) of ``scores``."""
    a, b = int(scores.offsets[first]), int(scores.offsets[end])
    return TeacherScores(scores.tokens[a:b], scores.offsets[first:end + 1] - a, scores.top_ids[a:b],
                         scores.top_logprobs[a:b])


@torch.no_grad()
def agreement(student, scores: TeacherScores, prompt_lens: list[int]) -> float:
    """Share of answer positions (the last prompt token's and after) where the student's argmax is
    the teacher's: the chance a greedy draft token is accepted there, given the prefix."""
    hits = total = 0
    for s, plen in enumerate(prompt_lens):
        a, b = int(scores.offsets[s]), int(scores.offsets[s + 1])
        logits = student(scores.tokens[a:b][None])[0]  # [T, V]
        rows = slice(plen - 1, b - a - 1)  # predictions of answer tokens
        hits += int((logits[rows].argmax(-1) == scores.top_ids[a:b][rows, 0]).sum())
        total += max(0, b - a - plen)
    return hits / total if total else float("nan")
