"""Train the embedded default model: a small Llama on the Python docs, fully offline.

Usage::

    python -m services.engine.default_model.train --out services/engine/default_model/weights \
        [--minutes 12] [--seed 0] [--steps N]

Self-contained: needs only torch, tokenizers, safetensors and tqdm (no transformers).

1. Corpus: ``pydoc_data.topics`` (the language-reference topics bundled with every CPython,
   ~465 KB), documents in sorted-key order, so the corpus is identical on every machine that
   runs the same Python minor version.
2. Tokenizer: byte-level BPE (``tokenizers``), ByteLevel pre-tokenizer + ByteLevel decoder so
   decode restores spaces, special tokens ``<|bos|>`` / ``<|eos|>`` / ``<|pad|>``.
3. Model: a small PyTorch Llama (RMSNorm, HF "rotate_half" rotary embeddings, GQA attention,
   SiLU-gated MLP).  Embedding and LM head are tied during training; the checkpoint stores
   them as two separate (identical) tensors with ``tie_word_embeddings: false``, so every
   loader finds ``lm_head.weight``.
4. Training: AdamW + linear warmup + cosine decay, deterministic seed, 2 threads, tqdm bar,
   stopping at a wall-clock budget or a step count (whichever comes first; the LR schedule
   follows whichever is further along).
5. Output: an HF ``LlamaForCausalLM`` checkpoint (config.json, model.safetensors,
   generation_config.json, tokenizer.json) plus README.md recording how it was made.

Reproducibility: the corpus, tokenizer, initialisation and batch order are fixed by --seed, but a
wall-clock budget makes the step count (and the time-based LR schedule) depend on machine speed.
For a run that is identical everywhere pass ``--steps N --minutes 1e9`` (the LR then follows
step / N).  ``OMP_WAIT_POLICY`` defaults to PASSIVE here: on a busy 2-core machine spinning
OpenMP workers made 2-thread steps ~3x slower than 1-thread ones; passive waiting fixed it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.engine import env  # standard library only: torch is not started yet

# Must precede the OpenMP runtime's start (i.e. `import torch`): on a busy 2-core machine,
# spinning OpenMP workers that wait on a descheduled peer make each step ~3x slower.
env.set_defaults({"OMP_WAIT_POLICY": "PASSIVE"})

import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


_UNDERLINE = re.compile(r"^([*=\-~^\"#+])\1{2,}$")


def clean_topic(text: str) -> str:
    """Unwrap prose paragraphs (runs of unindented lines) into single lines and drop heading
    underlines; indented blocks (grammar, code, lists) stay verbatim.  A tiny model cannot
    count columns, so hard-wrapped prose would teach it to emit newlines at random places."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").strip().split("\n")]
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(re.sub(r"(?<=[.?!:;])  +", " ", " ".join(para)))
            para.clear()

    for line in lines:
        if _UNDERLINE.match(line):
            continue
        if line and not line[0].isspace():
            para.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def build_corpus() -> list[str]:
    """The Python language-reference topics bundled with CPython, in sorted-key order."""
    from pydoc_data.topics import topics

    docs = [clean_topic(topics[key]) for key in sorted(topics)]
    return [d for d in docs if d]


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


