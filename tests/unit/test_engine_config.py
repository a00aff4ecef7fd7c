"""The engine config tree: parsed once from flat or nested options, every error names its field's path."""

from __future__ import annotations

import pytest
import torch

from router.app import parse_args
from services.engine.config import CPU_AUTO_BF16, CacheConfig, EngineConfig, cpu_auto_dtype, resolve_device
from services.engine.kernels.cpu_features import CpuFeatures, cpu_features
from services.engine.model_config import ModelConfig
from services.engine.config_parse import ConfigError
from services.engine.llm import build_engine_config
from services.engine.make_model import make_model

P = "applications[0].args.engine"


def err(options: dict, path: str = P) -> str:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_options("m", options, path)
    return str(info.value)


def test_flat_and_nested_names_build_the_same_tree():
    flat = EngineConfig.from_options("m", {"block_size": 8, "num_kv_blocks": 64, "max_num_seqs": 4,
                                           "enable_chunked_prefill": False, "dtype": "bf16"})
    nested = EngineConfig.from_options("m", {"cache": {"block_size": 8, "num_kv_blocks": 64},
                                             "scheduler": {"max_num_seqs": 4, "enable_chunked_prefill": False},
                                             "dtype": "bf16"})
    assert flat == nested
    assert flat.cache == CacheConfig(block_size=8, num_kv_blocks=64)
    assert flat.scheduler.max_num_seqs == 4 and flat.scheduler.enable_chunked_prefill is False
    assert flat.scheduler.max_num_batched_tokens == 2048  # untouched fields keep their defaults
    assert flat.experts.name == "local" and flat.quantization.name == "none" and flat.speculative is None


def test_unknown_key_names_its_path_and_lists_the_known():
    msg = err({"nope": 1})
    assert msg.startswith(f"{P}.nope: unknown engine option") and "block_size" in msg
    assert err({"cache": {"blok_size": 8}}).startswith(f"{P}.cache.blok_size: unknown key")
    assert err({"experts": {"backend": "local", "extra": 1}}).startswith(f"{P}.experts: unknown key(s) ['extra']")


def test_wrong_type_names_its_path():
    assert err({"block_size": "16"}) == f"{P}.block_size: must be int, got str '16'"
    assert err({"max_num_seqs": True}) == f"{P}.max_num_seqs: must be int, got bool True"
    assert err({"enable_prefix_caching": 1}) == f"{P}.enable_prefix_caching: must be bool, got int 1"
    assert err({"cache": 3}) == f"{P}.cache: must be a mapping, got int"
    assert err({"max_model_len": 1.5}) == f"{P}.max_model_len: must be int, got float 1.5"


def test_out_of_range_value_names_its_path_as_written():
    assert err({"block_size": 3}) == f"{P}.block_size: must be a power of two >= 1, got 3"
    assert err({"cache": {"block_size": 3}}) == f"{P}.cache.block_size: must be a power of two >= 1, got 3"
    assert err({"max_num_seqs": 0}) == f"{P}.max_num_seqs: must be >= 1, got 0"
    assert err({"kv_cache_memory_gb": 0}) == f"{P}.kv_cache_memory_gb: must be > 0, got 0.0"
    assert err({"dtype": "int3"}).startswith(f"{P}.dtype: unknown dtype 'int3'")
    assert err({"device": "tpu"}).startswith(f"{P}.device: must be auto, cpu or cuda")
    assert err({"block_size": 8, "cache": {"block_size": 8}}) == f"{P}.block_size: given twice (flat and inside cache)"


def test_plugin_sections_name_unknown_variants():
    assert err({"experts": {"backend": "nope"}}) == f"{P}.experts.backend: unknown experts variant 'nope'; available: ['local', 'offload', 'remote']"
    assert err({"quantization": "int9"}).startswith(f"{P}.quantization.name: unknown quantization variant 'int9'")
    assert err({"speculative_config": {"method": "x"}}).startswith(f"{P}.speculative_config.method: unknown")
    long_form = EngineConfig.from_options("m", {"experts": {"name": "local", "options": {}}})
    assert long_form.experts == EngineConfig.from_options("m", {"experts": "local"}).experts


