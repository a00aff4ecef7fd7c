"""GenerateRequest.messages without Ray: rendered with the model's chat template, tokenized by
the router, stopping at the end-of-turn token; exclusive with prompt / prompt_token_ids; a bad
message or a model without a template is INVALID_ARGUMENT naming the field."""

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as pb
from router.errors import RequestError
from router.servicer import generate_input
from router.validation import Limits, RequestValidator
from services.engine.make_model import make_model
from services.engine.model_catalog import smollm2_path
from services.engine.tokenizer import Tokenizer
from services.types import ModelInfo

CHAT = [pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Capital of France?")]


@pytest.fixture(scope="module")
def chat_validator():
    info = ModelInfo("smollm2", max_model_len=8192, vocab_size=49152, eos_token_ids=(0, 2), block_size=16)
    return RequestValidator(info, Tokenizer(smollm2_path()), Limits(max_prompt_bytes=4096))


@pytest.fixture(scope="module")
def plain_validator(tmp_path_factory):  # a model without a chat template
    path = make_model("tiny-llama", tmp_path_factory.mktemp("m"))
    info = ModelInfo("tiny", max_model_len=256, vocab_size=512, eos_token_ids=(1,), block_size=16)
    return RequestValidator(info, Tokenizer(path), Limits(max_prompt_bytes=4096))


def build(validator, **kw):
    return validator.build(generate_input(pb.GenerateRequest(**kw)), "r", None)


def test_messages_are_the_rendered_template_and_stop_at_end_of_turn(chat_validator):
    tok = chat_validator.tokenizer
    call = build(chat_validator, messages=CHAT, sampling=pb.SamplingParams(max_tokens=8, stop_token_ids=[7]))
    text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in CHAT])
    assert text.endswith("<|im_start|>assistant\n") and "Capital of France?" in text
    assert call.prompt_token_ids == tok.encode(text) and call.prompt_token_ids[0] == 1  # <|im_start|>
    assert call.params.stop_token_ids == (7, *tok.stop_token_ids) and 2 in call.params.stop_token_ids
    assert build(chat_validator, prompt=text).params.stop_token_ids == ()  # a plain prompt: no added stops


@pytest.mark.parametrize("kw,field", [
    (dict(prompt="hi", messages=CHAT), "prompt: set exactly one of prompt, prompt_token_ids and messages (got prompt and messages)"),
    (dict(prompt_token_ids=[5], messages=CHAT), "prompt:"),
    (dict(), "prompt: set exactly one of prompt, prompt_token_ids and messages (got none)"),
    (dict(messages=[pb.ChatMessage(content="hi")]), "messages[0].role"),
    (dict(messages=[CHAT[0], pb.ChatMessage(role="", content="x")]), "messages[1].role"),
    (dict(messages=[pb.ChatMessage(role="user", content="x" * 5000)]), "messages: 5000 bytes"),
    (dict(messages=CHAT, sampling=pb.SamplingParams(max_tokens=9000)), "max_tokens"),
])
def test_bad_chat_requests_name_the_field(chat_validator, kw, field):
    with pytest.raises(RequestError) as info:
        build(chat_validator, **kw)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.message.startswith(field), \
        info.value.message


def test_a_model_without_a_chat_template_refuses_messages(plain_validator):
    with pytest.raises(RequestError) as info:
        build(plain_validator, messages=CHAT)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith("messages: the served model has no chat template")