# ----------------------------------------------------------------------------------------------
# Model: a minimal Llama, numerically matching transformers' LlamaForCausalLM
# ----------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    hidden_size: int = 224
    intermediate_size: int = 608
    num_hidden_layers: int = 5
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor):
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()  # [T, head_dim]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        cfg = self.cfg
        d = cfg.head_dim
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        if rep > 1:  # HF repeat_kv: kv head i serves query heads [i*rep, (i+1)*rep)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama decoder; parameter names mirror HF's (``embed_tokens``, ``layers.N...``, ``norm``)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.apply(self._init)
        # GPT-2 style: scale residual-branch output projections by 1/sqrt(2 * n_layers).
        std = cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
        for layer in self.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, 0.0, std)
            nn.init.normal_(layer.mlp.down_proj.weight, 0.0, std)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.cfg.initializer_range)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, vocab] (LM head tied to the embedding)."""
        T = idx.shape[1]
        cos, sin = rope_cos_sin(self.cfg, torch.arange(T, device=idx.device))
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.linear(self.norm(x), self.embed_tokens.weight)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"model.{k}": v.detach().float().contiguous().clone() for k, v in self.state_dict().items()}
        sd["lm_head.weight"] = self.embed_tokens.weight.detach().float().contiguous().clone()
        return sd

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, eos_id: int | None = None):
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.max_position_embeddings :])[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None and int(nxt) == eos_id:
                break
        return idx


# ----------------------------------------------------------------------------------------------
# Checkpoint writing
# ----------------------------------------------------------------------------------------------


def hf_config(cfg: LlamaConfig, bos_id: int, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def write_checkpoint(out: Path, model: Llama, tok, ids: dict[str, int]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(model.cfg, ids["bos"], ids["eos"], ids["pad"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(model.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(progress: float, base_lr: float, warmup: float, min_ratio: float) -> float:
    if progress < warmup:
        return base_lr * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder for the HF checkpoint")
    ap.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=0, help="max optimizer steps (0 = time only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=224)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=0, help="MLP width (0 = ~8/3 * hidden, multiple of 32)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2.5e-3)
    ap.add_argument("--warmup", type=float, default=0.03, help="warmup fraction of the run")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start, c_start = time.time(), time.process_time()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)

    # 1. corpus -------------------------------------------------------------------------------
    docs = build_corpus()
    n_chars = sum(len(d) for d in docs)
    print(f"corpus: pydoc_data.topics, {len(docs)} documents, {n_chars} chars", flush=True)

    # 2. tokenizer ----------------------------------------------------------------------------
    tok = train_tokenizer(docs, args.vocab)
    ids = {"bos": tok.token_to_id(BOS), "eos": tok.token_to_id(EOS), "pad": tok.token_to_id(PAD)}
    stream: list[int] = []
    for enc in tok.encode_batch(docs):
        stream += [ids["bos"], *enc.ids, ids["eos"]]
    data = torch.tensor(stream, dtype=torch.long)
    print(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}, {len(data)} tokens "
          f"({n_chars / len(data):.2f} chars/token)", flush=True)

    # 3. model --------------------------------------------------------------------------------
    ffn = args.ffn or int(math.ceil(8 * args.hidden / 3 / 32) * 32)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.ctx,
    )
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.head_dim % 2 == 0
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    model = Llama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_params_ckpt = n_params + cfg.vocab_size * cfg.hidden_size  # + separate lm_head in ckpt
    print(f"model: {asdict(cfg)} head_dim={cfg.head_dim}", flush=True)
    print(f"params: {n_params:,} trained (tied), {n_params_ckpt:,} in checkpoint", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_windows = len(data) - args.ctx - 1

    def batch():
        starts = torch.randint(0, n_windows, (args.batch,), generator=gen)
        win = torch.stack([data[s : s + args.ctx + 1] for s in starts.tolist()])
        return win[:, :-1], win[:, 1:]

    # 4. train --------------------------------------------------------------------------------
    from tqdm import tqdm

    budget = args.minutes * 60.0
    t0, c0 = time.time(), time.process_time()
    max_steps = args.steps if args.steps > 0 else None
    bar = tqdm(total=max_steps, unit="step", dynamic_ncols=True, disable=args.no_progress,
               mininterval=2.0)
    step, ema, loss_hist = 0, None, []
    model.train()
    while True:
        elapsed = time.time() - t0
        progress = elapsed / budget
        if max_steps:
            progress = max(progress, step / max_steps)
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        lv = loss.item()
        loss_hist.append(lv)
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", min=f"{elapsed / 60:.1f}", refresh=False)
        if step % 50 == 0:
            tqdm.write(f"step {step:5d}  {elapsed:6.0f}s  loss {ema:.4f}  lr {lr:.2e}")
    bar.close()
    train_wall, train_cpu = time.time() - t0, time.process_time() - c0

    # Final loss: mean over the whole corpus in non-overlapping ctx windows (eval mode).
    model.eval()
    with torch.no_grad():
        n = (len(data) - 1) // args.ctx
        xs = data[: n * args.ctx].view(n, args.ctx)
        ys = data[1 : n * args.ctx + 1].view(n, args.ctx)
        tot = 0.0
        for i in range(0, n, 32):
            lg = model(xs[i : i + 32])
            tot += F.cross_entropy(lg.reshape(-1, cfg.vocab_size), ys[i : i + 32].reshape(-1),
                                   reduction="sum").item()
        corpus_loss = tot / (n * args.ctx)
    last = loss_hist[-50:] or [float("nan")]
    final_train = sum(last) / len(last)
    print(f"trained {step} steps ({step * args.batch * args.ctx:,} tokens) in {train_wall:.0f}s wall "
          f"/ {train_cpu:.0f}s CPU; train loss (last {len(last)} steps) {final_train:.4f}; "
          f"corpus loss {corpus_loss:.4f}", flush=True)

    # 5. write --------------------------------------------------------------------------------
    write_checkpoint(args.out, model, tok, ids)
    samples = []
    for prompt in ("The for statement", "A class definition"):
        p = torch.tensor([[ids["bos"], *tok.encode(prompt).ids]])
        out = model.generate(p, 80, eos_id=ids["eos"])[0, 1:].tolist()
        samples.append((prompt, tok.decode(out)))
    for prompt, text in samples:
        print(f"--- sample (greedy, 80 tokens): {prompt!r}\n{text}\n", flush=True)

    total_wall, total_cpu = time.time() - t_start, time.process_time() - c_start
    size = (args.out / "model.safetensors").stat().st_size
    cmd = "python -m services.engine.default_model.train " + " ".join(
        a if " " not in a else repr(a) for a in (sys.argv[1:] if argv is None else argv))
    readme = f"""# Tandem embedded default model

