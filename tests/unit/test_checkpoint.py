"""Checkpoint reading, config parsing and their error messages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine.checkpoint import (CheckpointError, CheckpointReader, checkpoint_fingerprint,
                                        iter_safetensors, weight_files)
from services.engine.make_model import SHAPES, hf_tensor_shapes, list_models, make_model
from services.engine.model.registry import load_model
from services.engine.model_config import ModelConfig


@pytest.fixture
def tiny(tmp_path):
    return make_model("tiny-llama", tmp_path / "tiny-llama")


def _rewrite(path, edit) -> None:
    """Apply ``edit(tensors)`` to the single-file checkpoint at ``path``."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def test_unsupported_architecture_is_named(tiny):
    _edit_config(tiny, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"config.json: architectures=\['GPT2LMHeadModel'\] is not supported"):
        ModelConfig.from_pretrained(tiny)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(tiny)


def test_missing_config_field_is_named(tiny):
    raw = json.loads((tiny / "config.json").read_text())
    del raw["num_attention_heads"]
    (tiny / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'num_attention_heads'"):
        ModelConfig.from_pretrained(tiny)


def test_invalid_config_value_is_named(tiny):
    _edit_config(tiny, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        ModelConfig.from_pretrained(tiny)
    _edit_config(tiny, num_key_value_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        ModelConfig.from_pretrained(tiny)


def test_no_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config.json: not found"):
        weight_files(tmp_path)


def test_no_safetensors(tiny):
    (tiny / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tiny)


def test_missing_tensor_is_named(tiny):
    _rewrite(tiny, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        load_model(tiny)


def test_wrong_shape_names_tensor_expected_and_got(tiny):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    _rewrite(tiny, shrink)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[16, 64\], "
                                              r"expected \[32, 64\]"):
        load_model(tiny)


def test_unexpected_tensor_is_named(tiny):
    _rewrite(tiny, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\).*model.layers.0.mlp.extra.weight"):
        load_model(tiny)


def test_missing_shard_is_named(tmp_path):
    path = make_model("tiny-llama3", tmp_path / "m")  # written as 2 shards
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard.*model-00002-of-00002.safetensors"):
        load_model(path)


def test_corrupt_header_names_file(tiny):
    (tiny / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors file"):
        load_model(tiny)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint_fingerprint(tiny)


def test_iter_safetensors_covers_every_shard(tmp_path):
    path = make_model("tiny-qwen2-moe", tmp_path / "m")
    config = ModelConfig.from_pretrained(path)
    got = {name: tuple(t.shape) for name, t in iter_safetensors(path)}
    assert len(weight_files(path)) == 3
    assert got == hf_tensor_shapes(config)


def test_fingerprint_is_stable_and_distinguishes_models(tmp_path):
    a = make_model("tiny-llama", tmp_path / "a")
    b = make_model("tiny-mistral", tmp_path / "b")
    c = make_model("tiny-llama", tmp_path / "c", seed=7)
    fa = checkpoint_fingerprint(a)
    assert fa == checkpoint_fingerprint(a) == checkpoint_fingerprint(tmp_path / "a")
    assert len(fa) == 64 and int(fa, 16) >= 0
    assert fa != checkpoint_fingerprint(b)
    assert fa != checkpoint_fingerprint(c)  # make_model records the seed in the header metadata


def test_reader_checks_shapes(tiny):
    with CheckpointReader(tiny) as reader:
        assert reader.shape("model.norm.weight") == (64,)
        with pytest.raises(CheckpointError, match="expected"):
            reader.get("model.norm.weight", (65,))


def test_config_parsing_variants(tmp_path):
    qwen2 = ModelConfig.from_pretrained(make_model("tiny-qwen2", tmp_path / "q2"))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.sliding_window is None
    assert qwen2.eos_token_ids == (1, 3)  # list from generation_config.json
    qwen3 = ModelConfig.from_pretrained(make_model("tiny-qwen3", tmp_path / "q3"))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.rope_theta == 1e6 and qwen3.tie_word_embeddings
    llama3 = ModelConfig.from_pretrained(make_model("tiny-llama3", tmp_path / "l3"))
    assert llama3.rope_scaling["rope_type"] == "llama3" and llama3.rope_theta == 500000.0
    moe = ModelConfig.from_pretrained(make_model("tiny-qwen2-moe", tmp_path / "q2m"))
    assert [moe.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert moe.shared_expert_intermediate_size == 96 and not moe.norm_topk_prob
    mixtral = ModelConfig.from_pretrained(make_model("tiny-mixtral", tmp_path / "mx"))
    assert mixtral.num_experts == 4 and mixtral.moe_intermediate_size == 128 and mixtral.norm_topk_prob


def test_config_from_dict_defaults():
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100,
            "intermediate_size": 128, "eos_token_id": 5}
    c = ModelConfig.from_dict(dict(base, architectures=["MistralForCausalLM"], sliding_window=None))
    assert c.sliding_window is None and c.num_kv_heads == 4 and c.head_dim == 16 and c.eos_token_ids == (5,)
    q = ModelConfig.from_dict(dict(base, architectures=["Qwen2ForCausalLM"], sliding_window=32))
    assert q.sliding_window is None  # only with use_sliding_window
    q = ModelConfig.from_dict(dict(base, architectures=["Qwen2ForCausalLM"], sliding_window=32,
                                   use_sliding_window=True, max_window_layers=0))
    assert q.sliding_window == 32
    with pytest.raises(ValueError, match="mix of sliding and full"):
        ModelConfig.from_dict(dict(base, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                   max_window_layers=1))
    linear = ModelConfig.from_dict(dict(base, architectures=["LlamaForCausalLM"],
                                        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5.0}))
    assert linear.rope_theta == 5.0 and linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_named_shapes():
    assert {"tiny-llama", "dense-100m", "qwen2.5-0.5b", "tiny-moe"} <= set(list_models())
    dense = ModelConfig.from_dict(dict(SHAPES["dense-100m"].config, architectures=["LlamaForCausalLM"]))
    n_params = sum(torch.Size(s).numel() for s in hf_tensor_shapes(dense).values())
    assert round(n_params / 1e6, 1) == 99.5
