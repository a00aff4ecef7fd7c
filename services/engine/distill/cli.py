"""``tandem distill TARGET OUT_DIR [options]``: the command (registered through the
``tandem.commands`` entry point, so router/ imports none of the training code)."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

from services.engine import env


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``distill`` parser to ``tandem``'s subcommands."""
    from services.engine.distill.config import CorpusConfig
    from services.engine.distill.student import StudentShape
    from services.engine.distill.trainer import TrainConfig

    c, s, t = CorpusConfig(), StudentShape(), TrainConfig()
    p = commands.add_parser("distill", help="train a draft model for speculative decoding from a target model",
                            description="Distill TARGET into a small draft with its tokenizer: the target answers "
                            "built-in prompts, then the draft learns its next-token distributions (KL). Resumable: "
                            "rerun the same command to continue.")
    p.add_argument("target", help="target model: checkpoint folder, .gguf file or model name (smollm2)")
    p.add_argument("out_dir", help="output folder: the draft checkpoint, README.md and work/ (resumable state)")
    g = p.add_argument_group("corpus")
    g.add_argument("--prompts", type=int, default=c.num_prompts, help="prompts the target answers")
    g.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens)
    g.add_argument("--temperatures", default=",".join(f"{x:g}" for x in c.temperatures),
                   help="comma-separated; prompt i is sampled at the (i mod n)-th")
    g.add_argument("--concurrency", type=int, default=c.concurrency, help="requests generated at once")
    g.add_argument("--top-k", type=int, default=c.top_k, help="teacher tokens stored per position")
    g.add_argument("--shard-size", type=int, default=c.shard_size)
    g.add_argument("--eval-fraction", type=float, default=c.eval_fraction)
    g.add_argument("--dtype", default="auto", help="the target's dtype while generating")
    m = p.add_argument_group("draft shape")
    m.add_argument("--hidden", type=int, default=s.hidden_size)
    m.add_argument("--layers", type=int, default=s.num_layers)
    m.add_argument("--heads", type=int, default=s.num_heads)
    m.add_argument("--kv-heads", type=int, default=s.num_kv_heads)
    m.add_argument("--ffn", type=int, default=s.intermediate_size)
    o = p.add_argument_group("training")
    o.add_argument("--steps", type=int, default=t.steps)
    o.add_argument("--batch-size", type=int, default=t.batch_size)
    o.add_argument("--lr", type=float, default=t.lr)
    o.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every)
    o.add_argument("--seed", type=int, default=t.seed)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_command)


def config_from_args(args: argparse.Namespace):
    from services.engine.distill.config import CorpusConfig, DistillConfig
    from services.engine.distill.student import StudentShape
    from services.engine.distill.trainer import TrainConfig

    try:
        temps = tuple(float(x) for x in args.temperatures.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"temperatures: expected comma-separated numbers, got {args.temperatures!r}") from None
    corpus = CorpusConfig(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, temperatures=temps,
                          concurrency=args.concurrency, top_k=args.top_k, shard_size=args.shard_size,
                          eval_fraction=args.eval_fraction)
    shape = StudentShape(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        checkpoint_every=args.checkpoint_every, seed=args.seed)
    return DistillConfig(args.target, Path(args.out_dir), corpus, shape, train, args.dtype, args.threads)


def run_command(args: argparse.Namespace) -> int:
    env.set_defaults({"OMP_WAIT_POLICY": "PASSIVE"})  # before torch starts OpenMP (see default_model/train.py)
    from services.engine.distill.run import distill
    from services.engine.model_catalog import check_model_path, resolve_model

    config = config_from_args(args)
    check_model_path(resolve_model(config.target))
    report = distill(config, progress=not args.no_progress)
    command = "tandem distill " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    write_readme(config, report, command)
    print(f"distill: wrote {config.out_dir} ({report.draft_bytes / 2**20:.1f} MiB weights); "
          f"held-out greedy agreement {report.eval_agreement:.3f}; train KL {report.train_loss:.4f}; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in report.stage_seconds.items()))
    return 0


def write_readme(config, report, command: str) -> None:
    """OUT_DIR/README.md: how the draft was made and what this invocation measured."""
    import torch

    s, t, c = config.shape, config.train, config.corpus
    loads = "; ".join(f"{m} {a[0]:.2f}/{a[1]:.2f}/{a[2]:.2f}" for m, a in report.load_average)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report.stage_seconds.items())
    text = f"""# Draft model for speculative decoding, distilled from `{config.target}`

Made by `tandem distill` (services/engine/distill/): the target answered {c.num_prompts} built-in chat
prompts (services/engine/distill/prompts.py; temperatures {', '.join(f'{x:g}' for x in c.temperatures)}
cycled, at most {c.max_new_tokens} new tokens), then this Llama (hidden {s.hidden_size}, {s.num_layers}
layers, {s.num_heads} heads / {s.num_kv_heads} KV heads, MLP {s.intermediate_size}, tied embedding initialised
from the target's by SVD) learnt the target's next-token distributions (KL on the top-{c.top_k} + rest),
{t.steps} steps of {t.batch_size} sequences, AdamW peak LR {t.lr:g}, seed {t.seed}. Weights in bfloat16.

Use: `speculative: {{method: draft_model, model: <this folder>}}`.

## Reproduce

```
{command or 'tandem distill ' + config.target + ' ' + str(config.out_dir)}
```

## This run

- corpus: {report.num_sequences} sequences, {report.num_tokens:,} tokens (held out for the figure below:
  {c.eval_fraction:.0%})
- held-out greedy agreement (student argmax = target argmax on answer tokens): {report.eval_agreement:.3f}
- final training KL (mean of the last steps): {report.train_loss:.4f}
- model.safetensors: {report.draft_bytes:,} bytes
- wall time of this invocation: {stages}
- load average (1/5/15 min) seen: {loads}
- machine: {_cpu_model()}, {torch.get_num_threads()} torch threads, torch
  {torch.__version__}, Python {platform.python_version()}
"""
    (config.out_dir / "README.md").write_text(text)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
