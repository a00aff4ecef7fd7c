"""Test helper: write a GGUF file from a make_model checkpoint, the way llama.cpp's
convert_hf_to_gguf.py does (independently of the engine's GGUF reader), plus the
safetensors folder holding exactly the weights the GGUF file encodes.

- metadata: ``{arch}.*`` keys and ``tokenizer.ggml.*`` from tokenizer.json (tokens by id,
  merges, token types: special added tokens CONTROL, the rest NORMAL);
- tensor names: llama.cpp's (``blk.N.attn_q.weight``, ``token_embd.weight``, ...);
- Q/K rows of ``llama`` files permuted into GGML's rope order (``permute`` below);
- 2-D weights stored as ``tensor_type``, norms as F32. Types ``gguf.quants.quantize``
  implements are quantized from the weights; for the K-quants (gguf-py only dequantizes
  them) each row gets random blocks with sane scales. Rows are quantized in HF order and the
  stored rows then permuted (quantization is per row, so this equals quantizing the permuted
  matrix); the reference folder holds ``dequantize(rows)`` in HF order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# K-quants: byte offsets of the float16 scale fields (d, dmin) inside one block, and the
# largest d drawn (values come out within about +-0.1 .. 0.2)
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
K_MAX_D = {"Q2_K": 1e-3, "Q3_K": 5e-4, "Q4_K": 1e-4, "Q5_K": 5e-5, "Q6_K": 2e-5}


def gguf_name(hf: str) -> str:
    if hf in GLOBAL:
        return GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)  # model.layers.N.<module>.<leaf>
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK[module]}.{leaf}"


def permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF rotate-half rows -> GGML interleaved rope rows."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def encode_rows(w: np.ndarray, type_name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(stored rows for ``type_name``, their float32 values) for a [rows, cols] float32 matrix."""
    if type_name == "F32":
        return w, w
    if type_name == "F16":
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in K_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for off in K_SCALES[type_name]:
            scale = rng.uniform(K_MAX_D[type_name] / 2, K_MAX_D[type_name], blocks.shape[:2]).astype(np.float16)
            blocks[:, :, off:off + 2] = scale[..., None].view(np.uint8).reshape(*blocks.shape[:2], 2)
        q = blocks.reshape(w.shape[0], -1)
    else:
        q = gguf.quants.quantize(w, qtype)
    return q, gguf.quants.dequantize(q, qtype).astype(np.float32)


def write_gguf(src: Path, out_file: Path, ref_dir: Path, type_name: str = "F32", arch: str = "llama", *,
               pre: str = "gpt2", chat_template: str | None = None, tied: bool = False, seed: int = 0,
               extra_tensors: dict[str, tuple[np.ndarray, str]] | None = None,
               metadata_overrides: dict | None = None) -> Path:
    """Convert the make_model checkpoint ``src`` into ``out_file``; write the reference folder."""
    config = json.loads((src / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    tensors = {k: v.float().numpy() for k, v in load_file(src / "model.safetensors").items()}
    if tied:
        tensors.pop("lm_head.weight")
        config["tie_word_embeddings"] = True
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out_file), arch)
    _write_config(w, config, arch)
    _write_tokenizer(w, src, pre, chat_template)
    for key, value in (metadata_overrides or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    reference = {}
    for name, t in sorted(tensors.items()):
        if t.ndim == 1:
            stored, values = t, t
        else:
            stored, values = encode_rows(t, type_name, rng)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            stored = permute(stored, heads if ".q_proj." in name else kv_heads)
        kwargs = {"raw_dtype": gguf.GGMLQuantizationType[type_name]} if stored.dtype == np.uint8 else {}
        w.add_tensor(gguf_name(name), np.ascontiguousarray(stored), **kwargs)
        reference[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    for name, (stored, tname) in (extra_tensors or {}).items():
        w.add_tensor(name, stored, raw_dtype=gguf.GGMLQuantizationType[tname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _write_reference(src, ref_dir, config, reference)
    return out_file


def _write_config(w: gguf.GGUFWriter, c: dict, arch: str) -> None:
    heads = c["num_attention_heads"]
    w.add_name("tiny test model")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c.get("num_key_value_heads", heads))
    w.add_rope_freq_base(c.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // heads)
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(0)


def _write_tokenizer(w: gguf.GGUFWriter, src: Path, pre: str, chat_template: str | None) -> None:
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {t["content"] for t in tj["added_tokens"] if t["special"]}
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|bos|>"])
    w.add_eos_token_id(vocab["<|eos|>"])
    w.add_pad_token_id(vocab["<|pad|>"])
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _write_reference(src: Path, ref_dir: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    ref_dir.mkdir(parents=True, exist_ok=True)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, ref_dir / name)
    (ref_dir / "config.json").write_text(json.dumps(config))
    save_file(tensors, ref_dir / "model.safetensors", metadata={"format": "pt"})
