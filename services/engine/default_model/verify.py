"""Check a written checkpoint against transformers (a test-only dependency).

    python -m services.engine.default_model.verify [--dir services/engine/default_model/weights]

1. Loads the folder with ``AutoModelForCausalLM.from_pretrained`` and ``tokenizers.Tokenizer``
   and greedy-generates from a few prompts.
2. Loads the same safetensors into the training module (``train.Llama``) and compares its
   logits with transformers' on the same input (max abs diff must be < 1e-4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import WEIGHTS_DIR
from .train import Llama, LlamaConfig

PROMPTS = ("The for statement", "A class definition", "The return statement", "An exception")


def load_training_module(path: Path) -> Llama:
    from safetensors.torch import load_file

    c = json.loads((path / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
        max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
    )
    model = Llama(cfg)
    sd = load_file(str(path / "model.safetensors"))
    lm_head = sd.pop("lm_head.weight")
    assert torch.equal(lm_head, sd["model.embed_tokens.weight"]), "lm_head differs from embedding"
    model.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, strict=True)
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(args.dir / "tokenizer.json"))
    hf = AutoModelForCausalLM.from_pretrained(str(args.dir), dtype=torch.float32).eval()
    ours = load_training_module(args.dir)
    bos = hf.config.bos_token_id
    eos = hf.config.eos_token_id

    # Equivalence on a full-context input taken from the tokenized prompts + generations.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, hf.config.vocab_size, (2, hf.config.max_position_embeddings), generator=g)
    with torch.no_grad():
        a = ours(x)
        b = hf(input_ids=x).logits
    diff = (a - b).abs().max().item()
    print(f"logits max abs diff (ours vs transformers, {tuple(x.shape)}): {diff:.3e}")

    ok = diff < 1e-4
    for prompt in PROMPTS:
        ids = torch.tensor([[bos, *tok.encode(prompt).ids]])
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)
            mine = ours.generate(ids, args.max_new_tokens, eos_id=eos)
        same = out[0].tolist() == mine[0].tolist()
        ok &= same
        print(f"--- {prompt!r} (transformers greedy; matches training module: {same})")
        print(tok.decode(out[0, 1:].tolist()))
        print()
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
