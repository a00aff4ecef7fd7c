"""GGUF files written by the test (tests/engine/gguf_convert.py, llama.cpp's layout and Q/K
permutation) load into exactly the weights they encode: for every supported tensor type the
parameters equal those loaded from a safetensors folder holding the dequantized weights, and
the engine's logprobs match within 1e-4. Unsupported files fail with errors naming the cause.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from services.engine import LLM, SamplingParams
from services.engine.checkpoint import CheckpointError, checkpoint_fingerprint
from services.engine.gguf_file import SUPPORTED_TENSOR_TYPES
from services.engine.make_model import make_model
from services.engine.model.registry import load_model
from services.engine.model_catalog import check_model_path
from services.engine.model_config import ModelConfig
from services.engine.tokenizer import Tokenizer
from tests.engine.gguf_convert import write_gguf
from tests.engine.text_samples import sample_strings

# hidden and MLP widths are multiples of 256 so that every row holds whole K-quant blocks
WIDE = {"hidden_size": 256, "intermediate_size": 512}
PROMPTS = [[5, 17, 99, 230, 41, 7, 300, 12, 64, 65, 66], [400, 3, 8, 150, 22]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Checkpoints converted from: a llama with K-quant-friendly widths, and a Qwen2 (biases)."""
    root = tmp_path_factory.mktemp("gguf-src")
    return {"llama": make_model("tiny-llama", root / "llama", seed=3, overrides=WIDE),
            "qwen2": make_model("tiny-qwen2", root / "qwen2", seed=4)}


def _convert(sources, tmp_path, type_name: str, arch: str = "llama", **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out, ref = tmp_path / f"{type_name}.gguf", tmp_path / f"{type_name}-ref"
    write_gguf(sources[arch], out, ref, type_name, arch, **kw)
    return out, ref


def _same_parameters(a, b) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def _generate(path):
    llm = LLM(str(path), device="cpu", num_kv_blocks=16, block_size=8, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=20)
    return llm.generate(PROMPTS, params)


def _assert_same_outputs(ours, ref) -> None:
    for a, b in zip(ours, ref):
        assert a.token_ids == b.token_ids
        for da, db in zip(a.logprobs, b.logprobs):
            assert da.keys() == db.keys()
            assert max(abs(da[t] - db[t]) for t in da) < 1e-4


@pytest.mark.parametrize("type_name", SUPPORTED_TENSOR_TYPES)
def test_every_tensor_type_loads_the_weights_it_encodes(sources, tmp_path, type_name):
    gguf_file, ref = _convert(sources, tmp_path, type_name)
    _same_parameters(load_model(gguf_file), load_model(ref))
    _assert_same_outputs(_generate(gguf_file), _generate(ref))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_with_biases(sources, tmp_path, tied):
    gguf_file, ref = _convert(sources, tmp_path, "Q8_0", "qwen2", tied=tied)
    config = ModelConfig.from_gguf(gguf_file)
    assert config.architecture == "Qwen2ForCausalLM" and config.attention_bias and config.tie_word_embeddings == tied
    _same_parameters(load_model(gguf_file), load_model(ref))
    _assert_same_outputs(_generate(gguf_file), _generate(ref))


def test_tied_llama_and_config_fields(sources, tmp_path):
    gguf_file, ref = _convert(sources, tmp_path, "Q4_K", tied=True)
    ours, want = ModelConfig.from_gguf(gguf_file), ModelConfig.from_pretrained(ref)
    fields = ["architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "rope_theta", "max_position_embeddings", "tie_word_embeddings", "bos_token_id"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(want, f) for f in fields}
    assert ours.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as float32
    assert ours.eos_token_ids == (1, 3)  # <|eos|>, then <|im_end|>: a CONTROL end-of-turn token
    _same_parameters(load_model(gguf_file), load_model(ref))


def test_transformers_reads_the_converted_file_as_the_original(sources, tmp_path):
    """The converter's permutation is llama.cpp's: transformers' own GGUF loader undoes it."""
    from transformers import AutoModelForCausalLM

    gguf_file, ref = _convert(sources, tmp_path, "F32")
    hf_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    hf_ref = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(hf_gguf(ids).logits, hf_ref(ids).logits, atol=1e-4, rtol=0)


def test_fingerprint_covers_the_file(sources, tmp_path):
    a, _ = _convert(sources, tmp_path / "a", "Q8_0")
    b, _ = _convert(sources, tmp_path / "b", "Q8_0", metadata_overrides={"general.description": "other"})
    c, _ = _convert(sources, tmp_path / "c", "Q4_0")
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(a)
    assert len({checkpoint_fingerprint(p) for p in (a, b, c)}) == 3
    assert checkpoint_fingerprint(a) not in {checkpoint_fingerprint(sources["llama"])}


def test_unsupported_architecture_is_named(sources, tmp_path):
    gguf_file = write_gguf(sources["llama"], tmp_path / "falcon.gguf", tmp_path / "ref", "F32", "falcon")
    with pytest.raises(ValueError, match="GGUF architecture 'falcon' is not supported; supported: llama, qwen2"):
        load_model(gguf_file)


def test_unsupported_tensor_type_is_named(sources, tmp_path):
    extra = gguf.quants.quantize(np.zeros((4, 256), np.float32), gguf.GGMLQuantizationType.TQ2_0)
    gguf_file, _ = _convert(sources, tmp_path, "F32", extra_tensors={"blk.0.extra.weight": (extra, "TQ2_0")})
    with pytest.raises(ValueError, match=r"tensor 'blk.0.extra.weight' has GGML type TQ2_0, which is not supported"):
        load_model(gguf_file)


def test_unknown_tensor_is_named(sources, tmp_path):
    extra = gguf.quants.quantize(np.zeros((4, 256), np.float32), gguf.GGMLQuantizationType.Q8_0)
    gguf_file, _ = _convert(sources, tmp_path, "F32", extra_tensors={"blk.0.attn_gate.weight": (extra, "Q8_0")})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\).*'blk.0.attn_gate.weight'"):
        load_model(gguf_file)


def test_rope_freqs_and_missing_keys_are_named(sources, tmp_path):
    freqs = np.ones((32,), np.float32).view(np.uint8)
    gguf_file, _ = _convert(sources, tmp_path, "F32", extra_tensors={"rope_freqs.weight": (freqs, "F32")})
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        ModelConfig.from_gguf(gguf_file)
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="'llama.attention.head_count' is missing"):
        ModelConfig.from_gguf(bad)


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(fake)
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_model_path(fake)
    with pytest.raises(ValueError, match="no GGUF file"):
        check_model_path(tmp_path / "missing.gguf")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ValueError, match="corrupt or unsupported GGUF file"):
        ModelConfig.from_gguf(truncated)


