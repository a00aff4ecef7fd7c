"""SmolLM2-135M-Instruct from its GGUF file (Q4_1 / Q8_0 dequantized to fp32) against
transformers loading the same file (``from_pretrained(folder, gguf_file=name)``, which
dequantizes it the same way): greedy token ids identical and top-1 logprobs within 1e-4 for
chat and plain prompts x 64 new tokens, submitted together and staggered, under a small token
budget so that prefill is chunked and mixed with decodes."""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM, SamplingParams
from services.engine.model_catalog import smollm2_path

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 64
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."},
     {"role": "assistant", "content": "def reverse(s):\n    return s[::-1]"},
     {"role": "user", "content": "Now make it handle None by returning an empty string."}],
]
PLAIN = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" + "    # iterative version\n" * 30,
]


@pytest.fixture(scope="module")
def llm():
    # token-exact is an fp32 property (dtype auto is bf16 on AVX512_BF16 CPUs: test_smollm2_bf16_vs_hf.py)
    return LLM(str(smollm2_path()), device="cpu", dtype="float32", max_num_batched_tokens=32, num_kv_blocks=96,
               block_size=16, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.tokenizer
    return [tok.encode(tok.apply_chat_template(c)) for c in CHATS] + [tok.encode(p) for p in PLAIN]


@pytest.fixture(scope="module")
def reference(prompts):
    """transformers' greedy continuation of every prompt: [(token ids, chosen-token logprobs)]."""
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # run the full length, like ignore_eos
    model.generation_config.pad_token_id = 0
    cfg = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                        pad_token_id=0, bos_token_id=None)
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), generation_config=cfg, output_logits=True,
                                 return_dict_in_generate=True)
            new = gen.sequences[0, len(ids):].tolist()
            out.append((new, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.logits, new)]))
    return out


def _check(outputs, reference) -> None:
    for (token_ids, logprobs), (want_ids, want_lp) in zip(outputs, reference):
        assert token_ids == want_ids
        got = [lp[t] for lp, t in zip(logprobs, token_ids)]
        assert max(abs(a - b) for a, b in zip(got, want_lp)) < 1e-4


def test_prompts_cover_chat_and_chunked_prefill(prompts):
    assert len(prompts) >= 6 and max(len(p) for p in prompts) > 4 * 32  # several 32-token chunks
    assert all(p[0] == 1 for p in prompts[:3])  # chat prompts open with <|im_start|>


def test_batch_together_matches_transformers(llm, prompts, reference):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    outputs = llm.generate(prompts, params)
    assert all(len(o.token_ids) == NEW_TOKENS for o in outputs)
    _check([(o.token_ids, o.logprobs) for o in outputs], reference)
    assert llm.engine.kv.num_free_blocks == 96


def test_staggered_arrivals_match_transformers(llm, prompts, reference):
    engine = llm.engine
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    reqs = []
    for ids in prompts:  # a new request every 5 steps, while earlier ones decode
        reqs.append(engine.add_request(ids, params))
        for _ in range(5):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    _check([(r.output_token_ids, r.logprobs) for r in reqs], reference)


def test_first_chat_answer_names_paris(llm, prompts):
    out = llm.generate(prompts[:1], SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop" and out.token_ids[-1] == 2  # <|im_end|>


def test_chat_is_generate_of_the_rendered_template(llm, prompts):
    """``LLM.chat`` = ``generate`` of the chat template's token ids, stopping at <|im_end|>."""
    params = SamplingParams(max_tokens=24, temperature=0)
    chats = llm.chat([CHATS[0], CHATS[2]], params)
    plain = llm.generate([prompts[0], prompts[2]], SamplingParams(max_tokens=24, temperature=0,
                                                                  stop_token_ids=llm.tokenizer.stop_token_ids))
    assert [c.prompt_token_ids for c in chats] == [prompts[0], prompts[2]]
    assert [c.token_ids for c in chats] == [p.token_ids for p in plain] and [c.text for c in chats] == [p.text for p in plain]
    assert "Paris" in chats[0].text and chats[0].finish_reason == "stop" and chats[0].stop_reason == 2
    assert llm.chat(CHATS[0], params)[0].token_ids == chats[0].token_ids  # one conversation, not a list of them
    ignoring = llm.chat(CHATS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert ignoring.token_ids == chats[0].token_ids  # the end-of-turn token still ends a chat turn
    with pytest.raises(ValueError, match=r"messages\[0\]\.content"):
        llm.chat([{"role": "user", "content": 3}], params)
