"""Input hardening without Ray: echoed values are capped, non-finite floats are refused by the
library and over the validator, every input limit names its field and the limit, and the
limits are config keys of the router section, validated when the app is built."""

import math

import pytest
import torch

from router.errors import MAX_MESSAGE, ErrorKind, RequestError, capped, classify, shown
from router.server import RouterConfig
from router.validation import ChatMessage, GenerateInput, Limits, RequestValidator, SamplingInput
from services.engine.config_parse import ConfigError
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.types import ModelInfo

INFO = ModelInfo("tiny", max_model_len=256, vocab_size=512, eos_token_ids=(1,), block_size=16)


class ChatTokenizer:
    """Only what the validator asks before it renders or encodes anything."""

    chat_template = "{{ messages }}"
    stop_token_ids = ()

    def encode(self, text):
        return [5] * max(1, len(text) // 4)


def validator(**limits) -> RequestValidator:
    return RequestValidator(INFO, ChatTokenizer(), Limits(**limits))


def rejected(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value


# ---- capped echoes ---------------------------------------------------------------------------
def test_shown_quotes_short_values_whole_and_caps_long_ones():
    assert shown("abc") == "'abc'"
    long = "m" * 16_000
    text = shown(long)
    assert text.startswith("'" + "m" * 200 + "'") and text.endswith("... (16000 characters)")
    assert len(text) < 240


def test_an_unknown_model_of_16000_characters_is_not_echoed_whole():
    err = rejected(validator().check_model, "x" * 16_000)
    assert err.kind is ErrorKind.NOT_FOUND
    assert err.message.startswith("model: 'xxx") and "(16000 characters)" in err.message
    assert len(err.message) < 300


def test_every_request_error_message_is_capped():
    err = RequestError(ErrorKind.INVALID_ARGUMENT, "messages: " + "y" * 10_000)
    assert len(err.message) == MAX_MESSAGE and err.message.endswith("... (10010 characters)")
    assert capped(err.message, MAX_MESSAGE) == err.message  # capping twice changes nothing
    assert len(classify(ValueError("top_p: " + "z" * 5000)).message) <= MAX_MESSAGE


def test_an_internal_error_names_no_long_request_id():
    err = classify(RuntimeError("boom"), "r" * 1000)
    assert err.kind is ErrorKind.INTERNAL and "boom" not in err.message and len(err.message) < 300


# ---- non-finite floats -------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", math.inf), ("temperature", -math.inf), ("temperature", math.nan),
    ("top_p", math.nan), ("top_p", math.inf), ("min_p", math.nan), ("min_p", math.inf),
    ("temperature", 10 ** 400),  # an int beyond float's range
])
def test_sampling_params_refuse_non_finite_numbers_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
def test_non_finite_sampling_over_the_validator_is_invalid_argument(field):
    for value in (math.inf, math.nan):
        err = rejected(validator().sampling, SamplingInput(**{field: value}))
        assert err.kind is ErrorKind.INVALID_ARGUMENT and err.message.startswith(f"sampling.{field}: ")


def test_a_seed_outside_what_torch_takes_is_refused():
    SamplingParams(seed=-(1 << 63))
    SamplingParams(seed=(1 << 64) - 1)
    for seed in (-(1 << 63) - 1, 1 << 64):
        with pytest.raises(ValueError, match="^seed: "):
            SamplingParams(seed=seed)


def test_a_temperature_too_small_to_divide_by_samples_greedily():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-30).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    # logits / 1e-45 overflow to inf and softmax to NaN: torch.multinomial used to raise for the whole batch
    logits = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1e-45), SamplingParams(temperature=1e-40, seed=3), SamplingParams()]
    got = Sampler(torch.Generator().manual_seed(0))(logits, params, [None, torch.Generator().manual_seed(3), None])
    assert got.token_ids[:2] == logits[:2].argmax(dim=-1).tolist()


# ---- input limits ------------------------------------------------------------------------------
def test_stop_strings_beyond_the_limit_name_field_and_limit():
    v = validator(max_stop_strings=3, max_stop_chars=8)
    v.sampling(SamplingInput(stop=("a", "b", "c")))
    err = rejected(v.sampling, SamplingInput(stop=("a", "b", "c", "d")))
    assert err.message == "sampling.stop: 4 stop strings, more than the limit of 3"
    err = rejected(v.sampling, SamplingInput(stop=("a", "x" * 9)))
    assert err.message == "sampling.stop[1]: 9 characters, more than the limit of 8"


def test_stop_token_ids_beyond_the_limit():
    v = validator(max_stop_token_ids=2)
    v.sampling(SamplingInput(stop_token_ids=(3, 4)))
    err = rejected(v.sampling, SamplingInput(stop_token_ids=(3, 4, 5)))
    assert err.kind is ErrorKind.INVALID_ARGUMENT
    assert err.message == "sampling.stop_token_ids: 3 token ids, more than the limit of 2"


def test_prompt_token_ids_beyond_the_limit_come_before_the_context_check():
    v = validator(max_prompt_token_ids=4)
    assert v.prompt_ids(GenerateInput(prompt_token_ids=[5, 6, 7, 8])) == [5, 6, 7, 8]
    err = rejected(v.prompt_ids, GenerateInput(prompt_token_ids=[5] * 300))  # also over max_model_len 256
    assert err.message == "prompt_token_ids: 300 token ids, more than the limit of 4"


def test_messages_beyond_the_limit():
    v = validator(max_messages=2)
    err = rejected(v.prompt_ids, GenerateInput(messages=(ChatMessage("user", "hi"),) * 3))
    assert err.message == "messages: 3 messages, more than the limit of 2"


def test_limits_default_to_the_documented_values():
    assert Limits() == Limits(max_prompt_bytes=1 << 20, max_prompt_token_ids=1 << 18, max_messages=1024,
                              max_stop_strings=16, max_stop_chars=1024, max_stop_token_ids=256)
    config = RouterConfig(model="m")
    assert config.max_request_bytes == 4 << 20 and config.limits() == Limits()


@pytest.mark.parametrize("kw,field", [
    (dict(max_stop_strings=0), "max_stop_strings"),
    (dict(max_messages=True), "max_messages"),
    (dict(max_prompt_token_ids="many"), "max_prompt_token_ids"),
    (dict(max_request_bytes=0), "max_request_bytes"),
    (dict(max_request_bytes=8 << 20, max_message_bytes=4 << 20), "max_request_bytes"),
])
def test_router_config_refuses_bad_limits_naming_the_field(kw, field):
    with pytest.raises(ConfigError) as info:
        RouterConfig(model="m", **kw)
    assert info.value.path == field


def test_app_args_carry_the_limits_and_name_the_yaml_path():
    from router.app import parse_args

    config = parse_args({"router": {"max_stop_strings": 4, "max_request_bytes": 1 << 20}})
    assert config.router.limits().max_stop_strings == 4 and config.router.max_request_bytes == 1 << 20
    with pytest.raises(ConfigError, match=r"^args\.router\.max_stop_chars: must be an integer >= 1, got -1"):
        parse_args({"router": {"max_stop_chars": -1}})