def test_per_role_override_keeps_the_base_and_names_its_own_path():
    base = EngineConfig.from_options("m", {"block_size": 8, "max_num_seqs": 32})
    over = base.with_options({"max_num_seqs": 64}, "args.decode_engine")
    assert over.scheduler.max_num_seqs == 64 and over.cache.block_size == 8 and base.scheduler.max_num_seqs == 32
    with pytest.raises(ConfigError, match=r"^args\.decode_engine\.max_num_seqs: must be >= 1"):
        base.with_options({"max_num_seqs": -1}, "args.decode_engine")


def test_library_keywords_and_torch_dtypes():
    config = build_engine_config("m", device=None, dtype=torch.bfloat16, num_kv_blocks=16)
    assert config.device == "auto" and config.dtype == "bfloat16" and config.cache.num_kv_blocks == 16
    assert resolve_device(EngineConfig("m", device="cpu", dtype="float32"))[1] == torch.float32
    with pytest.raises(ValueError, match="^block_size: must be a power of two"):
        build_engine_config("m", block_size=6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_model("tiny-llama", tmp_path_factory.mktemp("m")))


def test_app_args_errors_carry_the_yaml_path(model):
    with pytest.raises(ValueError, match=r"^applications\[0\]\.args\.engine\.block_size: must be a power of two"):
        parse_args({"model": model, "engine": {"block_size": 3}}, "applications[0].args")
    with pytest.raises(ValueError, match=r"^args\.prefill_engine\.enable_chunked_prefill: must be bool"):
        parse_args({"model": model, "mode": "pd", "prefill_engine": {"enable_chunked_prefill": "no"}})
    with pytest.raises(ValueError, match=r"^args\.kv_transfer\.name: unknown kv_transfer variant 'carrier-pigeon'"):
        parse_args({"model": model, "mode": "pd", "kv_transfer": "carrier-pigeon"})
    with pytest.raises(ValueError, match="block_size must be equal"):
        parse_args({"model": model, "mode": "pd", "decode_engine": {"block_size": 32}})


def test_app_args_reach_each_role(model):
    config = parse_args({"model": model, "mode": "pd", "engine": {"enable_chunked_prefill": False, "block_size": 8},
                         "prefill_engine": {"max_num_seqs": 16}})
    pre, dec = config.workers["prefill"].engine, config.workers["decode"].engine
    assert pre.scheduler.enable_chunked_prefill is False and dec.scheduler.enable_chunked_prefill is False
    assert pre.scheduler.max_num_seqs == 16 and dec.scheduler.max_num_seqs == 128
    assert pre.model == dec.model == model and config.workers["decode"].kv_transfer.name == "ray"


ZEN3 = CpuFeatures("test CPU", frozenset("avx fma avx2".split()), 2)
ZEN4 = CpuFeatures("test CPU", ZEN3.flags | frozenset("avx512f avx512bw avx512vl avx512dq avx512_bf16".split()), 2)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-moe"])
def test_auto_dtype_on_cpu_is_bf16_for_dense_models_on_bf16_cpus(shape, tmp_path):
    config = ModelConfig.from_path(make_model(shape, tmp_path / shape))
    want = torch.float32 if config.is_moe else torch.bfloat16
    assert cpu_auto_dtype(config, ZEN4) == want
    assert cpu_auto_dtype(config, ZEN3) == torch.float32


def test_resolve_device_reads_the_checkpoint_for_auto(model):
    device, dtype = resolve_device(EngineConfig(model, device="cpu"))
    want = cpu_auto_dtype(ModelConfig.from_path(model), cpu_features()) if CPU_AUTO_BF16 else torch.float32
    assert device.type == "cpu" and dtype == want
    assert resolve_device(EngineConfig(model, device="cpu", dtype="bf16"))[1] == torch.bfloat16
