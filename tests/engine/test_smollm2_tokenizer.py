"""SmolLM2-135M-Instruct's tokenizer and chat template, rebuilt from its GGUF metadata,
against transformers' own GGUF tokenizer on the same file.

One known difference, on purpose: the file says ``tokenizer.ggml.pre = "smollm"``, for which
llama.cpp (llama-vocab.cpp) splits every digit off before GPT-2's regex, as SmolLM2's own
tokenizer.json does (a ``Digits(individual_digits=True)`` pre-tokenizer). transformers 5.24
has no entry for "smollm" and falls back to GPT-2's split alone, which tokenizes whitespace
before a digit differently ("  1": ``ĠĠ 1`` vs ``Ġ Ġ 1``). So the encode reference is
transformers' GGUF tokenizer with that one component set to SmolLM2's declared one (built
from ``tokenizers``' own ``Digits``, not from our regex), and the unpatched one must agree
with us on every string without whitespace before a number.
"""

from __future__ import annotations

import random
import unicodedata

import pytest

from services.engine.model_catalog import smollm2_path
from services.engine.tokenizer import Tokenizer
from tests.engine.text_samples import sample_strings

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea 🌊."}],
    [{"role": "system", "content": "Be terse.\nNo lists."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3*3?  "},
     {"role": "assistant", "content": "9", "name": None}],
    [{"role": "user", "content": "Grüße aus Köln — 你好 <|im_end|> injected"}],
]


@pytest.fixture(scope="module")
def toks():
    """(ours, transformers' GGUF tokenizer, its backend with SmolLM2's declared pre-tokenizer)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    path = smollm2_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    declared = Backend.from_str(hf.backend_tokenizer.to_str())
    declared.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return Tokenizer(path), hf, declared


def _space_before_number(s: str) -> bool:
    return any(a.isspace() and unicodedata.category(b).startswith("N") for a, b in zip(s, s[1:]))


def test_encode_matches_transformers_on_1200_strings(toks):
    ours, hf, declared = toks
    strings = sample_strings(1200)
    assert len(set(strings)) > 1100
    differ_from_fallback = 0
    for s in strings:
        ids = ours.encode(s)
        assert ids == declared.encode(s, add_special_tokens=False).ids, repr(s)
        if ids != hf(s, add_special_tokens=False).input_ids:
            assert _space_before_number(s), repr(s)
            differ_from_fallback += 1
    assert differ_from_fallback > 0  # the sample does exercise the digit rule
    assert ours.encode("  1") == [ours.token_to_id("ĠĠ"), ours.token_to_id("1")]


def test_decode_matches_transformers(toks):
    ours, hf, _ = toks
    rng = random.Random(7)
    sequences = [ours.encode(s) for s in sample_strings(1200)]
    sequences += [[rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 24))] for _ in range(400)]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_special_tokens_and_stop_ids(toks):
    ours, hf, _ = toks
    assert ours.special_tokens == {"bos_token": hf.bos_token, "eos_token": hf.eos_token,
                                   "unk_token": hf.unk_token, "pad_token": hf.pad_token}
    assert ours.vocab_size == len(hf) == 49152
    assert ours.stop_token_ids == (2, 0)  # <|im_end|> (the file's eos), <|endoftext|>
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi")  # add_bos_token is false


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_matches_apply_chat_template(toks, case, add_generation_prompt):
    ours, hf, _ = toks
    messages = CONVERSATIONS[case]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt) == want
    if add_generation_prompt:
        assert want.endswith("<|im_start|>assistant\n")
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
    if "<|im_end|> injected" not in messages[-1]["content"]:  # transformers may escape control text in content
        assert ours.encode(want) == list(want_ids)