A small Llama-architecture model (`LlamaForCausalLM`, fp32) trained from scratch, offline, on the
Python language reference bundled with CPython (`pydoc_data.topics`). It exists so that
`make run` prints readable text with no download. It writes Python-docs-flavoured English and
knows nothing else.

## How it was made

```
{cmd}
```

- seed: {args.seed}; torch {torch.__version__} with {args.threads} threads; Python {platform.python_version()}
- corpus: `pydoc_data.topics` of Python {platform.python_version()}: {len(docs)} topics in sorted-key
  order, prose paragraphs unwrapped to one line each and heading underlines dropped (indented
  grammar/code blocks verbatim), {n_chars:,} characters, each topic wrapped in
  `<|bos|>` ... `<|eos|>`; {len(data):,} tokens
- tokenizer: byte-level BPE (`tokenizers`, ByteLevel pre-tokenizer and decoder), vocab
  {cfg.vocab_size} incl. specials `<|bos|>`={ids['bos']}, `<|eos|>`={ids['eos']}, `<|pad|>`={ids['pad']}
- model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads
  (head_dim {cfg.head_dim}), {cfg.num_key_value_heads} KV head(s), MLP {cfg.intermediate_size},
  context {cfg.max_position_embeddings}, RoPE theta {cfg.rope_theta:g}, RMSNorm eps {cfg.rms_norm_eps:g}
- parameters: {n_params:,} trained (embedding tied to LM head during training);
  {n_params_ckpt:,} in the checkpoint (`lm_head.weight` stored as a copy, `tie_word_embeddings: false`)
- model.safetensors: {size:,} bytes ({size / 2**20:.1f} MiB)
- optimizer: AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak LR {args.lr:g}, linear
  warmup {args.warmup:.0%} then cosine to {args.min_lr_ratio:g}x, grad clip 1.0, batch {args.batch} x {args.ctx} tokens
- training: {step} steps ({step * args.batch * args.ctx:,} tokens, {step * args.batch * args.ctx / len(data):.1f} epochs),
  budget {args.minutes:g} min{f' / {args.steps} steps' if args.steps else ''}
- training time: {train_wall:.0f} s wall, {train_cpu:.0f} s CPU (process time; shared 2-core machine)
- whole script: {total_wall:.0f} s wall, {total_cpu:.0f} s CPU
- final loss: train {final_train:.4f} (mean of the last {len(last)} steps); whole-corpus
  {corpus_loss:.4f} (eval over non-overlapping {args.ctx}-token windows)

## Samples (greedy, 80 new tokens, prompt preceded by `<|bos|>`)
"""
    for prompt, text in samples:
        readme += f"\n**{prompt}**\n\n```\n{text}\n```\n"
    (args.out / "README.md").write_text(readme)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB weights); total {total_wall:.0f}s wall, "
          f"{total_cpu:.0f}s CPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
