"""Router input validation without Ray: every bad field is named, good requests pass."""

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as pb
from router.errors import RequestError
from router.servicer import generate_input, status_for
from router.validation import Limits, RequestValidator
from services.engine.make_model import make_model
from services.engine.scheduler import EngineOverloadedError
from services.engine.tokenizer import Tokenizer
from services.types import KVTransferError, ModelInfo


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    path = make_model("tiny-llama", tmp_path_factory.mktemp("m"))
    info = ModelInfo("tiny", max_model_len=256, vocab_size=512, eos_token_ids=(1,), block_size=16)
    return RequestValidator(info, Tokenizer(path), Limits(max_prompt_bytes=4096))


def build(validator, **kw):
    return validator.build(generate_input(pb.GenerateRequest(**kw)), "r", None)


@pytest.mark.parametrize("kw,code,field", [
    (dict(prompt="hi", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "prompt:"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "prompt:"),
    (dict(prompt="hi", model="other"), grpc.StatusCode.NOT_FOUND, "model:"),
    (dict(prompt_token_ids=[5, 512]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids:"),
    (dict(prompt="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "prompt:"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_tokens"),
    (dict(prompt="hi", sampling=pb.SamplingParams(logprobs=21)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.logprobs"),
    (dict(prompt="hi", sampling=pb.SamplingParams(stop_token_ids=[600])), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop_token_ids"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=300)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
])
def test_bad_requests_name_the_field(validator, kw, code, field):
    with pytest.raises(RequestError) as info:
        build(validator, **kw)
    assert info.value.code == code and info.value.message.startswith(field), info.value.message


def test_defaults_and_explicit_values(validator):
    call = build(validator, prompt="The for statement", priority=3)
    assert call.params.max_tokens == 16 and call.params.temperature == 1.0 and call.priority == 3
    call = build(validator, prompt_token_ids=[5, 6], model="tiny",
                 sampling=pb.SamplingParams(max_tokens=4, temperature=0, seed=9, stop=["x"], logprobs=0))
    p = call.params
    assert call.prompt_token_ids == [5, 6]
    assert (p.max_tokens, p.temperature, p.seed, p.stop, p.logprobs) == (4, 0.0, 9, ("x",), 0)


def test_status_mapping_has_no_stack_traces():
    assert status_for(ValueError("top_p: bad\nTraceback..."))[1] == "top_p: bad"
    assert status_for(EngineOverloadedError("queue full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(KVTransferError("lost"))[0] == grpc.StatusCode.UNAVAILABLE
    code, msg = status_for(RuntimeError("boom"), "r1")
    assert code == grpc.StatusCode.INTERNAL and "boom" not in msg


def test_a_request_opts_out_of_speculative_decoding_over_grpc(validator):
    assert build(validator, prompt="hi").params.speculative is True  # unset: the engine's default
    off = build(validator, prompt="hi", sampling=pb.SamplingParams(speculative=False))
    assert off.params.speculative is False
    assert build(validator, prompt="hi", sampling=pb.SamplingParams(speculative=True)).params.speculative is True


def test_the_final_usage_carries_the_request_s_drafts():
    from router.lifecycle import Usage
    from router.servicer import GenerationServicer
    from services.types import StreamChunk

    usage = Usage(prompt_tokens=3)
    last = StreamChunk([7, 8], finish_reason="length", num_output_tokens=9, num_drafts=4, num_draft_tokens=12,
                       num_accepted_draft_tokens=5)
    usage.add(last)
    msg = GenerationServicer._response("r", last, usage)
    assert (msg.usage.draft_steps, msg.usage.draft_tokens, msg.usage.accepted_draft_tokens) == (4, 12, 5)
    assert msg.usage.completion_tokens == 9
