"""A GGUF file seen as a Hugging Face checkpoint: config.json-style fields and HF tensor names.

``gguf_config(file)`` maps the ``{arch}.*`` metadata keys to the config.json fields that
``ModelConfig.from_dict`` parses (so both formats share one validation), and
``GGUFCheckpointReader`` plays the role of ``CheckpointReader``: name -> tensor, in HF naming
(``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``), dequantized to
float32, so ``load_weights`` works unchanged.

Q/K row permutation: llama.cpp's converter (``LlamaModel.permute`` in convert_hf_to_gguf.py)
stores q_proj/k_proj rows of llama-family models in GGML's rope layout: per head, HF's
rotate-half layout ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` becomes interleaved pairs
``[x_0, y_0, x_1, y_1, ...]``. ``unpermute_rows`` undoes it (weights and biases). Qwen2
files are written without it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.engine.checkpoint import CheckpointError
from services.engine.gguf_file import GGUFFile, check_tensor_types, dequantize, read_gguf
from services.engine.gguf_tokenizer import end_of_generation_ids

# GGUF general.architecture -> HF architecture; "llama" files also carry Mistral-style models
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# architectures whose converter permuted the Q/K rows
_PERMUTED = ("llama",)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_PARTS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """The HF checkpoint name of a GGUF tensor; names we do not know are returned unchanged
    (``load_weights`` then reports them as unexpected)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_NAME.match(gguf_name)
    if m and m.group(2) in _BLOCK_PARTS:
        return f"model.layers.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: [n_head * d, ...] in GGML rope order -> HF order."""
    d = t.shape[0] // n_head
    if d * n_head != t.shape[0] or d % 2:
        raise CheckpointError(f"cannot un-permute {t.shape[0]} rows into {n_head} heads of even width")
    return t.reshape(n_head, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class _Meta:
    """Typed reads of ``{arch}.*`` keys; errors name the GGUF key and the file."""

    def __init__(self, file: GGUFFile):
        self.file, self.prefix = file, file.architecture + "."

    def int_(self, key: str, default: int | None = None) -> int:
        value = self.file.get(self.prefix + key, default)
        if value is None:
            self.file.require(self.prefix + key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{self.file.path}: GGUF metadata {self.prefix + key}={value!r} "
                                  "must be a positive integer")
        return value

    def float_(self, key: str, default: float | None = None) -> float:
        value = self.file.get(self.prefix + key, default)
        if value is None:
            self.file.require(self.prefix + key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{self.file.path}: GGUF metadata {self.prefix + key}={value!r} "
                                  "must be a positive number")
        return float(value)


def gguf_config(file: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json fields, generation_config.json fields) described by a GGUF file's metadata."""
    arch = file.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{file.path}: GGUF architecture {arch!r} is not supported; "
                              f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    meta = _Meta(file)
    heads = meta.int_("attention.head_count")
    hidden = meta.int_("embedding_length")
    head_dim = meta.int_("attention.key_length", default=hidden // heads if hidden % heads == 0 else None)
    if meta.int_("attention.value_length", default=head_dim) != head_dim:
        raise CheckpointError(f"{file.path}: {arch}.attention.value_length != key_length is not supported")
    if meta.int_("rope.dimension_count", default=head_dim) != head_dim:
        raise CheckpointError(f"{file.path}: {arch}.rope.dimension_count={file.get(arch + '.rope.dimension_count')} "
                              f"!= head dim {head_dim} (partial rotary embeddings) is not supported")
    raw = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": _vocab_size(file),
        "hidden_size": hidden,
        "num_hidden_layers": meta.int_("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.int_("attention.head_count_kv", default=heads),
        "head_dim": head_dim,
        "intermediate_size": meta.int_("feed_forward_length"),
        "rms_norm_eps": meta.float_("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.float_("rope.freq_base", default=10000.0),
        "rope_scaling": _rope_scaling(file, meta),
        "max_position_embeddings": meta.int_("context_length"),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "attention_bias": "blk.0.attn_q.bias" in file.tensors,
    }
    bos = file.get("tokenizer.ggml.bos_token_id")
    return raw, {"eos_token_id": end_of_generation_ids(file), "bos_token_id": bos}


def _vocab_size(file: GGUFFile) -> int:
    tokens = file.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    if "token_embd.weight" in file.tensors:
        return file.tensors["token_embd.weight"].shape[0]
    return _Meta(file).int_("vocab_size")


def _rope_scaling(file: GGUFFile, meta: _Meta) -> dict | None:
    if "rope_freqs.weight" in file.tensors:
        raise CheckpointError(f"{file.path}: per-frequency rope factors (tensor 'rope_freqs.weight', "
                              "Llama 3.1-style rope scaling) are not supported")
    kind = file.get(meta.prefix + "rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta.float_("rope.scaling.factor")}
    raise CheckpointError(f"{file.path}: {meta.prefix}rope.scaling.type={kind!r} is not supported "
                          "(supported: none, linear)")


class GGUFCheckpointReader:
    """Name-addressed access to a GGUF file's tensors in HF naming and layout, dequantized to
    float32; same interface as ``CheckpointReader``. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = read_gguf(self.path)
        config, _ = gguf_config(self.file)  # validates the architecture
        check_tensor_types(self.file)
        self._permute = self.file.architecture in _PERMUTED
        self._heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        self._where = {}  # HF name -> GGUF tensor info
        for info in self.file.tensors.values():
            name = hf_tensor_name(info.name)
            if name in self._where:
                raise CheckpointError(f"{self.path}: tensors {self._where[name].name!r} and {info.name!r} "
                                      f"both map to {name!r}")
            self._where[name] = info
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __enter__(self) -> "GGUFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._where.clear()
        self._data = None

    def names(self) -> set[str]:
        """Every tensor name, in HF naming."""
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._locate(name).shape

    def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor ``name`` (HF naming and row order), float32 on CPU; shape-checked when
        ``expected_shape`` is given (before anything is dequantized)."""
        info = self._locate(name)
        if expected_shape is not None and info.shape != tuple(expected_shape):
            raise CheckpointError(f"{self.path}: tensor {info.name!r} ({name!r}) has shape {list(info.shape)}, "
                                  f"expected {list(expected_shape)}")
        t = dequantize(self._data, info)
        proj = name.rsplit(".", 2)[-2]
        if self._permute and proj in self._heads:
            t = unpermute_rows(t, self._heads[proj])
        return t

    def _locate(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return self._where[name]