def test_tokenizer_and_chat_template_from_metadata(sources, tmp_path):
    template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    gguf_file, ref = _convert(sources, tmp_path, "F32", chat_template=template)
    ours, want = Tokenizer(gguf_file), Tokenizer(ref)
    text = "def f(x):\n    return x  +  1  # <|im_end|> done\n\n"
    assert ours.encode(text) == want.encode(text) and ours.vocab_size == want.vocab_size
    ids = want.encode(text)
    assert ours.decode(ids) == want.decode(ids) and ours.decode(ids, False) == want.decode(ids, False)
    assert ours.special_tokens == {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|bos|>user: hi<|im_end|>"
    assert ours.stop_token_ids == (1, 3)  # <|eos|>, and <|im_end|> (a CONTROL end-of-turn token)
    assert ModelConfig.from_gguf(gguf_file).eos_token_ids == (1, 3)
    assert json.loads((ref / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_pre_tokenizer_splits_match_transformers(sources, tmp_path, pre):
    """llama.cpp's regex split per ``tokenizer.ggml.pre`` = transformers' GGUF table entry.

    The tiny file names no unk token, so transformers adds GPT2Tokenizer's default
    "<|endoftext|>" as a new id past the vocabulary; strings holding that text are left out."""
    from transformers import AutoTokenizer

    gguf_file, _ = _convert(sources, tmp_path, "F32", pre=pre)
    ours, hf = Tokenizer(gguf_file), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_file.name)
    assert len(hf) == ours.vocab_size + 1 and hf.convert_tokens_to_ids("<|endoftext|>") == ours.vocab_size
    strings = [s for s in sample_strings(400, seed=len(pre)) if "<|endoftext|>" not in s]
    assert len(strings) > 300
    for s in strings:
        assert ours.encode(s) == hf(s, add_special_tokens=False).input_ids, repr(s)
