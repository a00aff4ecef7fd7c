"""Hugging Face transformers as the numeric oracle (test-only dependency)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # run the full length, like ignore_eos
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy ``generate`` with EOS disabled -> (new token ids, log-softmax of each chosen token)."""
    from transformers import GenerationConfig

    model = hf_model(path)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), generation_config=cfg, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
    return new, logprobs
