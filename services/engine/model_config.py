"""The model's shape and flags, parsed once from a Hugging Face checkpoint folder or a GGUF file.

``ModelConfig.from_pretrained(path)`` reads ``config.json`` (and ``generation_config.json``
when present), ``ModelConfig.from_gguf(file)`` the metadata of a GGUF file (mapped to the same
config.json fields by ``services.engine.gguf_checkpoint``); both normalize the differences
between the supported architectures into one flat, frozen record that drives the generic
decoder in ``services.engine.model.decoder``.
Defaults for absent optional keys follow the corresponding ``transformers`` config class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.engine.checkpoint import CheckpointError
from services.engine.gguf_checkpoint import gguf_config
from services.engine.gguf_file import is_gguf_path, read_gguf

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
QWEN_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# rope_theta used by transformers when config.json has none
_DEFAULT_ROPE_THETA = {"MixtralForCausalLM": 1_000_000.0}
# rms_norm_eps used by transformers when config.json has none
_DEFAULT_RMS_EPS = {"MixtralForCausalLM": 1e-5}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a checkpoint's model (no weights)."""

    architecture: str  # HF class name, one of SUPPORTED_ARCHITECTURES
    vocab_size: int  # rows of embed_tokens / lm_head
    hidden_size: int  # residual stream width D
    num_layers: int  # decoder layers (num_hidden_layers)
    num_heads: int  # query heads H
    num_kv_heads: int  # key/value heads Hkv (GQA); H % Hkv == 0
    head_dim: int  # per-head width; config "head_dim" or hidden_size // num_heads
    intermediate_size: int  # dense MLP width (MoE checkpoints: width of their dense layers)
    rms_norm_eps: float  # epsilon of every RMSNorm
    rope_theta: float  # rotary base
    rope_scaling: dict | None = field(hash=False)  # {"rope_type": "linear"|"llama3", ...}; None = default rope
    max_position_embeddings: int  # longest position the rotary cache covers
    tie_word_embeddings: bool  # lm_head shares embed_tokens' weight
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2: always)
    o_proj_bias: bool  # o_proj carries a bias (Llama attention_bias=true only)
    qk_norm: bool  # per-head RMSNorm on q and k before rope (Qwen3, Qwen3-MoE)
    sliding_window: int | None  # attend to at most this many latest tokens; None = full causal
    num_experts: int  # routed experts per MoE layer; 0 = dense model
    num_experts_per_tok: int  # top-k experts per token (0 for dense)
    moe_intermediate_size: int  # width of one routed expert (Mixtral: intermediate_size)
    shared_expert_intermediate_size: int  # Qwen2-MoE always-on shared expert width; 0 = none
    norm_topk_prob: bool  # renormalize the top-k router probabilities to sum to 1
    decoder_sparse_step: int  # layer i is MoE when (i + 1) % step == 0 (and not MLP-only)
    mlp_only_layers: tuple[int, ...]  # layers forced to use the dense MLP
    eos_token_ids: tuple[int, ...]  # generation stops on any of these
    bos_token_id: int | None  # beginning-of-sequence id, None when the model has none
    torch_dtype: str | None  # dtype the weights were saved in ("bfloat16", ...), informational

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """True when decoder layer ``layer`` routes tokens to experts instead of a dense MLP."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Parse ``path/config.json`` (+ ``generation_config.json``). Raises ValueError."""
        path = Path(path)
        raw = _read_json(path / "config.json", required=True)
        generation = _read_json(path / "generation_config.json", required=False)
        return cls.from_dict(raw, generation, source=str(path / "config.json"))

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelConfig":
        """``from_gguf`` for a ``.gguf`` file, else ``from_pretrained`` of a checkpoint folder."""
        return cls.from_gguf(path) if is_gguf_path(path) else cls.from_pretrained(path)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ModelConfig":
        """Parse the ``{arch}.*`` and ``tokenizer.ggml.*`` metadata of a GGUF file; eos ids are
        llama.cpp's end-of-generation set (eos, eot, end-of-turn control tokens). Raises ValueError."""
        raw, generation = gguf_config(read_gguf(path))
        return cls.from_dict(raw, generation, source=f"{path} (GGUF metadata)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None,
                  source: str = "config.json") -> "ModelConfig":
        """Build from parsed config.json / generation_config.json contents."""
        return _Parser(raw, generation or {}, source).parse()


def _read_json(file: Path, required: bool) -> dict[str, Any] | None:
    if not file.is_file():
        if required:
            raise CheckpointError(f"{file}: not found (a checkpoint folder needs config.json)")
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


class _Parser:
    """Reads one raw config dict; every error names the key and the source file."""

    def __init__(self, raw: dict[str, Any], generation: dict[str, Any], source: str):
        self.raw, self.generation, self.source = raw, generation, source

    def fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.source}: {msg}")

    def int_(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.raw.get(key)
        value = default if value is None else value
        if value is None:
            raise self.fail(f"missing required field {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"{key}={value!r} must be an integer >= {minimum}")
        return value

    def float_(self, key: str, default: float) -> float:
        value = self.raw.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(f"{key}={value!r} must be a positive number")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"{key}={value!r} must be true or false")
        return value

    def architecture(self) -> str:
        archs = self.raw.get("architectures")
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise self.fail(f"architectures={archs!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        return archs[0]

    def parse(self) -> ModelConfig:
        arch = self.architecture()
        if self.raw.get("hidden_act", "silu") != "silu":
            raise self.fail(f"hidden_act={self.raw['hidden_act']!r} is not supported (only 'silu')")
        if self.raw.get("mlp_bias", False):
            raise self.fail("mlp_bias=true is not supported")
        hidden = self.int_("hidden_size")
        heads = self.int_("num_attention_heads")
        kv_heads = self.int_("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise self.fail(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if arch == "Qwen3ForCausalLM":  # transformers' Qwen3Config defaults head_dim to 128
            head_dim = self.int_("head_dim", default=128)
        elif self.raw.get("head_dim") is None and hidden % heads:
            raise self.fail(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        else:
            head_dim = self.int_("head_dim", default=hidden // heads)
        num_layers = self.int_("num_hidden_layers")
        theta, scaling = self.rope(arch)
        moe = self.moe(arch, num_layers)
        return ModelConfig(
            architecture=arch,
            vocab_size=self.int_("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=self.int_("intermediate_size"),
            rms_norm_eps=self.float_("rms_norm_eps", _DEFAULT_RMS_EPS.get(arch, 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=self.int_("max_position_embeddings", default=2048),
            tie_word_embeddings=self.bool_("tie_word_embeddings", False),
            sliding_window=self.sliding_window(arch, num_layers),
            **self.attention_flags(arch),
            **moe,
            **self.special_tokens(),
            torch_dtype=self.raw.get("torch_dtype") or self.raw.get("dtype"),
        )

    def attention_flags(self, arch: str) -> dict[str, bool]:
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        elif arch == "Qwen2MoeForCausalLM":
            qkv_bias, o_bias = self.bool_("qkv_bias", True), False
        elif arch in ("MistralForCausalLM", "MixtralForCausalLM"):
            qkv_bias = o_bias = False
        else:  # Llama, Qwen3, Qwen3-MoE: one flag for q/k/v/o
            qkv_bias = o_bias = self.bool_("attention_bias", False)
        return {"attention_bias": qkv_bias, "o_proj_bias": o_bias,
                "qk_norm": arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")}

    def rope(self, arch: str) -> tuple[float, dict | None]:
        """(rope_theta, rope_scaling) from classic keys or transformers-5 ``rope_parameters``."""
        params = self.raw.get("rope_parameters") or self.raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise self.fail(f"rope_parameters/rope_scaling={params!r} must be an object")
        theta = params.get("rope_theta", self.raw.get("rope_theta", _DEFAULT_ROPE_THETA.get(arch, 10000.0)))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise self.fail(f"rope_theta={theta!r} must be a positive number")
        if params.get("partial_rotary_factor", self.raw.get("partial_rotary_factor", 1.0)) != 1.0:
            raise self.fail("partial_rotary_factor != 1 is not supported")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise self.fail(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type == "default":
            return float(theta), None
        scaling = {"rope_type": rope_type, "factor": params.get("factor")}
        required = ["factor"]
        if rope_type == "llama3":
            scaling.update(low_freq_factor=params.get("low_freq_factor"),
                           high_freq_factor=params.get("high_freq_factor"),
                           original_max_position_embeddings=params.get(
                               "original_max_position_embeddings",
                               self.raw.get("original_max_position_embeddings",
                                            self.raw.get("max_position_embeddings"))))
            required += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
        for key in required:
            if not isinstance(scaling[key], (int, float)) or isinstance(scaling[key], bool):
                raise self.fail(f"rope_scaling.{key}={scaling[key]!r} must be a number for rope type {rope_type!r}")
        return float(theta), scaling

    def sliding_window(self, arch: str, num_layers: int) -> int | None:
        """One window for all layers, or None. Mixed full/sliding layer stacks are refused."""
        if arch == "LlamaForCausalLM":
            return None
        window = self.raw.get("sliding_window", 4096 if arch == "MistralForCausalLM" else None)
        if arch in QWEN_ARCHITECTURES:
            if not self.bool_("use_sliding_window", False):
                return None
            window = self.raw.get("sliding_window", 4096)
            layer_types = self.raw.get("layer_types") or self._qwen_layer_types(arch, num_layers)
            kinds = set(layer_types)
            if kinds == {"full_attention"}:
                return None
            if kinds != {"sliding_attention"}:
                raise self.fail("use_sliding_window with a mix of sliding and full attention layers "
                                f"(layer_types={layer_types}) is not supported")
        if window is None:
            return None
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise self.fail(f"sliding_window={window!r} must be a positive integer or null")
        return window

    def _qwen_layer_types(self, arch: str, num_layers: int) -> list[str]:
        """transformers' default layer_types for Qwen checkpoints with use_sliding_window."""
        mwl = self.raw.get("max_window_layers", 28)
        if arch == "Qwen3MoeForCausalLM":
            return ["sliding_attention"] * num_layers
        if arch == "Qwen2MoeForCausalLM":
            return ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(num_layers)]
        return ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]

    def moe(self, arch: str, num_layers: int) -> dict[str, Any]:
        dense = {"num_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0,
                 "shared_expert_intermediate_size": 0, "norm_topk_prob": False,
                 "decoder_sparse_step": 1, "mlp_only_layers": ()}
        if arch not in MOE_ARCHITECTURES:
            return dense
        if arch == "MixtralForCausalLM":
            experts = self.int_("num_local_experts", default=8)
            moe = dict(dense, num_experts=experts, num_experts_per_tok=self.int_("num_experts_per_tok", 2),
                       moe_intermediate_size=self.int_("intermediate_size"), norm_topk_prob=True)
        else:
            experts = self.int_("num_experts")
            moe = dict(dense, num_experts=experts,
                       num_experts_per_tok=self.int_("num_experts_per_tok", 4 if "Qwen2" in arch else 8),
                       moe_intermediate_size=self.int_("moe_intermediate_size"),
                       norm_topk_prob=self.bool_("norm_topk_prob", False),
                       decoder_sparse_step=self.int_("decoder_sparse_step", 1),
                       mlp_only_layers=self.layer_list("mlp_only_layers", num_layers))
            if arch == "Qwen2MoeForCausalLM":
                moe["shared_expert_intermediate_size"] = self.int_("shared_expert_intermediate_size")
        if moe["num_experts_per_tok"] > experts:
            raise self.fail(f"num_experts_per_tok={moe['num_experts_per_tok']} exceeds the {experts} experts")
        return moe

    def layer_list(self, key: str, num_layers: int) -> tuple[int, ...]:
        value = self.raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in value):
            raise self.fail(f"{key}={value!r} must be a list of layer indices < {num_layers}")
        return tuple(value)

    def special_tokens(self) -> dict[str, Any]:
        eos = self.generation.get("eos_token_id", self.raw.get("eos_token_id"))
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(eos_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise self.fail(f"eos_token_id={eos!r} must be an integer or a list of integers")
        bos = self.generation.get("bos_token_id", self.raw.get("bos_token_id"))
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
            raise self.fail(f"bos_token_id={bos!r} must be an integer or null")
        return {"eos_token_ids": tuple(eos_ids), "bos_token_id": bos}
